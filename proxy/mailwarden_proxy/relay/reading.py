"""Reading into one shared buffer per thread instead of a new object per read.

With a plain `asyncio.Protocol`, a TLS transport reads every chunk with
`SSLObject.read(256 KiB)`: a 256 KiB allocation per read, shrunk afterwards. That rules
out a fixed malloc mmap threshold (`footprint`), which keeps each TLS connection's own
256 KiB read buffer in uvloop out of the heap: bench/README.md has both figures. As a
`BufferedProtocol` the transport reads into a buffer we lend it instead; each chunk is
copied out at once, so one buffer serves every connection of the thread's event loop.
"""

from __future__ import annotations

import asyncio
import threading

READ_SIZE = 64 * 1024  # what one read may deliver; a TLS record is at most 16 KiB

_per_thread = threading.local()


def _buffer() -> memoryview:
    try:
        view: memoryview = _per_thread.view
    except AttributeError:
        view = _per_thread.view = memoryview(bytearray(READ_SIZE))
    return view


class CopyingReader(asyncio.BufferedProtocol):
    """A protocol that receives `data_received(bytes)` like `asyncio.Protocol` does."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # a copy: the transport may keep what it is given to write (a slow peer), and
        # the next read reuses the buffer
        self.data_received(_buffer()[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

"""Relay bytes between two transports after login, with no parsing and flow control.

Each direction is `data_received -> peer.write`; when a peer's write buffer fills,
asyncio calls `pause_writing` on that peer's protocol, which pauses reading on the
source, so a fast sender can't make us buffer without bound. Byte counts go to the
metrics in the chunks the kernel delivers, never per line. Each end notes the time of
its last chunk (`last`), which the server's idle sweep reads: no timer per session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic

from mailwarden_proxy.relay.reading import CopyingReader

# Larger than asyncio's 64 KiB default: fewer pause/resume round trips on bulk FETCH.
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024


class SpliceEnd(CopyingReader):
    """The protocol installed on one transport once the session is spliced."""

    def __init__(self, count: Callable[[int], None], on_closed: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: SpliceEnd | None = None
        self._count = count
        self._on_closed = on_closed
        self._closed = False
        self.last = monotonic()  # when bytes last arrived on this end

    @property
    def idle_since(self) -> float:
        """When bytes last moved either way (read on this end or on its peer)."""
        return self.last if self.peer is None else max(self.last, self.peer.last)

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.last = monotonic()
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            self._count(len(data))

    def eof_received(self) -> bool | None:
        # Half-close is not worth keeping for mail protocols (TLS can't do it anyway):
        # the other side gets what was buffered, then both close.
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        # No event comes after this one. Drop the references that make cycles (transport
        # <-> protocol, end <-> end): refcounting then frees the connection, and with it
        # its TLS state and uvloop's 256 KiB buffer, now rather than at the cyclic GC's
        # next full collection, minutes of sessions later (bench/README.md, Soak).
        self.transport = None
        self.peer = None

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        if self.peer is not None:
            self.peer.close()
        self._on_closed()


def splice(
    client: asyncio.Transport,
    upstream: asyncio.Transport,
    count_up: Callable[[int], None],
    count_down: Callable[[int], None],
    on_closed: Callable[[], None],
) -> SpliceEnd:
    """Install splice protocols on both transports; `on_closed` runs once, at the end.

    Returns the client's end (its `peer` is the upstream's)."""
    done = False

    def closed_once() -> None:
        nonlocal done
        if not done:
            done = True
            on_closed()

    client_end = SpliceEnd(count_up, closed_once)
    upstream_end = SpliceEnd(count_down, closed_once)
    client_end.peer, upstream_end.peer = upstream_end, client_end
    client_end.attach(client)
    upstream_end.attach(upstream)
    # reading was paused during the hand-over so no chunk reached the old protocols
    client.resume_reading()
    upstream.resume_reading()
    return client_end

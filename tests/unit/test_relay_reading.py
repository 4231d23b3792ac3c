"""`CopyingReader`: one lent buffer per thread, every chunk handed on as its own bytes."""

from __future__ import annotations

import asyncio
import threading

from mailwarden_proxy.relay import reading
from mailwarden_proxy.relay.reading import CopyingReader


class _Collect(CopyingReader):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


async def _relay_through_reader(payload: bytes) -> list[bytes]:
    loop = asyncio.get_running_loop()
    received: list[_Collect] = []

    def factory() -> _Collect:
        received.append(_Collect())
        return received[-1]

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    writer.close()
    await received[0].closed
    server.close()
    return received[0].chunks


def test_chunks_are_copies_that_survive_the_next_read() -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB: many reads into the same buffer
    chunks = asyncio.run(_relay_through_reader(payload))
    assert all(type(c) is bytes for c in chunks)
    assert max(len(c) for c in chunks) <= reading.READ_SIZE
    assert b"".join(chunks) == payload


def test_each_thread_lends_its_own_buffer() -> None:
    views: list[memoryview] = []
    thread = threading.Thread(target=lambda: views.append(CopyingReader().get_buffer(-1)))
    thread.start()
    thread.join()
    mine = CopyingReader().get_buffer(-1)
    assert mine is CopyingReader().get_buffer(-1)
    assert views[0].obj is not mine.obj

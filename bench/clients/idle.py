"""Idle sessions: many authenticated IMAP connections, each parked in IDLE.

Runs in the main process (asyncio; the worker is a blocking pool) because the caller
must measure the proxy while every session is held open.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.clients.token import xoauth2
from bench.paths import Endpoint

# Logins in flight. Few: this figure is about memory, not bursts, and emailproxy's listen
# backlog of 5 turns more into SYN retransmissions (that is the cold-burst figure's job).
CONCURRENCY = 4
SESSION_TIMEOUT = 30.0
GIVE_UP_AFTER = 5  # failures in a row: the proxy has stopped answering (emailproxy's fds)


@dataclass
class IdleResult:
    opened: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)


async def _expect(reader: asyncio.StreamReader, tag: bytes) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line.startswith(tag):
            return line


async def _open(endpoint: Endpoint) -> asyncio.StreamWriter:
    context = None
    if endpoint.tls == "implicit":
        context = ssl.create_default_context(cafile=endpoint.ca_path)
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, ssl=context, limit=1 << 16
    )
    try:
        await _expect(reader, b"* OK")
        if endpoint.direct:
            assert endpoint.token is not None
            sasl = xoauth2(endpoint.username, endpoint.token).decode()
            writer.write(f"a1 AUTHENTICATE XOAUTH2 {sasl}\r\n".encode())
        else:
            writer.write(f'a1 LOGIN "{endpoint.username}" "{endpoint.password}"\r\n'.encode())
        reply = await _expect(reader, b"a1 ")
        if not reply.startswith(b"a1 OK"):
            raise ConnectionError(f"login refused: {reply[:80]!r}")
        writer.write(b"a2 SELECT INBOX\r\n")
        await _expect(reader, b"a2 OK")
        writer.write(b"a3 IDLE\r\n")
        await _expect(reader, b"+")
    except BaseException:
        writer.close()
        raise
    return writer


async def _hold(
    endpoint: Endpoint, sessions: int, budget: float, measure: Callable[[], dict[str, float]]
) -> IdleResult:
    result = IdleResult()
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(CONCURRENCY)
    deadline = time.monotonic() + budget
    failures_in_a_row = 0

    async def one() -> None:
        nonlocal failures_in_a_row
        async with gate:
            if failures_in_a_row >= GIVE_UP_AFTER or time.monotonic() > deadline:
                return
            try:
                timeout = max(0.1, min(SESSION_TIMEOUT, deadline - time.monotonic()))
                writers.append(await asyncio.wait_for(_open(endpoint), timeout))
                failures_in_a_row = 0
            except (OSError, TimeoutError, ConnectionError) as exc:
                failures_in_a_row += 1
                result.errors.append(f"{type(exc).__name__}: {exc}"[:120])

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(sessions)))
    result.seconds = time.monotonic() - started
    result.opened = len(writers)
    await asyncio.sleep(1.0)  # let the proxy settle (buffers shrink, GC runs)
    result.measured = measure()
    for writer in writers:
        writer.close()
    for writer in writers:
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return result


def hold_idle(
    endpoint: Endpoint, sessions: int, budget: float, measure: Callable[[], dict[str, float]]
) -> IdleResult:
    """Open up to `sessions` idle sessions within `budget` seconds, call `measure()` while
    they are all open, then close them."""
    return asyncio.run(_hold(endpoint, sessions, budget, measure))

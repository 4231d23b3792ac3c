"""Warm upstream connections for SMTP listeners: the client's login skips the prelude.

Without a pool, an SMTP client waits for connect, greeting, EHLO, STARTTLS, the TLS
handshake and the second EHLO before it hears our greeting (bench/README.md: the
handshake alone is a quarter of the proxy's CPU per one-message connection). None of
that depends on the client, so a listener keeps `POOL_SIZE` upstream connections that
have already done it.

Design
------

- **The warm-up reuses the core.** A warm-up drives an ordinary `SmtpCore` with no
  client: it performs the core's `SendUpstream` and `StartUpstreamTLS` actions until the
  core would greet the client (its first `SendClient` while not finished). At that point
  the core knows the upstream's EHLO extensions and whether TLS is up; the pool keeps
  those two facts with the transport and drops the warm-up core. There is no second
  SMTP client to keep in step with the core.
- **The hand-over is a resume.** A session that gets a warm connection creates its own
  core as usual (its `LocalInfo` depends on the client connection) and calls
  `SmtpCore.resume(extensions, upstream_tls=...)`, which greets the client at once and
  answers EHLO from the stored extensions; the login then runs unchanged.
- **Idle connections are never trusted.** While parked, anything from the upstream
  (data, EOF, a reset: an idle-timeout 421 for instance) discards the connection. A
  connection is held at most `IDLE_LIFETIME` seconds, well under the 300 s most servers
  allow an idle client (Postfix `smtpd_timeout`, RFC 5321 §4.5.3.2.7's 5 minutes).
- **No traffic without clients.** The pool starts filling at the listener's first
  session and is refilled after each take. An expired connection is replaced only if a
  session took one within `ACTIVE_WINDOW`, so an unused listener stops holding
  connections after a while; a connection the upstream dropped is not replaced until the
  next take, and a failed warm-up is not retried until then either, so an unreachable
  upstream cannot make the pool spin.
- A warm connection can still die between the check in `take` and the login (the
  upstream's FIN in flight, or every connection dropped at once by a restart or a
  network cut). Until the upstream has answered anything of the session's, nothing is
  lost by starting over, so the session asks `connect` for a new connection, replays
  what it had sent (at most the AUTH command) and the client never notices; see
  `ProxySession._replace_stale_upstream`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from mailwarden_proxy.config.model import Listener, UpstreamTLS
from mailwarden_proxy.protocols import session as core_api
from mailwarden_proxy.protocols.smtp import SmtpCore
from mailwarden_proxy.relay.reading import CopyingReader

log = logging.getLogger("mailwarden.pool")

POOL_SIZE = 2  # warm connections per SMTP listener
IDLE_LIFETIME = 60.0  # seconds a warm connection may wait for a session
ACTIVE_WINDOW = 300.0  # replace expired connections only if a session took one this recently


class _WarmProtocol(CopyingReader):
    """Feeds the warm-up core; once parked, any event from the upstream discards it."""

    def __init__(self, core: SmtpCore) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self.wake = asyncio.Event()
        self.gone = False
        self.on_idle_event: Callable[[], None] | None = None  # set while parked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not a subclass

    def data_received(self, data: bytes) -> None:
        if self.on_idle_event is not None:
            self.on_idle_event()  # a parked connection must stay silent
            return
        self.core.receive_upstream(data)
        if self.transport is not None and any(
            isinstance(a, core_api.StartUpstreamTLS) for a in self.core.actions
        ):
            # no plaintext may reach the core between STARTTLS's 220 and the handshake
            self.transport.pause_reading()
        self.wake.set()

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        self.transport = None  # no cycle with the transport, which keeps its protocol

    def _lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        if self.on_idle_event is not None:
            self.on_idle_event()
        else:
            self.core.upstream_closed()
            self.wake.set()


@dataclass(eq=False)  # identity: `_discard` looks a connection up in the idle queue
class WarmUpstream:
    """An upstream connection past greeting, EHLO and STARTTLS; see `SmtpCore.resume`."""

    transport: asyncio.Transport
    extensions: tuple[bytes, ...]
    tls: bool  # STARTTLS was done (implicit TLS is not counted, as in the core)
    protocol: _WarmProtocol
    timer: asyncio.TimerHandle | None = None


class UpstreamPool:
    """Up to `size` warm SMTP upstream connections for one listener."""

    def __init__(
        self,
        listener: Listener,
        upstream_tls: ssl.SSLContext | None,
        make_core: Callable[[], SmtpCore],
        timeout: Callable[[], float],
        *,
        size: int = POOL_SIZE,
        idle_lifetime: float = IDLE_LIFETIME,
    ) -> None:
        self._listener = listener
        self._upstream_tls = upstream_tls
        self._make_core = make_core
        self._timeout = timeout  # the whole warm-up: the current limits' login timeout
        self._size = size
        self._idle_lifetime = idle_lifetime
        self._idle: deque[WarmUpstream] = deque()
        self._warming: set[asyncio.Task[None]] = set()
        self._last_take = float("-inf")
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    def take(self) -> WarmUpstream | None:
        """A warm connection for a new session, or None; starts refilling either way."""
        if self._closed:
            return None
        self._last_take = asyncio.get_running_loop().time()
        found: WarmUpstream | None = None
        while self._idle and found is None:
            warm = self._idle.popleft()
            if warm.timer is not None:
                warm.timer.cancel()
            warm.protocol.on_idle_event = None
            if warm.protocol.gone or warm.transport.is_closing():
                warm.transport.abort()
                continue
            found = warm
        self._refill()
        return found

    def close(self) -> None:
        """Listener gone or shutting down: drop idle connections and warm-ups."""
        self._closed = True
        for task in self._warming:
            task.cancel()
        while self._idle:
            self._discard(self._idle[0])

    # -- filling ----------------------------------------------------------------------------

    def _refill(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed and len(self._idle) + len(self._warming) < self._size:
            task = loop.create_task(self._warm_up())
            self._warming.add(task)
            task.add_done_callback(self._warming.discard)

    async def connect(self) -> WarmUpstream | None:
        """A new connection with its prelude done, for the caller alone (not parked);
        None if the upstream can't be reached or its prelude failed."""
        if self._closed:
            return None
        return await self._open()

    async def _warm_up(self) -> None:
        warm = await self._open()
        if warm is None:
            return
        if self._closed:
            warm.transport.close()
            return
        self._park(warm)

    async def _open(self) -> WarmUpstream | None:
        upstream = self._listener.upstream
        implicit = upstream.tls is UpstreamTLS.IMPLICIT
        loop = asyncio.get_running_loop()
        core = self._make_core()
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(self._timeout()):
                transport, protocol = await loop.create_connection(
                    lambda: _WarmProtocol(core),
                    upstream.host,
                    upstream.port,
                    ssl=self._upstream_tls if implicit else None,
                    server_hostname=upstream.host if implicit else None,
                )
                transport = await self._prelude(core, transport, protocol)
        except (OSError, TimeoutError) as exc:
            log.debug("warm-up of an upstream connection failed: %s", exc.__class__.__name__)
            transport = None
        except asyncio.CancelledError:
            if transport is not None:
                transport.abort()
            raise
        if transport is None:
            return None
        return WarmUpstream(transport, core.upstream_extensions, core.upstream_tls, protocol)

    async def _prelude(
        self, core: SmtpCore, transport: asyncio.Transport, protocol: _WarmProtocol
    ) -> asyncio.Transport | None:
        """Perform the core's actions until it would greet the client (None: it failed)."""
        loop = asyncio.get_running_loop()
        while True:
            action = core.next_action()
            if action is None:
                protocol.wake.clear()
                await protocol.wake.wait()
                continue
            match action:
                case core_api.SendUpstream(data):
                    transport.write(data)
                case core_api.StartUpstreamTLS():
                    assert self._upstream_tls is not None
                    new = await loop.start_tls(
                        transport,
                        protocol,
                        self._upstream_tls,
                        server_hostname=self._listener.upstream.host,
                    )
                    assert new is not None
                    transport = protocol.transport = new
                case core_api.SendClient():
                    # the greeting, or a 421 followed by Close: the core decided which
                    if core.finished:
                        transport.close()
                        return None
                    return transport
                case _:
                    transport.close()
                    return None

    def _park(self, warm: WarmUpstream) -> None:
        loop = asyncio.get_running_loop()
        warm.protocol.on_idle_event = lambda: self._discard(warm)
        warm.timer = loop.call_later(self._idle_lifetime, self._expire, warm)
        self._idle.append(warm)

    def _discard(self, warm: WarmUpstream, *, abort: bool = True) -> None:
        if warm.timer is not None:
            warm.timer.cancel()
        warm.protocol.on_idle_event = None
        if warm in self._idle:  # not when `take` already popped it
            self._idle.remove(warm)
        if abort:  # it spoke or went away while idle: nothing left to say to it
            warm.transport.abort()

    def _expire(self, warm: WarmUpstream) -> None:
        transport = warm.transport
        self._discard(warm, abort=False)
        transport.write(b"QUIT\r\n")  # a polite end: the server logs no dropped client
        transport.close()
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_take < ACTIVE_WINDOW:
            self._refill()

"""Listeners for every configured port; reload without dropping live sessions; drain.

A `ProxyServer` holds the current configuration. Sessions read it at login time, so a
reload (SIGHUP) applies new accounts and passwords to the next login at once; a
listener whose own settings changed is re-bound, and sessions already running keep the
settings they started with until they end.

Limits (config `limits`): each listener accepts at most `max_connections` sessions at a
time and answers the next ones with its protocol's "try again later" before closing
them; one sweep task closes sessions idle after login (`relay.limits`); failed local
logins are rate-limited per source by one limiter shared by all listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

from mailwarden_proxy.config.model import (
    Listener,
    LocalTLS,
    MailProtocol,
    ProxyConfig,
    UpstreamTLS,
)
from mailwarden_proxy.localauth import LocalPasswords
from mailwarden_proxy.metrics import ProxyMetrics
from mailwarden_proxy.protocols.imap import ImapCore
from mailwarden_proxy.protocols.pop3 import Pop3Core
from mailwarden_proxy.protocols.session import LocalInfo, SessionCore, UpstreamInfo
from mailwarden_proxy.protocols.smtp import SmtpCore
from mailwarden_proxy.ratelimit import FailedLoginLimiter
from mailwarden_proxy.relay.limits import GOODBYE, is_loopback, sweep_interval
from mailwarden_proxy.relay.pool import UpstreamPool
from mailwarden_proxy.relay.session import (
    ProxySession,
    SessionContext,
    SplicedSession,
    TokenSource,
)
from mailwarden_proxy.relay.tls import local_context, upstream_context

log = logging.getLogger("mailwarden.server")

# emailproxy's backlog of 5 overflowed into SYN cookies under bursts; the kernel caps
# this at net.core.somaxconn anyway.
LISTEN_BACKLOG = 4096
# refused connections are logged at most this often per listener (a flood would flood)
REFUSAL_LOG_INTERVAL = 60.0


def core_factory(listener: Listener, config: ProxyConfig) -> Callable[[bool], SessionCore]:
    cores: dict[MailProtocol, type[SessionCore]] = {
        MailProtocol.IMAP: ImapCore,
        MailProtocol.POP3: Pop3Core,
        MailProtocol.SMTP: SmtpCore,
    }
    cls = cores[listener.protocol]
    upstream = UpstreamInfo(
        host=listener.upstream.host,
        port=listener.upstream.port,
        starttls=listener.upstream.tls is UpstreamTLS.STARTTLS,
    )
    limits = config.limits

    def make(client_tls: bool) -> SessionCore:
        local = LocalInfo(
            starttls=listener.local_tls is LocalTLS.STARTTLS,
            tls_active=client_tls,
        )
        return cls(upstream, local, max_line=limits.max_line, max_literal=limits.max_literal)

    return make


class _Accept(asyncio.Protocol):
    """Hands each accepted transport to a new session."""

    def __init__(self, server: ProxyServer, ctx: SessionContext) -> None:
        self._server = server
        self._ctx = ctx

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._server.start_session(self._ctx, cast(asyncio.Transport, transport))


class ProxyServer:
    def __init__(
        self,
        config: ProxyConfig,
        tokens: TokenSource,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens
        self.metrics = metrics or ProxyMetrics()
        self.passwords = LocalPasswords()
        self.login_limiter = FailedLoginLimiter(
            config.limits.failed_login_burst, config.limits.failed_logins_per_minute
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._servers: dict[Listener, asyncio.Server] = {}
        self._pools: dict[Listener, UpstreamPool] = {}
        # every open connection by its `done` future: the pre-login `ProxySession` (whose
        # pump task is in `_tasks`), replaced by its `SplicedSession` after login
        self._sessions: dict[asyncio.Future[None], ProxySession | SplicedSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = False

    def _context(self, listener: Listener) -> SessionContext:
        ctx = SessionContext(
            listener=listener,
            config=lambda: self.config,
            tokens=self.tokens,
            passwords=self.passwords,
            metrics=self.metrics,
            upstream_tls=(
                upstream_context(listener.upstream)
                if listener.upstream.tls is not UpstreamTLS.NONE
                else None
            ),
            local_tls=local_context(listener),
            make_core=core_factory(listener, self.config),
            login_limiter=self.login_limiter,
        )
        if listener.protocol is MailProtocol.SMTP:  # IMAP and POP3: not yet
            ctx.pool = UpstreamPool(
                listener,
                ctx.upstream_tls,
                # the warm-up runs the sessions' own core, without a client
                make_core=lambda: cast(SmtpCore, ctx.make_core(False)),
                timeout=lambda: self.config.limits.login_timeout,
            )
        return ctx

    async def _bind(self, listener: Listener) -> None:
        ctx = self._context(listener)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Accept(self, ctx),
            listener.local_address,
            listener.local_port,
            ssl=ctx.local_tls if listener.local_tls is LocalTLS.IMPLICIT else None,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
        )
        self._servers[listener] = server
        if ctx.pool is not None:
            self._pools[listener] = ctx.pool
        log.info(
            "listening %s on %s:%s -> %s:%s (%s)",
            listener.name,
            listener.local_address,
            server.sockets[0].getsockname()[1],  # the bound port, also when 0 was asked
            listener.upstream.host,
            listener.upstream.port,
            listener.upstream.tls.value,
        )

    def _announce_exposure(self) -> None:
        """A WARNING per listener bound beyond loopback (at start and on every reload),
        and `mailwarden_listener_info` for all of them."""
        self.metrics.listener_info.clear()
        for listener, server in self._servers.items():
            hosts = sorted({str(sock.getsockname()[0]) for sock in server.sockets})
            exposed = [h for h in hosts if not is_loopback(h)]
            for host in hosts:
                self.metrics.listener_info.labels(
                    listener.name,
                    listener.protocol.value,
                    host,
                    "false" if host in exposed else "true",
                ).set(1)
            if exposed:
                log.warning(
                    "listener %s is bound to %s (local_address %s), reachable from other "
                    "hosts: anyone who can reach it may try local passwords%s",
                    listener.name,
                    ", ".join(exposed),
                    listener.local_address,
                    "" if listener.local_tls is not LocalTLS.NONE else ", sent in clear text",
                )

    async def start(self) -> None:
        for listener in self.config.listeners:
            await self._bind(listener)
        self._announce_exposure()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())
        self.ready = True

    async def _sweep_idle(self) -> None:
        """Close sessions with no traffic after login for their protocol's idle timeout."""
        while True:
            await asyncio.sleep(sweep_interval(self.config.limits))
            limits = self.config.limits
            timeouts = {p: limits.idle_timeout(p) for p in MailProtocol}
            now = time.monotonic()
            for session in list(self._sessions.values()):
                timeout = timeouts[session.ctx.listener.protocol]
                if timeout <= 0:
                    continue
                try:
                    session.close_if_idle(now, timeout)
                except Exception:  # one odd session must not stop the sweeping
                    log.exception("idle check failed", extra={"peer": session.peer})

    def bound_port(self, listener_name: str) -> int:
        """The port actually bound (tests configure port 0)."""
        for listener, server in self._servers.items():
            if listener.name == listener_name:
                port: int = server.sockets[0].getsockname()[1]
                return port
        raise KeyError(listener_name)

    def idle_upstreams(self, listener_name: str) -> int:
        """Warm upstream connections waiting for a session (0 without a pool)."""
        for listener, pool in self._pools.items():
            if listener.name == listener_name:
                return pool.idle
        return 0

    def start_session(self, ctx: SessionContext, transport: asyncio.Transport) -> None:
        if ctx.active >= self.config.limits.max_connections:
            self._refuse(ctx, transport)
            return
        session = ProxySession(ctx, transport, self._handed_over)
        ctx.active += 1
        ctx.bound.connections.inc()
        ctx.bound.active.inc()
        self._sessions[session.done] = session
        session.done.add_done_callback(self._ended)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handed_over(self, spliced: SplicedSession) -> None:
        self._sessions[spliced.done] = spliced

    def _ended(self, done: asyncio.Future[None]) -> None:
        session = self._sessions.pop(done, None)
        if session is not None:
            session.ctx.active -= 1
            session.ctx.bound.active.dec()

    def _refuse(self, ctx: SessionContext, transport: asyncio.Transport) -> None:
        """Over the listener's cap: "try again later" as the greeting, then close."""
        ctx.bound.refused("max_connections").inc()
        transport.write(GOODBYE[ctx.listener.protocol].busy)
        transport.close()
        now = time.monotonic()
        if now - ctx.refusals_logged_at >= REFUSAL_LOG_INTERVAL:
            ctx.refusals_logged_at = now
            log.warning(
                "listener %s is at its limit of %d connections (limits."
                "maxConnectionsPerListener); refusing new ones (logged at most once a "
                "minute; mailwarden_connections_refused_total counts them)",
                ctx.listener.name,
                ctx.active,
            )

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def reload(self, config: ProxyConfig) -> None:
        """Apply a new configuration; live sessions continue undisturbed."""
        old = set(self._servers)
        new = set(config.listeners)
        for listener in old - new:
            # close() only stops accepting: sessions of this listener keep running
            self._servers.pop(listener).close()
            pool = self._pools.pop(listener, None)
            if pool is not None:  # idle upstream connections only; sessions keep theirs
                pool.close()
        self.config = config
        self.login_limiter.configure(
            config.limits.failed_login_burst, config.limits.failed_logins_per_minute
        )
        for listener in config.listeners:
            if listener not in self._servers:
                await self._bind(listener)
        self._announce_exposure()
        log.info(
            "configuration reloaded: %d listeners, %d accounts",
            len(config.listeners),
            len(config.accounts),
        )

    async def stop_listening(self) -> None:
        self.ready = False
        for server in self._servers.values():
            server.close()
        self._servers.clear()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def drain(self, grace: float) -> None:
        """Stop accepting, let sessions finish for `grace` seconds, then cut the rest."""
        await self.stop_listening()
        if self._sessions:
            log.info("draining %d sessions for up to %.0f s", len(self._sessions), grace)
            _, pending = await asyncio.wait(list(self._sessions), timeout=grace)
            if pending:
                for session in list(self._sessions.values()):
                    session.abort()
                await asyncio.wait(pending, timeout=5)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

"""Listeners for every configured port; reload without dropping live sessions; drain.

A `ProxyServer` holds the current configuration. Sessions read it at login time, so a
reload (SIGHUP) applies new accounts and passwords to the next login at once; a
listener whose own settings changed is re-bound, and sessions already running keep the
settings they started with until they end.
"""

from __future__ import annotations

import asyncio
import logging
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
from mailwarden_proxy.relay.pool import UpstreamPool
from mailwarden_proxy.relay.session import ProxySession, SessionContext, TokenSource
from mailwarden_proxy.relay.tls import local_context, upstream_context

log = logging.getLogger("mailwarden.server")

# emailproxy's backlog of 5 overflowed into SYN cookies under bursts; the kernel caps
# this at net.core.somaxconn anyway.
LISTEN_BACKLOG = 4096


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
        self._servers: dict[Listener, asyncio.Server] = {}
        self._pools: dict[Listener, UpstreamPool] = {}
        self._sessions: set[ProxySession] = set()
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

    async def start(self) -> None:
        for listener in self.config.listeners:
            await self._bind(listener)
        self.ready = True

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
        session = ProxySession(ctx, transport)
        self._sessions.add(session)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)

        def finished(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._sessions.discard(session)

        task.add_done_callback(finished)

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
        for listener in config.listeners:
            if listener not in self._servers:
                await self._bind(listener)
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
        if self._tasks:
            log.info("draining %d sessions for up to %.0f s", len(self._tasks), grace)
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                for session in list(self._sessions):
                    session.abort()
                await asyncio.wait(pending, timeout=5)

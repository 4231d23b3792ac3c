"""One proxied client connection: drives a protocol core until login, then splices.

Pre-login, both transports carry a `_Feed` protocol that hands bytes to the core; a
single pump task performs the core's actions in order (writes, TLS upgrades, the local
password check and token fetch). After `Splice`, `splice.splice` takes over both
transports and this object only waits for the end.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

from mailwarden_proxy.catalogue import Diagnosis, Stage, diagnose_token_error
from mailwarden_proxy.config.model import Account, Listener, ProxyConfig, UpstreamTLS
from mailwarden_proxy.localauth import LocalPasswords, Verdict
from mailwarden_proxy.metrics import ProxyMetrics
from mailwarden_proxy.protocols import session as core_api
from mailwarden_proxy.protocols.session import SessionCore
from mailwarden_proxy.protocols.smtp import SmtpCore
from mailwarden_proxy.ratelimit import FailedLoginLimiter, source_key
from mailwarden_proxy.relay import diagnostics
from mailwarden_proxy.relay.limits import GOODBYE
from mailwarden_proxy.relay.listener_metrics import ListenerMetrics
from mailwarden_proxy.relay.reading import CopyingReader
from mailwarden_proxy.relay.splice import SpliceEnd, splice
from mailwarden_proxy.tokens.base import AccessToken, PermanentTokenError, TokenError

if TYPE_CHECKING:
    from mailwarden_proxy.relay.pool import UpstreamPool

log = logging.getLogger("mailwarden.session")


class TokenSource(Protocol):
    async def get(
        self,
        account: Account,
        username: str,
        *,
        force_refresh: bool = False,
        stale: AccessToken | None = None,
    ) -> AccessToken: ...


@dataclass
class SessionContext:
    """What every session of a listener shares; replaced as a whole on reload."""

    listener: Listener
    config: Callable[[], ProxyConfig]  # the current configuration, read at login time
    tokens: TokenSource
    passwords: LocalPasswords
    metrics: ProxyMetrics
    upstream_tls: ssl.SSLContext | None
    local_tls: ssl.SSLContext | None
    make_core: Callable[[bool], SessionCore]  # argument: client connection already TLS
    pool: UpstreamPool | None = None  # warm upstream connections (SMTP listeners)
    # failed local logins by source address: one per proxy, shared by all listeners
    login_limiter: FailedLoginLimiter | None = None
    # accounts the upstream asked to leave alone for a while (IMAP throttling)
    backoffs: diagnostics.Backoffs = field(default_factory=diagnostics.Backoffs)
    bound: ListenerMetrics = field(init=False)
    active: int = field(default=0, init=False)  # sessions of this listener now open
    refusals_logged_at: float = field(default=float("-inf"), init=False)

    def __post_init__(self) -> None:
        self.bound = ListenerMetrics(self.metrics, self.listener)


class _Feed(CopyingReader):
    def __init__(self, on_data: Callable[[bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_data = on_data
        self._on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool | None:
        self._on_lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()
        # the last event: let go of the session, so the transport (which keeps its
        # protocol) and the session (which keeps the transport) make no cycle; see
        # `SpliceEnd.connection_lost`
        self._on_data = self._on_lost = _ignore


def _ignore(*_: object) -> None:
    pass


class ProxySession:
    """A connection until login: the core, the pump task and what the login needs.

    At `Splice` it hands the two transports to a `SplicedSession` (`handover`) and ends;
    `done` resolves when the connection is over, whichever object holds it by then.
    """

    def __init__(
        self,
        ctx: SessionContext,
        client: asyncio.Transport,
        handover: Callable[[SplicedSession], None],
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.core = ctx.make_core(client.get_extra_info("sslcontext") is not None)
        self.peer = _peer_name(client)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handover = handover
        self._wake = asyncio.Event()
        # bytes that arrive after the core finished but before the splice is installed
        self._late_client = bytearray()
        self._late_upstream = bytearray()
        self._username = ""
        self._first_use_password: str | None = None
        self._token: AccessToken | None = None
        self._account: Account | None = None
        # why the pending LoginFailed failed, and the words for the log (token errors)
        self._diagnosis: tuple[Diagnosis, str] | None = None
        # Started on a warm pooled connection that hasn't answered us yet: what we sent
        # it so far (None otherwise). If it turns out dead, a new connection gets these
        # bytes and the client never learns (see `_replace_stale_upstream`).
        self._unanswered: bytearray | None = None
        self._stale_upstream = False
        client.set_protocol(_Feed(self._client_data, self._client_lost))

    # -- feeding the core ----------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        if self.core.finished:
            self._late_client += data
            return
        self.core.receive_client(data)
        self._after_input()

    def _upstream_data(self, data: bytes) -> None:
        if self._unanswered is not None:
            if not self._unanswered:
                # nothing asked, yet it speaks: a parked connection's idle-timeout 421
                # or the like, which our replacement must not see either
                self._upstream_gone_unanswered()
                return
            self._unanswered = None  # the first reply: from here on, as any connection
        if self.core.finished:
            self._late_upstream += data
            return
        self.core.receive_upstream(data)
        self._after_input()

    def _client_lost(self) -> None:
        self.core.client_closed()
        self._wake.set()

    def _upstream_lost(self) -> None:
        if self._unanswered is not None:
            self._upstream_gone_unanswered()
            return
        self.core.upstream_closed()
        self._wake.set()

    def _upstream_gone_unanswered(self) -> None:
        # the pump replaces the connection before it performs the next action
        self._stale_upstream = True
        self._wake.set()

    def _after_input(self) -> None:
        # A queued TLS switch must see no more plaintext from that side: stop reading now,
        # not when the pump gets to it (STARTTLS command injection, CVE-2011-0411 style).
        for action in self.core.actions:
            if isinstance(action, core_api.StartClientTLS):
                self.client.pause_reading()
            elif isinstance(action, core_api.StartUpstreamTLS) and self.upstream is not None:
                self.upstream.pause_reading()
        self._wake.set()

    # -- the pump -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until login; the task ends at the splice, so an idle session holds no task."""
        spliced = False
        try:
            limits = self.ctx.config().limits
            async with asyncio.timeout(limits.login_timeout):
                if not self._take_warm_upstream():
                    await self._connect_upstream()
                spliced = await self._pump()
        except TimeoutError:
            log.info("login not completed in time; closing", extra={"peer": self.peer})
            self.ctx.bound.timeout("login").inc()
            if not self.client.is_closing():  # e.g. a TLS handshake cut short by the timeout
                self.client.write(GOODBYE[self.ctx.listener.protocol].login_timeout)
        except Exception:
            log.exception("session failed", extra={"peer": self.peer})
        finally:
            if not spliced:
                self._close_all()
                _resolve(self.done)

    def _take_warm_upstream(self) -> bool:
        """Start on a pooled connection whose prelude is done; False if there is none."""
        pool = self.ctx.pool
        if pool is None or not isinstance(self.core, SmtpCore):
            return False
        warm = pool.take()
        if warm is None:
            return False
        self.upstream = warm.transport
        warm.transport.set_protocol(_Feed(self._upstream_data, self._upstream_lost))
        self._unanswered = bytearray()
        self.core.resume(warm.extensions, upstream_tls=warm.tls)
        self._wake.set()
        return True

    async def _replace_stale_upstream(self) -> None:
        """The warm connection died before answering anything of ours (every connection
        dropped at once, a FIN in flight when the pool handed it out): continue on a new
        one. Until that first answer the core has sent at most the AUTH command, which is
        safe to send again; once, so a dead upstream still ends as a lost connection."""
        assert self.ctx.pool is not None and self.upstream is not None
        self._stale_upstream = False
        unanswered, self._unanswered = bytes(self._unanswered or b""), None
        old, self.upstream = self.upstream, None
        old.set_protocol(asyncio.Protocol())  # its last events are no longer ours
        old.abort()
        fresh = await self.ctx.pool.connect()
        if fresh is None or fresh.protocol.gone or self.core.finished:
            if fresh is not None:
                fresh.transport.abort()
            self.ctx.bound.upstream_error("connect").inc()
            self.core.upstream_closed()
            return
        log.info(
            "warm upstream connection was gone before the login; continuing on a new one",
            extra={"peer": self.peer},
        )
        self.upstream = fresh.transport
        fresh.transport.set_protocol(_Feed(self._upstream_data, self._upstream_lost))
        if unanswered:
            fresh.transport.write(unanswered)

    async def _connect_upstream(self) -> None:
        upstream = self.ctx.listener.upstream
        loop = asyncio.get_running_loop()
        implicit = upstream.tls is UpstreamTLS.IMPLICIT
        try:
            async with asyncio.timeout(self.ctx.config().limits.connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: _Feed(self._upstream_data, self._upstream_lost),
                    upstream.host,
                    upstream.port,
                    ssl=self.ctx.upstream_tls if implicit else None,
                    server_hostname=upstream.host if implicit else None,
                )
        except (OSError, TimeoutError) as exc:
            kind = "tls" if isinstance(exc, ssl.SSLError) else "connect"
            self.ctx.bound.upstream_error(kind).inc()
            diagnostics.report_unreachable(
                exc,
                listener=self.ctx.listener.name,
                address=f"{upstream.host}:{upstream.port}",
                detail=_failure(exc),
                peer=self.peer,
            )
            self.core.upstream_closed()
            return
        self.upstream = transport

    async def _pump(self) -> bool:
        """Perform actions until Splice (True) or Close (False)."""
        while True:
            if self._stale_upstream:
                await self._replace_stale_upstream()
            action = self.core.next_action()
            if action is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            match action:
                case core_api.SendClient(data):
                    self.client.write(data)
                case core_api.SendUpstream(data):
                    if self._unanswered is not None:
                        self._unanswered += data
                    # closing: a failed STARTTLS handshake; the core is already ending
                    if self.upstream is not None and not self.upstream.is_closing():
                        self.upstream.write(data)
                case core_api.StartClientTLS():
                    await self._start_client_tls()
                case core_api.StartUpstreamTLS():
                    await self._start_upstream_tls()
                case core_api.Authenticate(username, password):
                    await self._authenticate(username, password)
                case core_api.NeedFreshToken(status):
                    await self._refresh_token(status)
                case core_api.LoginSucceeded(username):
                    self._login_succeeded(username)
                case core_api.LoginFailed(username, kind, detail):
                    self._login_failed(username, kind, detail)
                case core_api.Splice(to_upstream, to_client):
                    self._splice(to_upstream, to_client)
                    return True
                case core_api.Close(reason):
                    log.debug("closing session: %s", reason, extra={"peer": self.peer})
                    self._close_all()
                    return False

    async def _start_client_tls(self) -> None:
        if self.ctx.local_tls is None:  # the core only offers STARTTLS when configured
            self._close_all()
            return
        loop = asyncio.get_running_loop()
        protocol = self.client.get_protocol()
        new = await loop.start_tls(self.client, protocol, self.ctx.local_tls, server_side=True)
        assert new is not None
        self.client = new

    async def _start_upstream_tls(self) -> None:
        assert self.upstream is not None and self.ctx.upstream_tls is not None
        loop = asyncio.get_running_loop()
        protocol = self.upstream.get_protocol()
        host, port = self.ctx.listener.upstream.host, self.ctx.listener.upstream.port
        try:
            # bounded like the implicit-TLS handshake, which runs inside the connect timeout
            async with asyncio.timeout(self.ctx.config().limits.connect_timeout):
                new = await loop.start_tls(
                    self.upstream, protocol, self.ctx.upstream_tls, server_hostname=host
                )
        except (OSError, ssl.SSLError) as exc:  # TimeoutError is an OSError
            self.ctx.bound.upstream_error("tls").inc()
            diagnostics.report_unreachable(
                exc,
                listener=self.ctx.listener.name,
                address=f"{host}:{port}",
                detail=f"STARTTLS failed: {_failure(exc)}",
                peer=self.peer,
            )
            self.upstream.abort()  # unusable, and nothing queued may go out in plain text
            self.core.upstream_closed()
            return
        assert new is not None
        self.upstream = new

    # -- login ----------------------------------------------------------------------------

    async def _authenticate(self, username: str, password: str) -> None:
        self._username = username
        limiter = self.ctx.login_limiter
        source = source_key(self.peer.rpartition(":")[0]) if limiter is not None else ""
        if limiter is not None and limiter.blocked(source):
            # refused unchecked: guessing gets no answer; the delay slows the loop down
            await asyncio.sleep(self.ctx.config().limits.failed_login_delay)
            self.core.reject_login(rate_limited=True)
            return
        account = self.ctx.config().account_for(username)
        verdict = self.ctx.passwords.verify(account, username, password)
        if account is None or verdict is Verdict.REJECT:
            if limiter is not None and limiter.failed(source):
                log.warning(
                    "too many failed local logins from %s: further logins from there are "
                    "refused unchecked until the rate limit lets one through "
                    "(limits.failedLocalLogins)",
                    source,
                    extra={"peer": self.peer},
                )
            self.core.reject_login()
            return
        self._account = account
        self._first_use_password = password if verdict is Verdict.ACCEPT_FIRST_USE else None
        await self._fetch_and_provide(force_refresh=False)

    async def _refresh_token(self, status: str) -> None:
        log.info("upstream refused the token (status %s); retrying with a fresh one", status)
        await self._fetch_and_provide(force_refresh=True)

    async def _fetch_and_provide(self, *, force_refresh: bool) -> None:
        account = self._account
        assert account is not None
        upstream_user = account.upstream_username or self._username
        wait = self.ctx.backoffs.remaining(self._username, time.monotonic())
        if wait > 0:  # the upstream asked for a break: don't ask it again before then
            self._diagnosis = (diagnostics.throttled(wait), "")
            self.core.token_unavailable(permanent=False)
            return
        try:
            token = await self.ctx.tokens.get(
                account, self._username, force_refresh=force_refresh, stale=self._token
            )
        except TokenError as exc:  # logged with its diagnosis by `_login_failed`
            diagnosis = diagnose_token_error(exc.code, exc.description, username=upstream_user)
            self._diagnosis = (diagnosis, str(exc))  # "code: description", scrubbed
            self.core.token_unavailable(permanent=isinstance(exc, PermanentTokenError))
            return
        self._token = token
        self.core.provide_token(upstream_user, token.value.reveal(), account.mechanism)

    def _login_succeeded(self, username: str) -> None:
        if self._first_use_password is not None:
            self.ctx.passwords.learn(username, self._first_use_password)
            self._first_use_password = None
        self.ctx.bound.login("ok").inc()
        # DEBUG: one INFO line per login was 1.4 % of the proxy's CPU on short SMTP
        # sessions; the counter above has the figure, failures stay at INFO
        log.debug("login ok for %s", username, extra={"peer": self.peer})

    def _login_failed(self, username: str, kind: core_api.FailureKind, detail: str) -> None:
        self._first_use_password = None
        self.ctx.bound.login(kind.value).inc()
        if kind in (core_api.FailureKind.UPSTREAM_ERROR, core_api.FailureKind.NOT_CONNECTED):
            self.ctx.bound.upstream_error(kind.value).inc()
        if self._token is not None and self._token.value.reveal() in detail:
            detail = ""  # never log a credential, whatever the upstream echoed
        account = self.ctx.config().account_for(username)
        known, self._diagnosis = self._diagnosis, None
        if known is not None:
            diagnosis, detail = known
        else:
            upstream_user = (account.upstream_username if account else None) or username
            diagnosis = diagnostics.diagnose(
                kind,
                detail,
                stage=Stage(self.ctx.listener.protocol.value),
                known_user=account is not None,
                upstream_user=upstream_user,
            )
        diagnostics.hold_if_throttled(
            self.ctx.backoffs, diagnosis, username, detail, time.monotonic()
        )
        diagnostics.report(
            diagnosis,
            metrics=self.ctx.metrics,
            listener=self.ctx.listener.name,
            account=username,
            detail=detail,
            peer=self.peer,
        )

    # -- the end of the pre-login phase ---------------------------------------------------

    def _splice(self, to_upstream: bytes, to_client: bytes) -> None:
        upstream = self.upstream
        assert upstream is not None
        self.client.pause_reading()
        upstream.pause_reading()
        if to_upstream or self._late_client:
            upstream.write(to_upstream + bytes(self._late_client))
        if to_client or self._late_upstream:
            self.client.write(to_client + bytes(self._late_upstream))
        bound = self.ctx.bound
        done = self.done
        end = splice(
            self.client,
            upstream,
            bound.relayed_up.inc,
            bound.relayed_down.inc,
            partial(_resolve, done),
        )
        self._handover(SplicedSession(self.ctx, self.peer, end, done))

    def close_if_idle(self, now: float, timeout: float) -> bool:
        """Before login the login timeout applies instead."""
        return False

    def _close_all(self) -> None:
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def abort(self) -> None:
        """Drop the connection now (shutdown after the drain period); the pump sees both
        sides lost, ends, and `done` resolves."""
        self.client.abort()
        if self.upstream is not None:
            self.upstream.abort()


class SplicedSession:
    """A session after login: only what the idle sweep, the drain and the end need.

    The core, the pump task and the login state of `ProxySession` are gone by now: with
    1,000 idle IMAP sessions they were ~5 KB each (bench/README.md).
    """

    __slots__ = ("ctx", "done", "end", "peer")

    def __init__(
        self, ctx: SessionContext, peer: str, end: SpliceEnd, done: asyncio.Future[None]
    ) -> None:
        self.ctx = ctx
        self.peer = peer
        self.end = end  # the client's end; its `peer` is the upstream's
        self.done = done

    def close_if_idle(self, now: float, timeout: float) -> bool:
        """Close both sides, with a goodbye to the client, when no bytes moved either way
        for `timeout` seconds (the server's idle sweep calls this)."""
        client = self.end.transport
        if client is None or client.is_closing() or now - self.end.idle_since < timeout:
            return False
        log.info("no traffic for %.0f s after login; closing", timeout, extra={"peer": self.peer})
        self.ctx.bound.timeout("idle").inc()
        client.write(GOODBYE[self.ctx.listener.protocol].idle_timeout)
        self.end.close()  # closes the upstream end too, then resolves `done`
        return True

    def abort(self) -> None:
        """Drop the connection now (shutdown after the drain period)."""
        for end in (self.end, self.end.peer):
            if end is not None and end.transport is not None:
                end.transport.abort()
        _resolve(self.done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _failure(exc: BaseException) -> str:
    """An upstream connection failure for the log; a certificate problem says so plainly
    (the login was never sent), and an exception without text is named by its class."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message.rstrip('.')}; not logging in"
    if isinstance(exc, TimeoutError):
        return exc.__class__.__name__
    return str(exc) or exc.__class__.__name__


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)

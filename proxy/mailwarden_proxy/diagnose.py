"""`doctor`: walk the chain the proxy depends on, one step at a time, and say what broke.

For every upstream of the configuration (IMAP, then POP3, then SMTP) the steps are:

    DNS          the host's addresses
    TCP          a connection to the first address that answers
    TLS          the handshake (implicit TLS; after the greeting and STARTTLS/STLS otherwise)
    certificate  subject, issuer, expiry, names and the host name check, verified against the
                 configured CA file plus the system store, exactly as the proxy verifies
    greeting     the server's greeting and capabilities
    token        one token request to the identity provider (the first time a chain needs it)
    login        XOAUTH2/OAUTHBEARER as the proxy sends it (`diagnose_client`)
    follow-up    IMAP NOOP + EXAMINE INBOX, POP3 STAT, SMTP MAIL FROM + RSET (or NOOP)

Each result is printed as soon as it is known; a chain stops at its first failure, which
gets the error catalogue's hint (provider failures) or a transport hint (DNS, TCP, TLS).
The token is requested once and reused by every chain; when it cannot be had, the other
chains still check DNS, TCP and TLS and skip the login. The exit code is 0 when every step
passed, 1 otherwise; `SetupError` (no usable account) is the callers' exit code 2.

When the certificate check fails, a second connection fetches the certificate without
verification, only to show it; nothing is sent over that connection after the handshake.
Tokens, secrets and passwords never reach the output: the token step shows the token's
length, expiry and claims, and server text that contains the credential is withheld.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from mailwarden_proxy import catalogue
from mailwarden_proxy.catalogue import Diagnosis, Stage
from mailwarden_proxy.config.model import (
    Account,
    MailProtocol,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.diagnose_client import (
    Conversation,
    ExchangeError,
    LoginResult,
    conversation_for,
)
from mailwarden_proxy.diagnose_report import (
    StepResult,
    certificate_summary,
    connect_failure,
    duration,
    failed,
    format_certificate,
    format_heading,
    format_step,
    format_summary,
    format_token,
    jwt_claims,
    passed,
    printable,
    skipped,
    trust_source,
    verify_failure,
)
from mailwarden_proxy.relay.tls import upstream_context
from mailwarden_proxy.tokens.base import TokenError

# IMAP and POP3 first: a login there proves the token without touching any mail
_ORDER = {MailProtocol.IMAP: 0, MailProtocol.POP3: 1, MailProtocol.SMTP: 2}
_STREAM_LIMIT = 256 * 1024


class SetupError(Exception):
    """The diagnosis cannot start: the configuration has no account for the request."""


@dataclass(frozen=True)
class Options:
    timeout: float = 15.0  # seconds per step
    protocols: frozenset[MailProtocol] = frozenset(MailProtocol)
    mail_from: bool = True  # SMTP follow-up: MAIL FROM + RSET (else NOOP)


def pick_account(config: ProxyConfig, username: str | None) -> tuple[Account, str]:
    """The account to diagnose and the mailbox to log in as."""
    if username is None:
        named = [a for a in config.accounts if not a.is_catch_all]
        if len(config.accounts) != 1 or not named:
            listed = ", ".join(a.username for a in config.accounts)
            raise SetupError(f"the configuration has accounts {listed}: pass --username")
        return named[0], named[0].username
    account = config.account_for(username)
    if account is None:
        raise SetupError(f"no account of the configuration serves {username}")
    return account, username


def _secrets_of(account: Account) -> list[str]:
    oauth2 = account.oauth2
    held = (
        oauth2.client_secret,
        oauth2.refresh_token,
        oauth2.password,
        oauth2.service_account_key,
        account.local_password,
    )
    return [s.reveal() for s in held if s]


def _named(reason: str, code: str) -> Diagnosis:
    return Diagnosis(catalogue.by_reason(reason), code)


# the catalogue's entries for what goes wrong between the connection and the login
_MODE_MISMATCH = "TlsModeMismatch"
_LOST = "UpstreamConnectionLost"


@dataclass
class _Chain:
    """One upstream's walk: which step is running, and its connection."""

    protocol: MailProtocol
    upstream: Upstream
    step: str = "DNS"
    address: str = ""
    conversation: Conversation | None = None


class Doctor:
    def __init__(
        self,
        config: ProxyConfig,
        account: Account,
        username: str,
        out: TextIO,
        *,
        options: Options | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.account = account
        self.username = username
        self.upstream_username = account.upstream_username or username
        self.out = out
        self.options = options or Options()
        self.clock = clock
        self.results: list[StepResult] = []
        self._secrets = _secrets_of(account)
        self._token: str | None = None
        self._token_tried = False

    # -- output ------------------------------------------------------------------------------

    def _emit(self, result: StepResult) -> StepResult:
        self.results.append(result)
        for line in format_step(result):
            print(line, file=self.out, flush=True)
        return result

    def _clean(self, text: str) -> str:
        return printable(text, [*self._secrets, *([self._token] if self._token else [])])

    # -- the run -----------------------------------------------------------------------------

    def upstreams(self) -> list[tuple[MailProtocol, Upstream]]:
        seen: dict[tuple[MailProtocol, Upstream], None] = {}
        for lst in sorted(self.config.listeners, key=lambda lst: _ORDER[lst.protocol]):
            if lst.protocol in self.options.protocols:
                seen.setdefault((lst.protocol, lst.upstream), None)
        return list(seen)

    async def run(self) -> bool:
        chains = self.upstreams()
        if not chains:
            raise SetupError("the configuration has no listener for the protocols asked for")
        for protocol, upstream in chains:
            print(
                format_heading(protocol, upstream.host, upstream.port, upstream.tls),
                file=self.out,
                flush=True,
            )
            chain = _Chain(protocol, upstream)
            try:
                await self._walk(chain)
            finally:
                if chain.conversation is not None:
                    await chain.conversation.close()
        print(format_summary(self.results), file=self.out, flush=True)
        return not any(r.failed for r in self.results)

    async def _walk(self, chain: _Chain) -> None:
        timeout = self.options.timeout
        try:
            if not await self._dns_and_tcp(chain):
                return
            conv = chain.conversation
            assert conv is not None
            tls = chain.upstream.tls
            if tls is UpstreamTLS.IMPLICIT and not await self._tls(chain):
                return
            chain.step = "greeting"
            async with asyncio.timeout(timeout):
                greeting = await conv.greet()
                await conv.capabilities()
            if tls is UpstreamTLS.STARTTLS:
                if not conv.starttls_offered():
                    refusal = _named(_MODE_MISMATCH, "STARTTLS not offered")
                    self._emit(failed("greeting", f"{greeting}; STARTTLS not offered", refusal))
                    return
                self._emit(passed("greeting", f"{greeting}; STARTTLS offered"))
                chain.step = "STARTTLS"
                async with asyncio.timeout(timeout):
                    await conv.starttls()
                if not await self._tls(chain):
                    return
                chain.step = "capabilities"
                async with asyncio.timeout(timeout):
                    await conv.capabilities()
            else:
                self._emit(passed("greeting", greeting))
            if tls is UpstreamTLS.NONE:
                self._emit(skipped("TLS", "off (allowInsecure): the token travels in clear text"))
            await self._login_and_follow_up(chain, conv)
        except ExchangeError as exc:
            reply = self._clean(exc.reply)
            detail = f"{exc}: {reply}" if reply else str(exc)
            hint: Diagnosis | None
            if chain.step == "STARTTLS":
                hint = _named(_MODE_MISMATCH, reply or str(exc))
            elif reply:
                hint = self._diagnose_reply(chain, reply)
            else:
                hint = _named(_LOST, str(exc))
            self._emit(failed(chain.step, detail, hint))
        except TimeoutError:
            # a server that waits for a TLS ClientHello while we wait for its greeting
            mismatch = chain.step == "greeting" and chain.upstream.tls is not UpstreamTLS.IMPLICIT
            hint = _named(_MODE_MISMATCH if mismatch else _LOST, "timeout")
            self._emit(failed(chain.step, f"no answer within {timeout:g} s", hint))
        except (OSError, ssl.SSLError) as exc:
            detail = self._clean(str(exc) or type(exc).__name__)
            hint = _named(_LOST, type(exc).__name__)
            self._emit(failed(chain.step, f"connection broke: {detail}", hint))

    def _diagnose_reply(self, chain: _Chain, reply: str, challenge: str = "") -> Diagnosis | None:
        """The catalogue's reading of a server's refusal (with the error challenge that
        preceded it, if any)."""
        stage = Stage(chain.protocol.value)  # the catalogue's stages imap, pop3, smtp
        text = f"{reply} {challenge}".strip()
        return catalogue.diagnose_reply(stage, text, username=self.upstream_username)

    # -- DNS, TCP ------------------------------------------------------------------------------

    async def _dns_and_tcp(self, chain: _Chain) -> bool:
        host, port = chain.upstream.host, chain.upstream.port
        timeout = self.options.timeout
        loop = asyncio.get_running_loop()
        chain.step = "DNS"
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, TimeoutError) as exc:
            text = exc.strerror if isinstance(exc, socket.gaierror) else None
            detail = f"{host}: {text or f'no answer within {timeout:g} s'}"
            self._emit(failed("DNS", detail, catalogue.diagnose_connection(exc)))
            return False
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        literal = _is_address(host)
        self._emit(
            passed(
                "DNS", "an IP address, no lookup" if literal else f"{host} → {', '.join(addresses)}"
            )
        )
        chain.step = "TCP"
        errors: list[str] = []
        last: OSError | TimeoutError | None = None
        for address in addresses:
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(
                        address, port, limit=_STREAM_LIMIT
                    )
            except (OSError, TimeoutError) as exc:
                last = exc
                detail = connect_failure(exc, timeout)
                errors.append(f"{_hostport(address, port)}: {detail}")
                continue
            chain.address = address
            chain.conversation = conversation_for(
                chain.protocol, reader, writer, self.config.limits.max_line
            )
            tried = f" (after {'; '.join(errors)})" if errors else ""
            elapsed = duration(time.monotonic() - started)
            self._emit(
                passed("TCP", f"connected to {_hostport(address, port)} in {elapsed}{tried}")
            )
            return True
        assert last is not None
        self._emit(failed("TCP", "; ".join(errors), catalogue.diagnose_connection(last)))
        return False

    # -- TLS and the certificate ------------------------------------------------------------

    async def _tls(self, chain: _Chain) -> bool:
        conv = chain.conversation
        assert conv is not None
        upstream = chain.upstream
        chain.step = "TLS"
        try:
            context = upstream_context(upstream)
        except (OSError, ssl.SSLError) as exc:
            detail = f"cannot load the CA file {upstream.ca_file}: {exc}"
            self._emit(failed("TLS", detail, _named("UpstreamCertificateInvalid", "ca_file")))
            return False
        try:
            async with asyncio.timeout(self.options.timeout):
                await conv.writer.start_tls(context, server_hostname=upstream.host)
        except ssl.SSLCertVerificationError as exc:
            await self._certificate_refused(chain, exc)
            return False
        except ssl.SSLError as exc:
            detail = exc.reason or str(exc)
            self._emit(failed("TLS", detail, catalogue.diagnose_connection(exc)))
            return False
        except (ConnectionError, TimeoutError) as exc:
            detail = (
                "no answer to the handshake"
                if isinstance(exc, TimeoutError)
                else "the server closed the connection during the handshake"
            )
            # a plaintext server waits for our command, or hangs up on a ClientHello
            self._emit(failed("TLS", detail, _named(_MODE_MISMATCH, type(exc).__name__)))
            return False
        ssl_object = conv.writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        cipher = ssl_object.cipher()
        self._emit(passed("TLS", f"{ssl_object.version()}, {cipher[0] if cipher else '?'}"))
        der = ssl_object.getpeercert(binary_form=True)
        lines = [f"trusted: chains to {trust_source(upstream.ca_file)}"]
        if der:
            lines = [
                *format_certificate(certificate_summary(der), self.clock(), upstream.host),
                *lines,
            ]
        self._emit(passed("certificate", "\n".join(lines)))
        return True

    async def _certificate_refused(self, chain: _Chain, exc: ssl.SSLCertVerificationError) -> None:
        upstream = chain.upstream
        detail = verify_failure(exc.verify_code, exc.verify_message)
        shown = await self._fetch_unverified(chain)
        lines = [f"{detail} (verified against {trust_source(upstream.ca_file)})"]
        if shown is not None:
            version, der = shown
            self._emit(passed("TLS", f"{version} (the handshake works; the certificate does not)"))
            with contextlib.suppress(ValueError):
                summary = certificate_summary(der)
                lines += format_certificate(summary, self.clock(), upstream.host)
        self._emit(failed("certificate", "\n".join(lines), catalogue.diagnose_connection(exc)))

    async def _fetch_unverified(self, chain: _Chain) -> tuple[str, bytes] | None:
        """(TLS version, DER certificate) over a new connection that checks nothing: only for
        showing what the server presents. Nothing is sent after the handshake."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        upstream = chain.upstream
        conv: Conversation | None = None
        try:
            async with asyncio.timeout(self.options.timeout):
                reader, writer = await asyncio.open_connection(
                    chain.address, upstream.port, limit=_STREAM_LIMIT
                )
                conv = conversation_for(chain.protocol, reader, writer, self.config.limits.max_line)
                if upstream.tls is UpstreamTLS.STARTTLS:
                    await conv.greet()
                    await conv.capabilities()
                    await conv.starttls()
                await writer.start_tls(context, server_hostname=upstream.host)
                ssl_object = writer.get_extra_info("ssl_object")
                if not isinstance(ssl_object, ssl.SSLObject):
                    return None
                der = ssl_object.getpeercert(binary_form=True)
                return (ssl_object.version() or "TLS", der) if der else None
        except (OSError, TimeoutError, ssl.SSLError, ExchangeError):
            return None
        finally:
            if conv is not None:
                conv.writer.transport.abort()

    # -- token, login, follow-up ---------------------------------------------------------

    async def _fetch_token(self) -> str | None:
        """The access token, requested once per run (its step printed that one time)."""
        if self._token_tried:
            return self._token
        self._token_tried = True
        from mailwarden_proxy.tokens.factory import provider_for

        oauth2 = self.account.oauth2
        where = urlsplit(oauth2.token_url).hostname or oauth2.token_url
        timeout = self.options.timeout
        started = time.monotonic()
        try:
            provider = provider_for(self.account, timeout=timeout)
            async with asyncio.timeout(timeout + 5):
                token = await asyncio.to_thread(provider.fetch, self.username)
        except TokenError as exc:
            text = self._clean(f"{exc.code}: {exc.description}" if exc.description else exc.code)
            hint = catalogue.diagnose_token_error(
                exc.code, exc.description, username=self.upstream_username
            )
            self._emit(failed("token", f"{where}: {text}", hint))
            return None
        except TimeoutError:
            detail = f"{where}: no answer within {timeout:g} s"
            self._emit(failed("token", detail, catalogue.diagnose_token_error("timeout", "")))
            return None
        except ValueError as exc:  # no provider for this flow (validation should prevent it)
            self._emit(failed("token", self._clean(str(exc))))
            return None
        value = token.value.reveal()
        self._token = value
        summary = format_token(len(value), token.expires_at, self.clock(), jwt_claims(value))
        elapsed = duration(time.monotonic() - started)
        self._emit(
            passed("token", f"{oauth2.flow} at {where} in {elapsed}\n{self._clean(summary)}")
        )
        return value

    async def _login_and_follow_up(self, chain: _Chain, conv: Conversation) -> None:
        first = not self._token_tried
        chain.step = "token"
        token = await self._fetch_token()
        if token is None:
            self._emit(skipped("login", "no token"))
            return
        if not first:
            self._emit(passed("token", "the one above"))
        mechanism = self.account.mechanism
        name = mechanism.value.upper()
        chain.step = "login"
        upstream = chain.upstream
        async with asyncio.timeout(self.options.timeout):
            result: LoginResult = await conv.login(
                self.upstream_username, token, mechanism, upstream.host, upstream.port
            )
        offered = "" if conv.offers(mechanism) else f" (the server does not announce {name})"
        who = f"{name} as {self.upstream_username}"
        if not result.ok:
            challenge = (
                f"; error challenge {self._clean(result.challenge)}" if result.challenge else ""
            )
            detail = f"{who}{offered}: {self._clean(result.reply)}{challenge}"
            hint = self._diagnose_reply(chain, result.reply, result.challenge)
            self._emit(failed("login", detail, hint))
            return
        self._emit(passed("login", f"{who}: {self._clean(result.reply)}"))
        chain.step = "follow-up"
        sender = self.upstream_username if self.options.mail_from else ""
        async with asyncio.timeout(self.options.timeout):
            follow_ups = await conv.follow_up(sender)
        for follow_up in follow_ups:
            if follow_up.ok:
                self._emit(passed(follow_up.name, self._clean(follow_up.reply)))
            else:
                hint = self._diagnose_reply(chain, follow_up.reply)
                self._emit(failed(follow_up.name, self._clean(follow_up.reply), hint))
                return
        with contextlib.suppress(ExchangeError, OSError, TimeoutError):
            async with asyncio.timeout(self.options.timeout):
                await conv.quit()


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def run_diagnosis(
    config: ProxyConfig,
    *,
    username: str | None,
    label: str,
    out: TextIO,
    options: Options | None = None,
) -> int:
    """Diagnose `config` for `username` (or its only account); 0 all passed, 1 a step failed.
    Raises `SetupError` when there is nothing to diagnose (callers exit with 2)."""
    account, username = pick_account(config, username)
    doctor = Doctor(config, account, username, out, options=options)
    if not doctor.upstreams():
        raise SetupError("the configuration has no listener for the protocols asked for")
    oauth2 = account.oauth2
    served = f" (account {account.username})" if account.is_catch_all else ""
    print(
        f"diagnosing {label} as {username}{served}: {oauth2.provider}, {oauth2.flow}, "
        f"{account.mechanism.value.upper()}",
        file=out,
        flush=True,
    )
    return 0 if asyncio.run(doctor.run()) else 1

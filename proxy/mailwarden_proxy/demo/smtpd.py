"""A local submission server that demands OAuth 2.0, for the demo and the tests.

It behaves like Gmail's and Microsoft 365's submission endpoints where it matters to a
proxy: `AUTH XOAUTH2` and `AUTH OAUTHBEARER` only (no PLAIN/LOGIN), the token either
as an initial response or after an empty `334 ` challenge, a rejected token answered
with the JSON error challenge (`{"status":"401",…}` for XOAUTH2, `{"status":
"invalid_token",…}` for OAUTHBEARER) that the client must acknowledge (empty line,
respectively `AQ==`) before the final `535 5.7.8`, and `530` for mail sent without
logging in. Tokens are checked by a callable, normally `LocalIdP.is_valid`.

Scripted failures for tests: `reject_next_tokens(n)` (valid tokens refused), a temporary
failure switch (`454 4.7.0` to AUTH) and `script_reply()` for MAIL/RCPT/DATA replies, and
for AUTH (the reply to the token, e.g. Microsoft's `535 5.7.139 …`).
Received messages (`.messages`) and every authentication attempt (`.attempts`;
`.auth_attempts` counts them) are kept in memory.

Runs its own asyncio loop in a daemon thread; binds port 0 by default::

    with LocalSubmissionServer(idp.is_valid, tls="starttls", cert=cert) as server:
        smtplib.SMTP("127.0.0.1", server.port) ...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import json
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from mailwarden_proxy.demo.tlsca import IssuedCert

TlsMode = Literal["implicit", "starttls", "none"]
Validator = Callable[[str, str], bool]

MECHANISMS = ("XOAUTH2", "OAUTHBEARER")
XOAUTH2_ERROR = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
OAUTHBEARER_ERROR = {
    "status": "invalid_token",
    "schemes": "bearer",
    "scope": "https://mail.google.com/",
}
REPLY_AUTH_OK = "235 2.7.0 Accepted"
REPLY_AUTH_REJECTED = "535 5.7.8 Username and Password not accepted"
REPLY_AUTH_TEMPORARY = "454 4.7.0 Temporary authentication failure, try again later"
REPLY_MALFORMED = "501 5.5.2 Cannot decode the authentication response"
MAX_LINE = 16384  # tokens from Microsoft reach ~2.5 KB; be generous like Gmail


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH exchange as the server saw it."""

    mechanism: str
    username: str | None
    token: str | None
    outcome: Literal["accepted", "rejected", "temporary", "malformed", "aborted"]
    initial_response: bool  # the token came inline with AUTH (not after the 334)
    error_response: bytes | None = None  # the client's answer to the error challenge
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    username: str | None  # who authenticated the session
    tls: bool

    @property
    def subject(self) -> str | None:
        for line in self.content.split(b"\r\n\r\n", 1)[0].splitlines():
            if line.lower().startswith(b"subject:"):
                return line[8:].strip().decode(errors="replace")
        return None


@dataclass
class _Script:
    rejected_tokens: int = 0
    temporary: int | None = 0  # None: until switched off; n: the next n AUTH commands
    replies: dict[str, collections.deque[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )


def parse_xoauth2(raw: bytes) -> tuple[str, str] | None:
    """`user=<u>^Aauth=Bearer <t>^A^A` → (user, token); None if malformed."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    fields = dict(part.split("=", 1) for part in text.split("\x01") if "=" in part)
    user, auth = fields.get("user"), fields.get("auth", "")
    if not user or not auth.startswith("Bearer ") or not text.endswith("\x01\x01"):
        return None
    return user, auth[7:]


def parse_oauthbearer(raw: bytes) -> tuple[str, str] | None:
    """RFC 7628 `n,a=<u>,^Aauth=Bearer <t>^A[k=v^A]...^A` → (user, token)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    gs2, sep, rest = text.partition("\x01")
    if not sep or not rest.endswith("\x01\x01"):
        return None
    user = next((p[2:] for p in gs2.split(",") if p.startswith("a=")), "")
    user = user.replace("=2C", ",").replace("=3D", "=")
    fields = dict(part.split("=", 1) for part in rest.split("\x01") if "=" in part)
    auth = fields.get("auth", "")
    if not user or not auth.startswith("Bearer "):
        return None
    return user, auth[7:]


class _Handler:
    """aiosmtpd handler: `auth_<MECH>` methods add the mechanisms. Holds no state itself
    (aiosmtpd treats every attribute named `auth_*` as a mechanism)."""

    def __init__(self, owner: LocalSubmissionServer) -> None:
        self._owner = owner

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> Any:
        return await self._owner._authenticate(server, args, "XOAUTH2")

    async def auth_OAUTHBEARER(self, server: Any, args: list[str]) -> Any:
        return await self._owner._authenticate(server, args, "OAUTHBEARER")

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        scripted = self._owner._scripted("MAIL")
        if scripted:
            return scripted
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        scripted = self._owner._scripted("RCPT")
        if scripted:
            return scripted
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        scripted = self._owner._scripted("DATA")
        if scripted:
            return scripted
        content = envelope.original_content or envelope.content or b""
        message = ReceivedMessage(
            mail_from=str(envelope.mail_from),
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=bytes(content),
            username=session.auth_data if isinstance(session.auth_data, str) else None,
            tls=self._owner.tls == "implicit" or session.ssl is not None,
        )
        self._owner._store(message)
        return "250 2.0.0 OK: queued"


class _SMTP(SMTP):
    """aiosmtpd's SMTP with long AUTH lines allowed and per-instance size limits
    (aiosmtpd's `command_size_limits` is a class attribute shared by all servers)."""

    line_length_limit = MAX_LINE + 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command_size_limits: collections.defaultdict[str, int] = collections.defaultdict(
            lambda: SMTP.command_size_limit
        )
        self.command_size_limits["AUTH"] = MAX_LINE


class LocalSubmissionServer:
    """See the module docstring. Thread-safe accessors; use as a context manager."""

    def __init__(
        self,
        validate: Validator,
        *,
        tls: TlsMode = "starttls",
        cert: IssuedCert | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "submission.mailwarden.test",
    ) -> None:
        if tls != "none" and cert is None:
            raise ValueError(f"tls={tls!r} needs a certificate")
        self.validate = validate
        self.tls: TlsMode = tls
        self.host = host
        self.hostname = hostname
        self._requested_port = port
        self._context: ssl.SSLContext | None = None
        if cert is not None and tls != "none":
            self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._context.load_cert_chain(cert.cert_path, cert.key_path)
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._attempts: list[AuthAttempt] = []
        self._script = _Script()
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[_SMTP] = weakref.WeakSet()
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalSubmissionServer:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(self._listen())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="mailwarden-smtpd", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._protocol,
            self.host,
            self._requested_port,
            ssl=self._context if self.tls == "implicit" else None,
            backlog=1024,
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    def _protocol(self) -> _SMTP:
        assert self._loop is not None
        protocol = _SMTP(
            _Handler(self),
            hostname=self.hostname,
            ident="mailwarden test submission",
            tls_context=self._context if self.tls == "starttls" else None,
            require_starttls=self.tls == "starttls",
            # MAIL without AUTH is refused in handle_MAIL: aiosmtpd's auth_required warns
            # whenever auth_require_tls is off, which implicit TLS needs
            auth_required=False,
            # aiosmtpd counts only STARTTLS as TLS; with implicit TLS the channel is secure
            auth_require_tls=self.tls == "starttls",
            auth_exclude_mechanism=["PLAIN", "LOGIN"],
            loop=self._loop,
        )
        with self._lock:
            self._connections += 1
        self._protocols.add(protocol)
        return protocol

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for protocol in list(self._protocols):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.close()
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = self._server = None

    def __enter__(self) -> LocalSubmissionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what happened -------------------------------------------------------------------
    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def attempts(self) -> list[AuthAttempt]:
        """Every AUTH exchange so far, in order."""
        with self._lock:
            return list(self._attempts)

    @property
    def auth_attempts(self) -> int:
        """How many AUTH commands reached this server."""
        with self._lock:
            return len(self._attempts)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        deadline = time.monotonic() + timeout
        while len(found := self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return found

    # -- scripting -----------------------------------------------------------------------
    def reject_next_tokens(self, count: int = 1) -> None:
        """The next `count` tokens are refused (error challenge, then 535) even if valid."""
        with self._lock:
            self._script.rejected_tokens += count

    def fail_temporarily(self, count: int | None = None) -> None:
        """Answer AUTH with `454 4.7.0`: the next `count` times, or until `recover()`."""
        with self._lock:
            self._script.temporary = count

    def recover(self) -> None:
        """Ends `fail_temporarily()`."""
        with self._lock:
            self._script.temporary = 0

    def script_reply(
        self, command: Literal["MAIL", "RCPT", "DATA", "AUTH"], reply: str, count: int = 1
    ) -> None:
        """Answer the next `count` MAIL/RCPT/DATA commands with `reply` (e.g. `452 4.2.2 Full`);
        for AUTH, the next `count` well-formed tokens, valid or not."""
        with self._lock:
            self._script.replies[command].extend([reply] * count)

    def reset(self) -> None:
        """Forgets messages, attempts and scripted failures."""
        with self._lock:
            self._messages.clear()
            self._attempts.clear()
            self._script = _Script()
            self._connections = 0

    # -- called on the server's loop -----------------------------------------------------
    def _scripted(self, command: str) -> str | None:
        with self._lock:
            queue = self._script.replies.get(command)
            return queue.popleft() if queue else None

    def _store(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)

    def _record(self, attempt: AuthAttempt) -> None:
        with self._lock:
            self._attempts.append(attempt)

    def _take_temporary(self) -> bool:
        with self._lock:
            remaining = self._script.temporary
            if remaining is None:
                return True
            if remaining > 0:
                self._script.temporary = remaining - 1
                return True
            return False

    def _check(self, token: str, username: str) -> bool:
        with self._lock:
            if self._script.rejected_tokens > 0:
                self._script.rejected_tokens -= 1
                return False
        return self.validate(token, username)

    async def _authenticate(self, server: Any, args: list[str], mechanism: str) -> Any:
        if self._take_temporary():
            self._record(AuthAttempt(mechanism, None, None, "temporary", len(args) > 1))
            await server.push(REPLY_AUTH_TEMPORARY)
            return AuthResult(success=False, handled=True)
        inline = len(args) > 1
        if inline:
            if args[1] == "=":
                raw: Any = b""
            else:
                try:
                    raw = base64.b64decode(args[1], validate=True)
                except binascii.Error:
                    raw = None
        else:
            raw = await server.challenge_auth(b"", encode_to_b64=False)
            if raw is MISSING:  # "*" or bad base64, already answered with 501
                self._record(AuthAttempt(mechanism, None, None, "aborted", inline))
                return AuthResult(success=False, handled=True)
        parse = parse_xoauth2 if mechanism == "XOAUTH2" else parse_oauthbearer
        parsed = parse(raw) if isinstance(raw, bytes) else None
        if parsed is None:
            self._record(AuthAttempt(mechanism, None, None, "malformed", inline))
            await server.push(REPLY_MALFORMED)
            return AuthResult(success=False, handled=True)
        username, token = parsed
        scripted = self._scripted("AUTH")
        if scripted:
            self._record(AuthAttempt(mechanism, username, token, "rejected", inline))
            await server.push(scripted)
            return AuthResult(success=False, handled=True)
        if self._check(token, username):
            self._record(AuthAttempt(mechanism, username, token, "accepted", inline))
            return AuthResult(success=True, auth_data=username, message=REPLY_AUTH_OK)
        error = XOAUTH2_ERROR if mechanism == "XOAUTH2" else OAUTHBEARER_ERROR
        answer = await server.challenge_auth(json.dumps(error, separators=(",", ":")))
        if answer is MISSING:
            self._record(AuthAttempt(mechanism, username, token, "aborted", inline))
            return AuthResult(success=False, handled=True)
        self._record(AuthAttempt(mechanism, username, token, "rejected", inline, bytes(answer)))
        await server.push(REPLY_AUTH_REJECTED)
        return AuthResult(success=False, handled=True)

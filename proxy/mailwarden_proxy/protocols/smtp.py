"""The SMTP submission core: plain AUTH PLAIN/LOGIN from the client, XOAUTH2/OAUTHBEARER upstream.

State machine
=============

The session has two halves. First the core talks to the upstream alone, and the client
hears nothing:

    UPSTREAM_GREETING --220--> UPSTREAM_EHLO --250--> (STARTTLS wanted?)
        yes: UPSTREAM_STARTTLS --220--> [StartUpstreamTLS, buffer dropped] --> UPSTREAM_EHLO
        no:  greet the client --> COMMAND

Any other reply, an unparseable one, or the upstream closing, ends the session with a
`421` to the client (used as its greeting if it was not greeted yet).

Then the core answers the client itself (COMMAND), and only its login reaches upstream:

    COMMAND --AUTH PLAIN--> AUTH_PLAIN --response--> CHECKING
    COMMAND --AUTH LOGIN--> AUTH_LOGIN_USER --> AUTH_LOGIN_PASS --> CHECKING
    CHECKING: `Authenticate` emitted; the I/O layer answers with
        reject_login / token_unavailable --> 535 or 454, back to COMMAND
        provide_token --> "AUTH <MECH>" upstream --> UPSTREAM_AUTH
    UPSTREAM_AUTH  --334--> token sent (never inline: Gmail refuses long lines) --> UPSTREAM_TOKEN
    UPSTREAM_TOKEN --235--> client 235, LoginSucceeded, Splice --> DONE
    UPSTREAM_TOKEN --334 <error challenge>--> answered --> UPSTREAM_ABORT --4xx/5xx-->
        retryable status, first time: NeedFreshToken --> REFRESHING --provide_token--> UPSTREAM_AUTH
        otherwise: 535 (5xx) or 454 (4xx) to the client, back to COMMAND

Client input is only parsed in COMMAND and the AUTH_* states; meanwhile it stays
buffered (bounded by `max_line`) and whatever is left at login is handed upstream with
`Splice`, so pipelining clients keep working. Upstream input is only parsed while a
reply is awaited; a line arriving at any other time (an idle-timeout 421, garbage) ends
the session.

The steps SMTP shares with the POP3 core (the token exchange with its one retry, failing a
login, the TLS and greeting bookkeeping) are in `replies.SaslUpstreamCore`; this module
parses SMTP replies and commands and decides which step each one means.

A session given a warm upstream connection (`relay.pool`) skips the first half: `resume`
takes the extensions and TLS state a warm-up core learnt and greets the client at once.

Choices: a command line longer than `max_line` gets `500 5.5.6 Line too long` and the
session is closed (the line buffer cannot resynchronise without reading the rest);
AUTH needs an EHLO or HELO first, and again after STARTTLS (RFC 3207 §4.2: everything
learnt before TLS is forgotten, and buffered plaintext is dropped); the client's input
is never echoed back.
"""

from __future__ import annotations

import binascii
from enum import Enum, auto

from mailwarden_proxy.config.model import DEFAULT_MAX_LINE, DEFAULT_MAX_LITERAL
from mailwarden_proxy.protocols.errors import SaslError
from mailwarden_proxy.protocols.line_core import LoginStates, SaslUpstreamCore
from mailwarden_proxy.protocols.replies import (
    CRLF,
    SmtpReply,
    SmtpReplyReader,
    ehlo_keyword,
    has_control_chars,
    rewrite_ehlo,
    safe_text,
    split_command,
)
from mailwarden_proxy.protocols.sasl import b64decode_strict, decode_plain
from mailwarden_proxy.protocols.session import FailureKind, LocalInfo, UpstreamInfo


class SmtpState(Enum):
    UPSTREAM_GREETING = auto()
    UPSTREAM_EHLO = auto()
    UPSTREAM_STARTTLS = auto()
    COMMAND = auto()
    AUTH_PLAIN = auto()
    AUTH_LOGIN_USER = auto()
    AUTH_LOGIN_PASS = auto()
    CHECKING = auto()
    UPSTREAM_AUTH = auto()
    UPSTREAM_TOKEN = auto()
    UPSTREAM_ABORT = auto()
    REFRESHING = auto()
    DONE = auto()


_READS_UPSTREAM = frozenset(
    SmtpState[name]
    for name in (
        "UPSTREAM_GREETING",
        "UPSTREAM_EHLO",
        "UPSTREAM_STARTTLS",
        "UPSTREAM_AUTH",
        "UPSTREAM_TOKEN",
        "UPSTREAM_ABORT",
    )
)
_READS_CLIENT = frozenset(
    SmtpState[name] for name in ("COMMAND", "AUTH_PLAIN", "AUTH_LOGIN_USER", "AUTH_LOGIN_PASS")
)
# Verbs a server knows but that need a login first (RFC 5321, 3030, 4468, 1985).
_NEED_AUTH = frozenset(
    {"MAIL", "RCPT", "DATA", "BDAT", "VRFY", "EXPN", "HELP", "ETRN", "TURN", "ATRN", "BURL"}
)

USERNAME_PROMPT = b"334 VXNlcm5hbWU6"  # base64("Username:")
PASSWORD_PROMPT = b"334 UGFzc3dvcmQ6"  # base64("Password:")
AUTH_OK = b"235 2.7.0 Authentication successful"
AUTH_INVALID = b"535 5.7.8 Authentication credentials invalid"
AUTH_TEMPORARY = b"454 4.7.0 Temporary authentication failure"


class SmtpCore(SaslUpstreamCore[SmtpState]):
    """One proxied SMTP session from connect to login; see the module docstring."""

    states = LoginStates.of(SmtpState)
    upstream_reading = _READS_UPSTREAM
    client_reading = _READS_CLIENT
    auth_failed = AUTH_INVALID
    auth_temporary = AUTH_TEMPORARY
    upstream_unavailable = b"421 4.3.2 "
    upstream_lost = b"421 4.4.2 "
    too_long_reply = b"500 5.5.6 Line too long"
    flood_reply = b"421 4.7.0 Too much input before the reply"

    def __init__(
        self,
        upstream: UpstreamInfo,
        local: LocalInfo | None = None,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
    ) -> None:
        super().__init__(upstream, local, max_line=max_line, max_literal=max_literal)
        self.upstream_extensions: tuple[bytes, ...] = ()  # EHLO lines after the greeting line
        self._reader = SmtpReplyReader(self.upstream_in.max_line)
        self._ehlo_seen = False
        self._login_user = ""  # AUTH LOGIN: the username while the password is prompted

    # -- upstream ----------------------------------------------------------------------------

    def _on_upstream_line(self, line: bytes) -> None:
        reply = self._reader.feed(line)
        if reply is not None:
            self._on_reply(reply)

    def _on_reply(self, reply: SmtpReply) -> None:
        match self.state:
            case SmtpState.UPSTREAM_GREETING:
                if reply.code != 220:
                    self._upstream_failed(f"upstream greeting {reply.code}")
                    return
                self._send_ehlo()
            case SmtpState.UPSTREAM_EHLO:
                self._on_ehlo(reply)
            case SmtpState.UPSTREAM_STARTTLS:
                if reply.code != 220:
                    self._upstream_failed(f"upstream STARTTLS {reply.code}")
                    return
                self._start_upstream_tls()
                self._send_ehlo()
            case SmtpState.UPSTREAM_AUTH:
                if reply.code == 334:
                    self._send_token()
                else:
                    self._upstream_refused(reply, FailureKind.UPSTREAM_ERROR)
            case SmtpState.UPSTREAM_TOKEN:
                self._on_token_reply(reply)
            case SmtpState.UPSTREAM_ABORT:
                self._on_abort_reply(reply)
            case _:  # pragma: no cover - only called in reading states
                raise AssertionError(self.state)

    def _send_ehlo(self) -> None:
        self.to_upstream(b"EHLO " + self._host + CRLF)
        self.state = SmtpState.UPSTREAM_EHLO

    def _on_ehlo(self, reply: SmtpReply) -> None:
        if reply.code != 250:
            self._upstream_failed(f"upstream EHLO {reply.code}")
            return
        self.upstream_extensions = reply.lines[1:]
        keywords = {ehlo_keyword(line) for line in self.upstream_extensions}
        if self.upstream.starttls and not self._upstream_tls:
            if "STARTTLS" not in keywords:
                self._upstream_failed("upstream does not offer STARTTLS")
                return
            self.to_upstream(b"STARTTLS" + CRLF)
            self.state = SmtpState.UPSTREAM_STARTTLS
            return
        self._greet_client(self._greeting)

    @property
    def _greeting(self) -> bytes:
        return b"220 " + self._host + b" ESMTP mailwarden ready"

    # -- starting from a warm upstream (relay.pool) ----------------------------------------

    @property
    def upstream_ready(self) -> bool:
        """The upstream prelude (greeting, EHLO, STARTTLS, EHLO) is done: the client may
        be greeted, or has been."""
        return self._client_greeted

    @property
    def upstream_tls(self) -> bool:
        """STARTTLS was done upstream (implicit TLS is the I/O layer's, not counted)."""
        return self._upstream_tls

    def resume(self, upstream_extensions: tuple[bytes, ...], *, upstream_tls: bool) -> None:
        """Start on an upstream connection whose prelude another core already did.

        Instead of waiting for the upstream greeting, the core greets the client now and
        answers EHLO from `upstream_extensions` (the second EHLO's lines after the first,
        as in `upstream_extensions`); everything after the greeting is unchanged. Only
        valid as the first call; a finished core (client already gone) ignores it.
        """
        if self.finished:
            return
        self._expect(SmtpState.UPSTREAM_GREETING)
        if self.upstream.starttls and not upstream_tls:
            # never log in over plaintext where the configuration asks for STARTTLS
            raise RuntimeError("SmtpCore: resume without the upstream STARTTLS configured")
        self.upstream_extensions = tuple(upstream_extensions)
        self._upstream_tls = upstream_tls
        self._greet_client(self._greeting)
        self._process()  # an early talker's buffered commands

    def _on_token_reply(self, reply: SmtpReply) -> None:
        if reply.code == 235:
            self._login_succeeded(AUTH_OK)
        elif reply.code == 334:
            self._answer_error_challenge(reply.text)
        else:
            self._upstream_refused(reply, FailureKind.TOKEN_REJECTED)

    def _on_abort_reply(self, reply: SmtpReply) -> None:
        if reply.kind not in (4, 5):
            self._upstream_failed(f"upstream answered {reply.code} to an aborted AUTH")
            return
        if self._retry_with_fresh_token():
            return
        if reply.kind == 4:
            self._fail(self._temporary(reply), FailureKind.UPSTREAM_ERROR, self._detail(reply))
        else:
            status = self._challenge
            hint = f" (upstream refused the token: {status})" if status else ""
            detail = self._detail(reply)
            self._fail(AUTH_INVALID + hint.encode(), FailureKind.TOKEN_REJECTED, detail)

    def _upstream_refused(self, reply: SmtpReply, kind: FailureKind) -> None:
        """A 4xx/5xx to AUTH or to the token: the login fails, the session goes on."""
        if reply.kind == 4:
            self._fail(self._temporary(reply), FailureKind.UPSTREAM_ERROR, self._detail(reply))
        elif reply.kind == 5:
            self._fail(AUTH_INVALID, kind, self._detail(reply))
        else:
            self._upstream_failed(f"unexpected upstream reply {reply.code} during AUTH")

    def _temporary(self, reply: SmtpReply) -> bytes:
        text = safe_text(reply.text, self._secrets, 100)
        return AUTH_TEMPORARY + (f" (upstream: {text})".encode() if text else b"")

    def _detail(self, reply: SmtpReply) -> str:
        """For LoginFailed: the whole reply (Gmail's meaning is on its first line, its
        link on the last), then the error challenge before it, if any."""
        text = safe_text(b" ".join(reply.lines), self._secrets, 300)
        return f"{reply.code} {text} {self._challenge_detail}".strip()

    # -- client ------------------------------------------------------------------------------

    def _on_client_line(self, text: bytes) -> None:
        if self.state is SmtpState.COMMAND:
            self._on_command(text)
            return
        if text == b"*":
            self.state = SmtpState.COMMAND
            self._reply(b"501 5.7.0 Authentication cancelled")
            return
        if self.state is SmtpState.AUTH_PLAIN:
            self._auth_plain(text)
        elif self.state is SmtpState.AUTH_LOGIN_USER:
            self._auth_login_user(text)
        else:
            self._auth_login_password(text)

    def _on_command(self, text: bytes) -> None:
        if has_control_chars(text):
            self._reply(b"501 5.5.2 Invalid characters in command")
            return
        verb, arg = split_command(text)
        if verb in ("EHLO", "HELO"):
            if not arg:
                self._reply(b"501 5.5.4 Syntax: " + verb.encode() + b" hostname")
                return
            self._ehlo_seen = True
            if verb == "HELO":
                self._reply(b"250 " + self._host)
                return
            offer = self.local.starttls and not self._client_tls
            self.to_client(
                rewrite_ehlo(self.local.hostname, self.upstream_extensions, offer_starttls=offer)
            )
        elif verb in ("NOOP", "RSET"):
            self._reply(b"250 2.0.0 OK")
        elif verb == "QUIT":
            self._client_error(b"221 2.0.0 Bye", "client quit")
        elif verb == "STARTTLS":
            self._starttls(arg)
        elif verb == "AUTH":
            self._auth(arg)
        elif verb in _NEED_AUTH:
            self._reply(b"530 5.7.0 Authentication required")
        else:
            self._reply(b"500 5.5.2 Command not recognized")

    def _starttls(self, arg: bytes) -> None:
        if arg:
            self._reply(b"501 5.5.4 Syntax: STARTTLS")
        elif self._client_tls:
            self._reply(b"503 5.5.1 TLS already active")
        elif not self.local.starttls:
            self._reply(b"502 5.5.1 STARTTLS not available")
        else:
            self._start_client_tls(b"220 2.0.0 Ready to start TLS")
            self._ehlo_seen = False  # RFC 3207 §4.2: what was learnt before TLS is forgotten

    def _auth(self, arg: bytes) -> None:
        words = arg.split()
        if not self._ehlo_seen:
            self._reply(b"503 5.5.1 Send EHLO first")
            return
        if not words or len(words) > 2:
            self._reply(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self.state = SmtpState.AUTH_PLAIN
                self._reply(b"334 ")
            else:
                self._auth_plain(b"" if initial == b"=" else initial)
        elif mechanism == b"LOGIN":
            if initial is None:
                self.state = SmtpState.AUTH_LOGIN_USER
                self._reply(USERNAME_PROMPT)
            else:
                self._auth_login_user(b"" if initial == b"=" else initial)
        else:
            self._reply(b"504 5.5.4 Unrecognized authentication type")

    def _auth_plain(self, response: bytes) -> None:
        try:
            username, password = decode_plain(response)
        except SaslError:
            self._cannot_decode()
            return
        self._authenticate(username, password)

    def _auth_login_user(self, response: bytes) -> None:
        username = _decode_text(response)
        if not username:
            self._cannot_decode()
            return
        self._login_user = username
        self.state = SmtpState.AUTH_LOGIN_PASS
        self._reply(PASSWORD_PROMPT)

    def _auth_login_password(self, response: bytes) -> None:
        password = _decode_text(response)
        if password is None:
            self._cannot_decode()
            return
        username, self._login_user = self._login_user, ""
        self._authenticate(username, password)

    def _cannot_decode(self) -> None:
        self.state = SmtpState.COMMAND
        self._reply(b"501 5.5.2 Cannot decode response")


def _decode_text(response: bytes) -> str | None:
    """A base64 AUTH LOGIN answer as text, or None if it is not base64 of UTF-8."""
    try:
        return b64decode_strict(response).decode()
    except (SaslError, binascii.Error, UnicodeDecodeError):
        return None

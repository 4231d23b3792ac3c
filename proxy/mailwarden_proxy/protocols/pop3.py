"""The POP3 core: USER/PASS or AUTH PLAIN from the client, XOAUTH2/OAUTHBEARER upstream.

State machine
=============

First the core talks to the upstream alone, and the client hears nothing:

    UPSTREAM_GREETING --+OK--> CAPA sent --> UPSTREAM_CAPA --+OK--> UPSTREAM_CAPA_LIST --"."-->
        STLS wanted: UPSTREAM_STLS --+OK--> [StartUpstreamTLS, buffer dropped] --> CAPA again
        otherwise:   greet the client --> COMMAND

A `-ERR` greeting, an unparseable line, or the upstream closing, ends the session with a
`-ERR [SYS/TEMP]` to the client (as its greeting if it was not greeted yet).

Then the core answers the client itself in the AUTHORIZATION state (RFC 1939 §4):

    COMMAND --USER--> COMMAND (name kept) --PASS--> CHECKING
    COMMAND --AUTH PLAIN--> AUTH_PLAIN --response--> CHECKING
    CHECKING: `Authenticate` emitted; the I/O layer answers with
        reject_login / token_unavailable --> -ERR [AUTH] or [SYS/TEMP], back to COMMAND
        provide_token --> "AUTH <MECH>" upstream --> UPSTREAM_AUTH
    UPSTREAM_AUTH  --"+ "--> response sent on its own line --> UPSTREAM_TOKEN
        (RFC 5034 limits an initial response in the command to 255 octets; tokens are longer)
    UPSTREAM_TOKEN --+OK--> client +OK, LoginSucceeded, Splice --> DONE
    UPSTREAM_TOKEN --"+ <error challenge>"--> answered --> UPSTREAM_ABORT --(-ERR)-->
        retryable status, first time: NeedFreshToken --> REFRESHING --provide_token--> UPSTREAM_AUTH
        otherwise: -ERR [AUTH] (or the upstream's [SYS/TEMP]) to the client, back to COMMAND

As in the SMTP core, client input is parsed only in COMMAND and AUTH_PLAIN and is
otherwise kept (bounded) for `Splice`; upstream input is parsed only while a reply is
awaited. A command line longer than `max_line` gets `-ERR Line too long` and the session
closes. No APOP timestamp is offered; client input is never echoed back. The steps shared
with the SMTP core are in `replies.SaslUpstreamCore`; this module parses POP3 lines and
commands and decides which step each one means.
"""

from __future__ import annotations

import re
from enum import Enum, auto

from mailwarden_proxy.config.model import DEFAULT_MAX_LINE, DEFAULT_MAX_LITERAL
from mailwarden_proxy.protocols.errors import SaslError, UpstreamProtocolError
from mailwarden_proxy.protocols.line_core import LoginStates, SaslUpstreamCore
from mailwarden_proxy.protocols.replies import (
    CRLF,
    DotListReader,
    capa_keyword,
    chomp,
    has_control_chars,
    rewrite_capa,
    safe_text,
    split_command,
)
from mailwarden_proxy.protocols.sasl import decode_plain
from mailwarden_proxy.protocols.session import FailureKind, LocalInfo, UpstreamInfo


class Pop3State(Enum):
    UPSTREAM_GREETING = auto()
    UPSTREAM_CAPA = auto()
    UPSTREAM_CAPA_LIST = auto()
    UPSTREAM_STLS = auto()
    COMMAND = auto()
    AUTH_PLAIN = auto()
    CHECKING = auto()
    UPSTREAM_AUTH = auto()
    UPSTREAM_TOKEN = auto()
    UPSTREAM_ABORT = auto()
    REFRESHING = auto()
    DONE = auto()


class Status(Enum):
    """The three kinds of POP3 server line: +OK, -ERR and a SASL continuation ("+ ")."""

    OK = auto()
    ERR = auto()
    CONTINUE = auto()


_READS_UPSTREAM = frozenset(
    Pop3State[name]
    for name in (
        "UPSTREAM_GREETING",
        "UPSTREAM_CAPA",
        "UPSTREAM_CAPA_LIST",
        "UPSTREAM_STLS",
        "UPSTREAM_AUTH",
        "UPSTREAM_TOKEN",
        "UPSTREAM_ABORT",
    )
)
_READS_CLIENT = frozenset({Pop3State.COMMAND, Pop3State.AUTH_PLAIN})
_RESP_CODE = re.compile(rb"\[([A-Za-z0-9/\-]{1,32})\]")
# Upstream response codes (RFC 2449, 3206) that mean "not now" rather than "not you".
_PASSED_CODES = frozenset({b"SYS/TEMP", b"IN-USE", b"LOGIN-DELAY"})

AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
AUTH_TEMPORARY = b"-ERR [SYS/TEMP] Temporary authentication failure, try again later"
NOT_NOW = b"-ERR Command not valid before authentication"


def parse_status(line: bytes) -> tuple[Status, bytes]:
    """Classify one server line; the second item is the text after the indicator."""
    text = chomp(line)
    if text[:3] == b"+OK" and text[3:4] in (b"", b" "):
        return Status.OK, text[4:]
    if text[:4] == b"-ERR" and text[4:5] in (b"", b" "):
        return Status.ERR, text[5:]
    if text == b"+" or text[:2] == b"+ ":
        return Status.CONTINUE, text[2:]
    raise UpstreamProtocolError("malformed POP3 status line")


class Pop3Core(SaslUpstreamCore[Pop3State]):
    """One proxied POP3 session from connect to login; see the module docstring."""

    states = LoginStates.of(Pop3State)
    upstream_reading = _READS_UPSTREAM
    client_reading = _READS_CLIENT
    auth_failed = AUTH_FAILED
    auth_temporary = AUTH_TEMPORARY
    upstream_unavailable = upstream_lost = b"-ERR [SYS/TEMP] "
    too_long_reply = b"-ERR Line too long"
    flood_reply = b"-ERR Too much input before the reply"

    def __init__(
        self,
        upstream: UpstreamInfo,
        local: LocalInfo | None = None,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
    ) -> None:
        super().__init__(upstream, local, max_line=max_line, max_literal=max_literal)
        self.upstream_capabilities: tuple[bytes, ...] = ()
        self._list = DotListReader(self.upstream_in.max_line)
        self._user: str | None = None  # from USER, waiting for PASS

    # -- upstream ----------------------------------------------------------------------------

    def _on_upstream_line(self, line: bytes) -> None:
        if self.state is Pop3State.UPSTREAM_CAPA_LIST:
            capabilities = self._list.feed(line)
            if capabilities is not None:
                self._on_capabilities(tuple(capabilities))
            return
        status, text = parse_status(line)
        match self.state:
            case Pop3State.UPSTREAM_GREETING:
                if status is not Status.OK:
                    self._upstream_failed("upstream greeting refused")
                    return
                self._send_capa()
            case Pop3State.UPSTREAM_CAPA:
                if status is Status.OK:
                    self.state = Pop3State.UPSTREAM_CAPA_LIST
                else:  # a server from before RFC 2449: nothing known
                    self._on_capabilities(())
            case Pop3State.UPSTREAM_STLS:
                if status is not Status.OK:
                    self._upstream_failed("upstream refused STLS")
                    return
                self._start_upstream_tls()
                self._send_capa()
            case Pop3State.UPSTREAM_AUTH:
                if status is Status.CONTINUE:
                    self._send_token()
                elif status is Status.ERR:
                    self._refused(text, FailureKind.UPSTREAM_ERROR)
                else:
                    self._upstream_failed("upstream accepted AUTH without a response")
            case Pop3State.UPSTREAM_TOKEN:
                self._on_token_reply(status, text)
            case Pop3State.UPSTREAM_ABORT:
                self._on_abort_reply(status, text)
            case _:  # pragma: no cover - only called in reading states
                raise AssertionError(self.state)

    def _send_capa(self) -> None:
        self.to_upstream(b"CAPA" + CRLF)
        self.state = Pop3State.UPSTREAM_CAPA

    def _on_capabilities(self, capabilities: tuple[bytes, ...]) -> None:
        self.upstream_capabilities = capabilities
        if self.upstream.starttls and not self._upstream_tls:
            if "STLS" not in {capa_keyword(line) for line in capabilities}:
                self._upstream_failed("upstream does not offer STLS")
                return
            self.to_upstream(b"STLS" + CRLF)
            self.state = Pop3State.UPSTREAM_STLS
            return
        self._greet_client(b"+OK " + self._host + b" POP3 ready (mailwarden)")

    def _on_token_reply(self, status: Status, text: bytes) -> None:
        if status is Status.OK:
            shown = safe_text(text, self._secrets) or "Logged in"
            self._login_succeeded(b"+OK " + shown.encode())
        elif status is Status.CONTINUE:
            self._answer_error_challenge(text)
        else:
            self._refused(text, FailureKind.TOKEN_REJECTED)

    def _on_abort_reply(self, status: Status, text: bytes) -> None:
        if status is not Status.ERR:
            self._upstream_failed("upstream did not refuse an aborted AUTH")
            return
        if self._retry_with_fresh_token():
            return
        self._refused(text, FailureKind.TOKEN_REJECTED)

    def _refused(self, text: bytes, kind: FailureKind) -> None:
        """Upstream said -ERR to the login: pass on "not now" codes, else an auth failure."""
        detail = safe_text(text, self._secrets, 300)
        match = _RESP_CODE.match(text)
        if match and match.group(1).upper() in _PASSED_CODES:
            code = match.group(1).upper()
            shown = safe_text(text[match.end() :], self._secrets)
            if code == b"SYS/TEMP":
                reply = AUTH_TEMPORARY
            else:  # [IN-USE] / [LOGIN-DELAY]: the client should see the server's words
                reply = b"-ERR [" + code + b"] " + (shown.encode() or b"Try again later")
            self._fail(reply, FailureKind.UPSTREAM_ERROR, detail)
        elif kind is FailureKind.UPSTREAM_ERROR:  # AUTH <mech> itself was refused
            self._fail(b"-ERR [SYS/PERM] Upstream refused the login", kind, detail)
        elif self._challenge:
            hint = f" (upstream refused the token: {self._challenge})".encode()
            self._fail(AUTH_FAILED + hint, kind, f"{detail} {self._challenge_detail}".strip())
        else:
            self._fail(AUTH_FAILED, kind, detail)

    # -- client ------------------------------------------------------------------------------

    def _on_client_line(self, text: bytes) -> None:
        if self.state is Pop3State.AUTH_PLAIN:
            self.state = Pop3State.COMMAND
            if text == b"*":
                self._reply(b"-ERR Authentication cancelled")
            else:
                self._auth_plain(text)
            return
        if has_control_chars(text):
            self._reply(b"-ERR Invalid characters in command")
            return
        verb, arg = split_command(text)
        if verb == "CAPA":
            offer = self.local.starttls and not self._client_tls
            self.to_client(rewrite_capa(self.upstream_capabilities, offer_stls=offer))
        elif verb == "STLS":
            self._stls(arg)
        elif verb == "USER":
            self._user_command(arg)
        elif verb == "PASS":
            self._pass_command(text.partition(b" ")[2])
        elif verb == "AUTH":
            self._auth(arg)
        elif verb == "QUIT":
            self._client_error(b"+OK Bye", "client quit")
        else:
            self._reply(NOT_NOW)

    def _stls(self, arg: bytes) -> None:
        if arg:
            self._reply(b"-ERR Syntax: STLS")
        elif self._client_tls:
            self._reply(b"-ERR Command not permitted when TLS active")
        elif not self.local.starttls:
            self._reply(b"-ERR STLS not available")
        else:
            self._start_client_tls(b"+OK Begin TLS negotiation")
            self._user = None  # a name given in plaintext is forgotten, as all before TLS

    def _user_command(self, arg: bytes) -> None:
        try:
            name = arg.decode()
        except UnicodeDecodeError:
            name = ""
        if not name or " " in name:
            self._user = None
            self._reply(b"-ERR Syntax: USER name")
            return
        self._user = name
        self._reply(b"+OK")

    def _pass_command(self, secret: bytes) -> None:
        user, self._user = self._user, None
        if user is None:
            self._reply(b"-ERR USER first")
            return
        try:
            password = secret.decode()
        except UnicodeDecodeError:
            password = ""
        if not password:
            self._reply(b"-ERR Syntax: PASS password")
            return
        self._authenticate(user, password)

    def _auth(self, arg: bytes) -> None:
        words = arg.split()
        if not words:
            self.to_client(b"+OK" + CRLF + b"PLAIN" + CRLF + b"." + CRLF)
        elif len(words) > 2:
            self._reply(b"-ERR Syntax: AUTH mechanism [initial-response]")
        elif words[0].upper() != b"PLAIN":
            self._reply(b"-ERR [AUTH] Unsupported mechanism")
        elif len(words) == 2:
            self._auth_plain(b"" if words[1] == b"=" else words[1])
        else:
            self.state = Pop3State.AUTH_PLAIN
            self._reply(b"+ ")

    def _auth_plain(self, response: bytes) -> None:
        try:
            username, password = decode_plain(response)
        except SaslError:
            self._reply(b"-ERR Cannot decode response")
            return
        self._user = None  # a pending USER is dropped: PASS needs a USER after this login
        self._authenticate(username, password)

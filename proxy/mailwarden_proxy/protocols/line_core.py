"""The pre-login loop of the line-based cores (SMTP, POP3) and the login and upstream
SASL exchange they have in common; each protocol module keeps only its commands, its
reply parsing and its capability rewrite."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, fields
from enum import Enum
from typing import Generic, TypeVar

from mailwarden_proxy.config.model import DEFAULT_MAX_LINE, DEFAULT_MAX_LITERAL, Mechanism
from mailwarden_proxy.protocols.errors import LineTooLong, ProtocolError
from mailwarden_proxy.protocols.replies import CRLF, chomp, status_word
from mailwarden_proxy.protocols.sasl import (
    RETRYABLE_STATUSES,
    b64,
    error_challenge_reply,
    initial_response,
    mechanism_name,
    parse_error_challenge,
)
from mailwarden_proxy.protocols.session import (
    Authenticate,
    FailureKind,
    LocalInfo,
    LoginFailed,
    LoginSucceeded,
    NeedFreshToken,
    SessionCore,
    StartClientTLS,
    StartUpstreamTLS,
    UpstreamInfo,
)

# -- the pre-login loop ------------------------------------------------------------------


class LineDrivenCore(SessionCore):
    """The input loop shared by the line-based cores (SMTP, POP3).

    Each round handles one complete line: from upstream while a reply is awaited, from
    the client while a command (or SASL response) is awaited, from nobody otherwise.
    Upstream lines arriving out of turn, unparseable upstream lines (`ProtocolError`
    from the subclass) and over-long upstream lines all end in `_upstream_failed`; an
    over-long client line gets `too_long_reply` and the session closes, since a line
    buffer cannot find the next command without reading the rest of a line it refused.
    Client input that waits (during a login or before the greeting) is bounded by
    `max_line` too, and is handed upstream by `Splice` at login.
    """

    too_long_reply = b"500 Line too long"
    flood_reply = b"421 Too much input before the reply"

    @abstractmethod
    def _reads_upstream(self) -> bool:
        """True while an upstream reply is awaited."""

    @abstractmethod
    def _reads_client(self) -> bool:
        """True while a client command or SASL response is awaited."""

    @abstractmethod
    def _on_upstream_line(self, line: bytes) -> None:
        """One upstream line, with its terminator; may raise `ProtocolError`."""

    @abstractmethod
    def _on_client_line(self, text: bytes) -> None:
        """One client line, without its terminator."""

    @abstractmethod
    def _upstream_failed(self, reason: str) -> None:
        """Tell the client the upstream is gone, then Close."""

    def _reply(self, line: bytes) -> None:
        """Send the client one line of ours (no terminator in `line`)."""
        self.to_client(line + CRLF)

    def _client_error(self, reply: bytes, reason: str) -> None:
        self._reply(reply)
        self.close(reason)

    def _process(self) -> None:
        while not self.finished and self._step():
            pass
        waiting = not self.finished and not self._reads_client()
        if waiting and len(self.client_in) > self.max_line:
            self._client_error(self.flood_reply, "client sent too much before the reply")

    def _step(self) -> bool:
        """Handle one complete line; False when more input is needed."""
        if self._reads_upstream():
            try:
                line = self.upstream_in.next_line()
                if line is not None:
                    self._on_upstream_line(line)
            except ProtocolError as exc:
                self._upstream_failed(str(exc))
                return False
            return line is not None
        try:
            unsolicited = self.upstream_in.next_line()
        except LineTooLong:
            unsolicited = b""
        if unsolicited is not None:
            self._upstream_failed("upstream sent data out of turn")
            return False
        if not self._reads_client():
            return False
        try:
            line = self.client_in.next_line()
        except LineTooLong:
            self._client_error(self.too_long_reply, "client line too long")
            return False
        if line is None:
            return False
        self._on_client_line(chomp(line))
        return True


# -- the login of the line-based cores ---------------------------------------------------

StateT = TypeVar("StateT", bound=Enum)


@dataclass(frozen=True)
class LoginStates(Generic[StateT]):
    """A protocol's members for the states `SaslUpstreamCore` itself enters or checks.

    Each protocol keeps its own state enum, since its other states (capability discovery,
    its own SASL prompts) differ; these members carry the same names in each, and `of`
    looks them up by name, so a missing one fails at import rather than mid-session.
    """

    upstream_greeting: StateT  # the first state: waiting for the upstream greeting
    command: StateT  # reading client commands, not logged in
    checking: StateT  # `Authenticate` emitted, waiting for the I/O layer's answer
    upstream_auth: StateT  # "AUTH <MECH>" sent, waiting for the go-ahead
    upstream_token: StateT  # token sent, waiting for success or an error challenge
    upstream_abort: StateT  # error challenge answered, waiting for the refusal
    refreshing: StateT  # `NeedFreshToken` emitted, waiting for the I/O layer's answer
    done: StateT  # spliced or closed

    @classmethod
    def of(cls, states: type[StateT]) -> LoginStates[StateT]:
        return cls(*(states[field.name.upper()] for field in fields(cls)))


class SaslUpstreamCore(LineDrivenCore, Generic[StateT]):
    """The login the SMTP and POP3 cores share, and the connection facts around it.

    Both take a plain login from the client, have the I/O layer check it, then log in
    upstream alike: "AUTH <MECH>", the base64 response holding the token on a line of its
    own once the upstream says go ahead (never inline: Gmail refuses long SMTP command
    lines, and RFC 5034 caps a POP3 initial response at 255 octets), and after an error
    challenge the abort that SASL requires, then one fresh-token retry if the status
    allows it. What differs is only the spelling of replies, so a subclass parses its own
    and calls the steps below (`_send_token`, `_answer_error_challenge`,
    `_retry_with_fresh_token`, `_login_succeeded`, `_fail`); the class attributes name its
    states and its own reply texts.
    """

    states: LoginStates[StateT]
    upstream_reading: frozenset[StateT]  # states in which an upstream reply is awaited
    client_reading: frozenset[StateT]  # states in which a client line is awaited
    auth_failed: bytes  # the login failed for good: wrong local password, token refused
    auth_temporary: bytes  # the login failed for now: no token at the moment
    upstream_unavailable: bytes  # starts our reply when the upstream fails before our greeting
    upstream_lost: bytes  # starts it when the upstream fails later, or closes at any time

    def __init__(
        self,
        upstream: UpstreamInfo,
        local: LocalInfo | None = None,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
    ) -> None:
        super().__init__(upstream, local, max_line=max_line, max_literal=max_literal)
        self.state = self.states.upstream_greeting
        self._upstream_tls = False
        self._client_tls = self.local.tls_active
        self._client_greeted = False
        self._username = ""  # the local username of the login in progress
        self._mechanism = Mechanism.XOAUTH2
        self._response = b""  # base64 SASL response holding the token, for this attempt only
        self._secrets: tuple[bytes, ...] = ()  # never let these reach the client or a log
        self._retried = False  # this login's one fresh-token retry is used up
        self._challenge = ""  # status word of the last error challenge
        self._challenge_detail = ""  # the challenge itself (JSON), for LoginFailed's detail

    @property
    def _host(self) -> bytes:
        return self.local.hostname.encode()

    # -- answers from the I/O layer ---------------------------------------------------------

    def provide_token(self, upstream_username: str, token: str, mechanism: Mechanism) -> None:
        if self.finished:
            return
        self._expect(self.states.checking, self.states.refreshing)
        raw = initial_response(
            mechanism, upstream_username, token, self.upstream.host, self.upstream.port
        )
        self._mechanism = mechanism
        self._response = b64(raw)
        self._secrets = (token.encode(), self._response)
        self._challenge = self._challenge_detail = ""
        self.to_upstream(b"AUTH " + mechanism_name(mechanism).encode() + CRLF)
        self.state = self.states.upstream_auth
        self._process()

    def reject_login(self, *, rate_limited: bool = False) -> None:
        if self.finished:
            return
        self._expect(self.states.checking)
        if rate_limited:
            self._fail(self.auth_temporary, FailureKind.RATE_LIMITED)
        else:
            self._fail(self.auth_failed, FailureKind.LOCAL_CREDENTIALS)
        self._process()

    def token_unavailable(self, permanent: bool) -> None:
        if self.finished:
            return
        self._expect(self.states.checking, self.states.refreshing)
        reply = self.auth_failed if permanent else self.auth_temporary
        detail = "permanent" if permanent else "temporary"
        self._fail(reply, FailureKind.TOKEN_UNAVAILABLE, detail)
        self._process()

    def _expect(self, *states: StateT) -> None:
        if self.state not in states:
            name = type(self).__name__
            raise RuntimeError(f"{name}: call not expected in state {self.state.name}")

    # -- the loop (LineDrivenCore) ----------------------------------------------------------

    def _reads_upstream(self) -> bool:
        return self.state in self.upstream_reading

    def _reads_client(self) -> bool:
        return self.state in self.client_reading

    def close(self, reason: str) -> None:
        self.state = self.states.done
        super().close(reason)

    def splice(self) -> None:
        self.state = self.states.done
        super().splice()

    # -- connection --------------------------------------------------------------------------

    def _start_upstream_tls(self) -> None:
        """Upstream agreed to STARTTLS/STLS: nothing it sent before TLS is used (RFC 3207 §4.2)."""
        self.upstream_in.clear()
        self._upstream_tls = True
        self.emit(StartUpstreamTLS())

    def _greet_client(self, greeting: bytes) -> None:
        """The upstream is ready (and secured if configured): now the client hears from us."""
        self._reply(greeting)
        self._client_greeted = True
        self.state = self.states.command

    def _start_client_tls(self, ready: bytes) -> None:
        """Answer STARTTLS/STLS with `ready`; plaintext pipelined after it is never used."""
        self._reply(ready)
        self.emit(StartClientTLS())
        self.client_in.clear()
        self._client_tls = True

    def _upstream_failed(self, reason: str) -> None:
        if self._client_greeted:
            self._reply(self.upstream_lost + self._host + b" upstream connection failed")
        else:
            self._reply(self.upstream_unavailable + self._host + b" upstream unavailable")
        self.close(reason)

    def _upstream_closed(self) -> None:
        self._reply(self.upstream_lost + self._host + b" upstream closed the connection")
        self.close("upstream closed the connection")

    # -- the login ---------------------------------------------------------------------------

    def _authenticate(self, username: str, password: str) -> None:
        """The client presented credentials: the I/O layer checks them and fetches a token."""
        self._username = username
        self._retried = False
        self.state = self.states.checking
        self.emit(Authenticate(username, password))

    def _send_token(self) -> None:
        """Upstream said go ahead to "AUTH <MECH>": send the response holding the token."""
        self.to_upstream(self._response + CRLF)
        self.state = self.states.upstream_token

    def _answer_error_challenge(self, challenge: bytes) -> None:
        """Upstream answered the token with an error challenge (RFC 7628 §3.2.2).

        Its status decides on a retry later; SASL wants the exchange finished first, with
        the mechanism's dummy response, after which the upstream sends its refusal.
        """
        parsed = parse_error_challenge(challenge)
        self._challenge, self._challenge_detail = status_word(parsed.status), parsed.detail
        self.to_upstream(error_challenge_reply(self._mechanism) + CRLF)
        self.state = self.states.upstream_abort

    def _retry_with_fresh_token(self) -> bool:
        """After the refusal of an aborted exchange: True if a fresh token was asked for.

        Only for a status meaning "this token is stale", and once per login, so a token
        the identity provider keeps handing out cannot make us loop.
        """
        if self._challenge not in RETRYABLE_STATUSES or self._retried:
            return False
        self._retried = True
        self.emit(NeedFreshToken(self._challenge))
        self.state = self.states.refreshing
        return True

    def _login_succeeded(self, reply: bytes) -> None:
        """Upstream accepted the token: tell the client with `reply`, then relay raw bytes."""
        self._reply(reply)
        self.emit(LoginSucceeded(self._username))
        self.splice()

    def _fail(self, reply: bytes, kind: FailureKind, detail: str = "") -> None:
        """The login failed; the session goes on and the client may try again."""
        self._reply(reply)
        self.emit(LoginFailed(self._username, kind, detail))
        self._response = b""
        self._retried = False
        self.state = self.states.command

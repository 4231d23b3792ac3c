"""The IMAP session core: server to the client, client to the upstream server, until login.

Theory of operation
===================

One `ImapCore` drives one proxied connection through a single state machine (`State`).
Each state says whose bytes we are waiting for; bytes from the other side are buffered
and looked at only when a state wants them (upstream ``* BYE`` is fatal in any state).

    UPSTREAM_GREETING --(* OK, caps known)--------------------------------> CLIENT_COMMAND
        | no [CAPABILITY] in the greeting: "mwN CAPABILITY"                     ^
        v                                                                        |
    UPSTREAM_CAPABILITY --(upstream.starttls, not yet TLS: "mwN STARTTLS")--+    |
        ^                                                                   v    |
        +--(tagged OK: clear buffer, StartUpstreamTLS, CAPABILITY)-- UPSTREAM_STARTTLS
                                        (greet the client once caps are known) --+

    CLIENT_COMMAND --CAPABILITY/NOOP/ID/STARTTLS/bad input: answer, stay
                   --LOGOUT: BYE, Close
                   --AUTHENTICATE PLAIN without SASL-IR: "+ " --> CLIENT_SASL --+
                   --LOGIN / AUTHENTICATE PLAIN: emit Authenticate -------------+--> AWAIT_TOKEN
    AWAIT_TOKEN --provide_token: "mwN AUTHENTICATE <mech> [<ir>]"--> UPSTREAM_AUTH
                --reject_login / token_unavailable: tagged NO --> CLIENT_COMMAND
    UPSTREAM_AUTH --"+" (no SASL-IR): send the initial response, stay
                  --"+ <error challenge>": send the mechanism's error reply, stay
                  --tagged NO after a retryable challenge, first time: NeedFreshToken
                        --> AWAIT_FRESH_TOKEN --provide_token--> UPSTREAM_AUTH
                  --tagged NO/BAD otherwise: tagged NO to the client --> CLIENT_COMMAND
                        ([UNAVAILABLE] for upstream's [UNAVAILABLE] and for Microsoft's
                        "BAD Request is throttled": the client should come back later)
                  --tagged OK: "mwN NOOP" (post-login check) --> UPSTREAM_CHECK
    UPSTREAM_CHECK --tagged OK: "tag OK Logged in", LoginSucceeded, Splice --> DONE
                   --"authenticated but not connected" (Microsoft): NO, Close --> DONE

Client input is read only in CLIENT_COMMAND and CLIENT_SASL; anything the client sends
meanwhile waits in its buffer (bounded) and, after a successful login, goes upstream with
the Splice. Every failure that leaves a side unusable ends in `Close`.

Choices: the client sees upstream's capabilities minus AUTH=*, STARTTLS, LOGINDISABLED,
LOGIN-REFERRALS, plus AUTH=PLAIN and SASL-IR (the proxy implements both) and STARTTLS when
offered locally. LOGINDISABLED is never advertised: local STARTTLS is offered, not
required (the listener is on loopback by default). LITERAL+ is not added: the proxy
accepts `{n+}` before login, but the client keeps using what it was told after the
splice, so only upstream's own LITERAL+/LITERAL- is passed through.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

from mailwarden_proxy.config.model import DEFAULT_MAX_LINE, DEFAULT_MAX_LITERAL, Mechanism
from mailwarden_proxy.protocols import sasl
from mailwarden_proxy.protocols.errors import LineTooLong, ProtocolError
from mailwarden_proxy.protocols.imap_parse import (
    AskPlain,
    Command,
    CommandReader,
    Continue,
    Credentials,
    Rejected,
    Response,
    ResponseReader,
    authenticate_request,
    capability_list,
    client_capabilities,
    has_capability,
    login_credentials,
    parse_response,
    plain_credentials,
    printable,
    response_capabilities,
)
from mailwarden_proxy.protocols.lines import strip_eol
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

CRLF = b"\r\n"
NOT_CONNECTED = "authenticated but not connected"
THROTTLED = "request is throttled"  # Microsoft: "... Suggested Backoff Time: N milliseconds"

BYE_UNAVAILABLE = b"* BYE [UNAVAILABLE] Upstream server unavailable, try again later\r\n"
AUTH_FAILED = "[AUTHENTICATIONFAILED] Authentication failed."
TEMP_FAILURE = "[UNAVAILABLE] Temporary authentication failure, try again later"
NOT_CONNECTED_TEXT = (
    "[AUTHENTICATIONFAILED] Authenticated upstream, but the mailbox is not accessible for "
    "this application (check the Exchange service principal and its mailbox permission)"
)


class State(Enum):
    UPSTREAM_GREETING = auto()
    UPSTREAM_CAPABILITY = auto()
    UPSTREAM_STARTTLS = auto()
    CLIENT_COMMAND = auto()
    CLIENT_SASL = auto()
    AWAIT_TOKEN = auto()
    UPSTREAM_AUTH = auto()
    AWAIT_FRESH_TOKEN = auto()
    UPSTREAM_CHECK = auto()
    DONE = auto()


_CLIENT_STATES = frozenset({State.CLIENT_COMMAND, State.CLIENT_SASL})
_LOGIN_STATES = frozenset(
    {State.AWAIT_TOKEN, State.UPSTREAM_AUTH, State.AWAIT_FRESH_TOKEN, State.UPSTREAM_CHECK}
)


@dataclass
class _Login:
    """The client login in progress (no password: it went out with `Authenticate`)."""

    tag: str
    username: str
    mechanism: Mechanism = Mechanism.XOAUTH2
    challenge: sasl.ErrorChallenge | None = None  # the error challenge of the current attempt
    retried: bool = False  # the one retry with a fresh token was used
    ok_code: str = ""  # upstream's [CAPABILITY ...] from the AUTHENTICATE OK


class ImapCore(SessionCore):
    """Sans-I/O IMAP proxy session; see the module docstring for the state machine."""

    def __init__(
        self,
        upstream: UpstreamInfo,
        local: LocalInfo | None = None,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        max_literal: int = DEFAULT_MAX_LITERAL,
    ) -> None:
        super().__init__(upstream, local, max_line=max_line, max_literal=max_literal)
        self.state = State.UPSTREAM_GREETING
        self.upstream_capabilities: list[str] = []
        self.client_tls = self.local.tls_active
        self._upstream_tls = False
        self._caps_known = False
        self._tag_number = 0
        self._upstream_tag = ""
        self._reader = CommandReader(max_literal, max_line + 2 * max_literal)
        self._responses = ResponseReader(max_literal, self.upstream_in.max_line + max_literal)
        self._pending_limit = max_line + max_literal  # client bytes held while not reading
        self._sasl_tag = ""
        self._login: _Login | None = None
        self._initial_response: bytes | None = None  # holds the token until "+" arrives
        self._untagged: list[bytes] = []  # upstream untagged responses during the login
        self._untagged_size = 0

    def __repr__(self) -> str:
        return f"<ImapCore state={self.state.name} upstream={self.upstream.host}>"

    # -- answers from the I/O layer --------------------------------------------------------

    def provide_token(self, upstream_username: str, token: str, mechanism: Mechanism) -> None:
        if self.finished:
            return
        login = self._expect_login(State.AWAIT_TOKEN, State.AWAIT_FRESH_TOKEN)
        login.mechanism, login.challenge = mechanism, None
        response = sasl.b64(
            sasl.initial_response(
                mechanism, upstream_username, token, self.upstream.host, self.upstream.port
            )
        )
        command = b"AUTHENTICATE " + sasl.mechanism_name(mechanism).encode()
        if has_capability(self.upstream_capabilities, "SASL-IR"):
            self._send_command(command + b" " + response)
        else:
            self._send_command(command)
            self._initial_response = response
        self.state = State.UPSTREAM_AUTH
        self._process()

    def reject_login(self, *, rate_limited: bool = False) -> None:
        if self.finished:
            return
        self._expect_login(State.AWAIT_TOKEN)
        if rate_limited:
            self._login_failed(TEMP_FAILURE, FailureKind.RATE_LIMITED)
        else:
            self._login_failed(AUTH_FAILED, FailureKind.LOCAL_CREDENTIALS)
        self._process()

    def token_unavailable(self, permanent: bool) -> None:
        """No token. A permanent failure (invalid_grant, invalid_client) is reported as an
        authentication failure to the client, temporary ones as `NO [UNAVAILABLE]`; both
        count as `TOKEN_UNAVAILABLE`, with detail "permanent" or "temporary"."""
        if self.finished:
            return
        self._expect_login(State.AWAIT_TOKEN, State.AWAIT_FRESH_TOKEN)
        text = AUTH_FAILED if permanent else TEMP_FAILURE
        detail = "permanent" if permanent else "temporary"
        self._login_failed(text, FailureKind.TOKEN_UNAVAILABLE, detail)
        self._process()

    def _expect_login(self, *states: State) -> _Login:
        if self.state not in states or self._login is None:
            raise RuntimeError(f"not expected in state {self.state.name}")
        return self._login

    # -- the loop ---------------------------------------------------------------------------

    def _process(self) -> None:
        while not self.finished and (self._step_upstream() or self._step_client()):
            pass

    def _upstream_closed(self) -> None:
        self._fail_upstream("upstream closed the connection")

    def _step_upstream(self) -> bool:
        try:
            raw = self._responses.next(self.upstream_in)
            if raw is None:
                return False
            response = parse_response(raw)
        except ProtocolError as exc:  # oversized or malformed: we cannot follow upstream
            self._fail_upstream(f"upstream protocol error: {exc}")
            return True
        if response.tag == "*" and response.status == "BYE":
            if self.state is State.UPSTREAM_CHECK and NOT_CONNECTED in response.text.lower():
                self._not_connected(response)
            else:
                self._fail_upstream(f"upstream said BYE: {printable(response.text)}")
            return True
        handler = {
            State.UPSTREAM_GREETING: self._on_greeting,
            State.UPSTREAM_CAPABILITY: self._on_capability,
            State.UPSTREAM_STARTTLS: self._on_starttls,
            State.UPSTREAM_AUTH: self._on_authenticate,
            State.UPSTREAM_CHECK: self._on_check,
        }.get(self.state, self._on_unsolicited)
        handler(response)
        return True

    def _step_client(self) -> bool:
        if self.state not in _CLIENT_STATES:
            if len(self.client_in) > self._pending_limit:
                self._client_too_big("Too much input before the previous command finished")
            return False
        try:
            if self.state is State.CLIENT_SASL:
                line = self.client_in.next_line()
                if line is None:
                    return False
                self._on_sasl_response(strip_eol(line))
                return True
            event = self._reader.next(self.client_in)
        except LineTooLong:
            self._client_too_big("Command line too long")
            return True
        if event is None:
            return False
        if isinstance(event, Continue):
            self.to_client(b"+ Ready for literal\r\n")
        elif isinstance(event, Rejected):
            self._reply(event.tag or "*", event.status, event.text)
            if event.fatal:
                self.to_client(b"* BYE Cannot continue after this error\r\n")
                self.close(f"client error: {event.text}")
        else:
            self._on_command(event)
        return True

    # -- upstream, before the client is greeted ---------------------------------------------

    def _on_greeting(self, response: Response) -> None:
        if response.tag != "*" or response.status not in {"OK", "PREAUTH"}:
            self._fail_upstream("upstream sent no IMAP greeting")
        elif response.status == "PREAUTH":
            self._fail_upstream("upstream greeted with PREAUTH: cannot authenticate")
        else:
            self._take_capabilities(response)
            self._capabilities_known()

    def _on_capability(self, response: Response) -> None:
        self._take_capabilities(response)
        if response.tag != "*" and self._is_ours(response, "CAPABILITY"):
            self._caps_known = True  # an empty list if upstream sent none
            self._capabilities_known()

    def _on_starttls(self, response: Response) -> None:
        if response.tag == "*" or not self._is_ours(response, "STARTTLS"):
            return
        # RFC 3501 §6.2.1 / RFC 2595 §3.1: nothing received in plaintext after the OK counts.
        self.upstream_in.clear()
        self._responses.reset()
        self.emit(StartUpstreamTLS())
        self._upstream_tls = True
        self._caps_known = False  # capabilities learnt before TLS are not trusted
        self.upstream_capabilities = []
        self._capabilities_known()

    def _take_capabilities(self, response: Response) -> None:
        capabilities = response_capabilities(response)
        if capabilities is not None:
            self.upstream_capabilities, self._caps_known = capabilities, True

    def _capabilities_known(self) -> None:
        if not self._caps_known:
            self._send_command(b"CAPABILITY")
            self.state = State.UPSTREAM_CAPABILITY
        elif self.upstream.starttls and not self._upstream_tls:
            if not has_capability(self.upstream_capabilities, "STARTTLS"):
                self._fail_upstream("upstream does not offer STARTTLS, which is configured")
                return
            self._send_command(b"STARTTLS")
            self.state = State.UPSTREAM_STARTTLS
        else:
            caps = " ".join(self.client_capabilities())
            host = printable(self.local.hostname, 100)
            self.to_client(f"* OK [CAPABILITY {caps}] {host} ready (mailwarden)\r\n".encode())
            self.state = State.CLIENT_COMMAND

    def client_capabilities(self) -> list[str]:
        offer = self.local.starttls and not self.client_tls
        return client_capabilities(self.upstream_capabilities, offer)

    # -- client commands ---------------------------------------------------------------------

    def _on_command(self, command: Command) -> None:
        tag, name = command.tag, command.name
        if name == "LOGIN":
            self._start_login(tag, login_credentials(command))
        elif name == "AUTHENTICATE":
            request = authenticate_request(command)
            if isinstance(request, AskPlain):
                self._sasl_tag = tag
                self.to_client(b"+ \r\n")
                self.state = State.CLIENT_SASL
            else:
                self._start_login(tag, request)
        elif name == "ID":  # RFC 2971; arguments (a list or NIL) are not interpreted
            self.to_client(b"* ID NIL\r\n")
            self._reply(tag, "OK", "ID completed")
        elif name not in {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS"}:
            self._reply(tag, "BAD", "Command not allowed before login")
        elif any(command.texts) or command.literals:
            self._reply(tag, "BAD", f"{name} takes no arguments")
        elif name == "CAPABILITY":
            self.to_client(f"* CAPABILITY {' '.join(self.client_capabilities())}\r\n".encode())
            self._reply(tag, "OK", "CAPABILITY completed")
        elif name == "NOOP":
            self._reply(tag, "OK", "NOOP completed")
        elif name == "LOGOUT":
            self.to_client(b"* BYE Logging out\r\n")
            self._reply(tag, "OK", "LOGOUT completed")
            self.close("client logged out")
        elif not self.local.starttls or self.client_tls:
            self._reply(tag, "BAD", "STARTTLS not available")
        else:
            self._reply(tag, "OK", "Begin TLS negotiation now")
            self.emit(StartClientTLS())
            # RFC 3501 §6.2.1: commands pipelined in plaintext after STARTTLS are discarded.
            self.client_in.clear()
            self._reader.reset()
            self.client_tls = True

    def _on_sasl_response(self, line: bytes) -> None:
        self.state = State.CLIENT_COMMAND
        self._start_login(self._sasl_tag, plain_credentials(self._sasl_tag, line))

    def _start_login(self, tag: str, result: Credentials | Rejected) -> None:
        if isinstance(result, Rejected):
            self._reply(result.tag or "*", result.status, result.text)
            return
        self._login = _Login(tag, result.username)
        self._untagged, self._untagged_size = [], 0
        self.state = State.AWAIT_TOKEN
        self.emit(Authenticate(result.username, result.password))

    # -- upstream, during the login ----------------------------------------------------------

    def _on_authenticate(self, response: Response) -> None:
        login = self._expect_login(State.UPSTREAM_AUTH)
        if response.tag == "+":
            if self._initial_response is not None:  # no SASL-IR: the server asks for it now
                self.to_upstream(self._initial_response + CRLF)
                self._initial_response = None
            elif login.challenge is None:
                login.challenge = sasl.parse_error_challenge(response.text.encode())
                self.to_upstream(sasl.error_challenge_reply(login.mechanism) + CRLF)
            else:
                self._fail_upstream("upstream sent a second error challenge")
        elif response.tag == "*":
            self._keep_untagged(response)
        elif not self._is_ours(response, "AUTHENTICATE"):
            return
        elif response.status == "OK":
            self._initial_response = None
            if response.code.upper().startswith("CAPABILITY "):
                # atoms only, as in our greeting: no upstream control characters in our line
                login.ok_code = " ".join(["CAPABILITY", *capability_list(response.code)])
            self._send_command(b"NOOP")  # catches Microsoft's "authenticated but not connected"
            self.state = State.UPSTREAM_CHECK
        else:
            self._initial_response = None
            self._refused(login, response)

    def _refused(self, login: _Login, response: Response) -> None:
        challenge = login.challenge
        # for LoginFailed: the whole tagged reply, then the error challenge before it
        code = f"[{response.code}] " if response.code else ""
        detail = printable(f"{response.status} {code}{response.text}", 300)
        if challenge is not None and challenge.retryable and not login.retried:
            login.retried = True
            self.state = State.AWAIT_FRESH_TOKEN
            self.emit(NeedFreshToken(challenge.status))
        elif challenge is not None:
            detail = f"{detail} {printable(challenge.detail, 300)}".strip()
            self._login_failed(AUTH_FAILED, FailureKind.TOKEN_REJECTED, detail)
        elif response.code.upper().startswith("UNAVAILABLE") or (
            THROTTLED in response.text.lower()  # Microsoft's BAD: "not now", not "wrong"
        ):
            self._login_failed(TEMP_FAILURE, FailureKind.UPSTREAM_ERROR, detail)
        elif response.status == "NO":
            self._login_failed(AUTH_FAILED, FailureKind.TOKEN_REJECTED, detail)
        else:
            self._login_failed(AUTH_FAILED, FailureKind.UPSTREAM_ERROR, detail)

    def _on_check(self, response: Response) -> None:
        login = self._expect_login(State.UPSTREAM_CHECK)
        if response.tag == "*":
            self._keep_untagged(response)
        elif not self._is_ours(response, "NOOP"):
            return
        elif response.status == "OK":
            code = f"[{login.ok_code}] " if login.ok_code else ""
            self.to_client(
                b"".join(self._untagged) + f"{login.tag} OK {code}Logged in\r\n".encode()
            )
            self._login, self._untagged = None, []
            self.state = State.DONE
            self.emit(LoginSucceeded(login.username))
            self.splice()
        elif NOT_CONNECTED in response.text.lower():
            self._not_connected(response)
        else:
            self._fail_upstream(f"upstream refused NOOP after login: {printable(response.text)}")

    def _not_connected(self, response: Response) -> None:
        login = self._expect_login(State.UPSTREAM_CHECK)
        self._reply(login.tag, "NO", NOT_CONNECTED_TEXT)
        self.to_client(b"* BYE Closing the connection\r\n")
        self.emit(LoginFailed(login.username, FailureKind.NOT_CONNECTED, printable(response.text)))
        self._login = None
        self.state = State.DONE
        self.close("upstream: user is authenticated but not connected")

    def _keep_untagged(self, response: Response) -> None:
        self._untagged.append(response.raw)
        self._untagged_size += len(response.raw)
        if self._untagged_size > self.upstream_in.max_line:
            self._fail_upstream("upstream sent too many untagged responses during login")

    def _on_unsolicited(self, response: Response) -> None:
        if response.tag != "*":  # untagged chatter (* OK still here) is harmless
            self._fail_upstream("upstream sent an unexpected response")

    # -- helpers -----------------------------------------------------------------------------

    def _send_command(self, command: bytes) -> None:
        self._upstream_tag = f"mw{self._tag_number}"
        self._tag_number += 1
        self.to_upstream(self._upstream_tag.encode() + b" " + command + CRLF)

    def _is_ours(self, response: Response, command: str) -> bool:
        """True for the tagged completion of our command; anything else ends the session."""
        if response.tag == self._upstream_tag and response.status in {"OK", "NO", "BAD"}:
            if response.status == "OK" or command in {"AUTHENTICATE", "NOOP"}:
                return True
            self._fail_upstream(f"upstream refused {command}: {printable(response.text)}")
        else:
            self._fail_upstream(f"upstream sent an unexpected response to {command}")
        return False

    def _reply(self, tag: str, status: str, text: str) -> None:
        self.to_client(f"{tag} {status} {text}\r\n".encode())

    def _login_failed(self, text: str, kind: FailureKind, detail: str = "") -> None:
        login = self._login
        assert login is not None
        self._reply(login.tag, "NO", text)
        self.emit(LoginFailed(login.username, kind, detail))
        self._login, self._untagged = None, []
        self._reader.reset()
        self.state = State.CLIENT_COMMAND

    def _fail_upstream(self, reason: str) -> None:
        """Upstream is unusable: tell the client (as greeting or untagged BYE), then Close."""
        if self._login is not None and self.state in _LOGIN_STATES:
            self.emit(LoginFailed(self._login.username, FailureKind.UPSTREAM_ERROR, reason))
            self._reply(self._login.tag, "NO", TEMP_FAILURE)
        self._login = None
        self._initial_response = None
        self.to_client(BYE_UNAVAILABLE)
        self.state = State.DONE
        self.close(reason)

    def _client_too_big(self, text: str) -> None:
        self.to_client(f"* BAD [TOOBIG] {text}\r\n* BYE Closing the connection\r\n".encode())
        self.state = State.DONE
        self.close(f"client: {text.lower()}")

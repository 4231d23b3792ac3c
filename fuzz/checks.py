"""The rules every protocol core must keep under hostile input, as one checker.

Shared by the atheris targets (`fuzz.targets`) and the hypothesis state machines in
`tests/unit/test_*_stateful.py`. A `Checker` wraps one core, feeds it, drains its actions
and checks each batch:

- no exception escapes `receive_client` / `receive_upstream` / the closes, and the
  answers (`provide_token`, `reject_login`, `token_unavailable`) are only called when
  the core asked (a call out of turn is a caller bug, `RuntimeError` by contract);
- every action is an `Action`; nothing follows `Close` or `Splice`; `Splice` comes
  right after `LoginSucceeded`; one `Authenticate` / `NeedFreshToken` at a time;
- a `Close` caused by input comes with the protocol's own error reply (SMTP 4xx/5xx or
  221, POP3 `-ERR` or `+OK Bye`, IMAP `* BYE`); only the client closing needs none;
- upstream hears nothing but the proxy's pre-auth commands (greeting dialogue,
  STARTTLS, `AUTH`/`AUTHENTICATE` with the SASL response made from the token it was
  given, the error-challenge reply), and no `AUTH` before a token was provided;
- the token (and its SASL response) never reaches the client, the password never
  appears in any action but `Authenticate` (nor in a `Close` reason or a failure
  detail), unless upstream itself sent those bytes (then it is just relayed text);
  exempt are `Splice` (its leftovers are the peers' own bytes) and the IMAP tag, which
  the protocol echoes whatever the client put there;
- client output is whole lines, and the proxy's own lines hold no control characters
  (no bare CR/LF to split a reply, no NUL), even where built from upstream's text;
- while the session runs, the core's buffers stay within `max_line` / `max_literal`
  (their sums, as documented per core in `bounds`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import get_args

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.imap import ImapCore
from mailwarden_proxy.protocols.pop3 import Pop3Core
from mailwarden_proxy.protocols.sasl import initial_response
from mailwarden_proxy.protocols.session import (
    Action,
    Authenticate,
    Close,
    LocalInfo,
    LoginFailed,
    LoginSucceeded,
    NeedFreshToken,
    SendClient,
    SendUpstream,
    SessionCore,
    Splice,
    UpstreamInfo,
)
from mailwarden_proxy.protocols.smtp import SmtpCore

TOKEN = "ya29.fuzz-TOKEN-9f3c"
PASSWORD = "pw-7Hq!local"
USER = "app@example.com"
UPSTREAM_USER = "box@example.com"
ACTION_TYPES = get_args(Action)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def challenge(status: str) -> bytes:
    return b64(f'{{"status":"{status}","schemes":"Bearer"}}')


CH401, CH_INVALID, CH_500 = challenge("401"), challenge("invalid_token"), challenge("500")


# -- what each protocol looks like ---------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One core and the facts about its dialogue the checker and the fuzzers need."""

    name: str
    make_core: Callable[..., SessionCore]
    port: int
    commands: re.Pattern[bytes]  # the proxy's own pre-auth commands to upstream
    closing_reply: Callable[[list[bytes]], bool]  # the client output of a closing batch
    client_lines: tuple[bytes, ...]  # plausible client input (with terminators)
    dialogue: tuple[tuple[re.Pattern[bytes], tuple[bytes, ...]], ...]  # upstream answers
    tagged: bool = False  # IMAP: "TAG" in answers is the tag of the last command

    def upstream_answers(self, last_sent: bytes) -> tuple[bytes, ...]:
        """Plausible upstream replies (good and bad) to the last thing the proxy sent."""
        for pattern, answers in self.dialogue:
            if pattern.fullmatch(last_sent):
                if self.tagged:
                    tag = last_sent.split(b" ", 1)[0] if last_sent.startswith(b"mw") else b"mw0"
                    return tuple(a.replace(b"TAG", tag) for a in answers)
                return answers
        return ()


def _smtp_closing(sent: list[bytes]) -> bool:
    last = sent[-1].splitlines()[-1] if sent else b""
    return re.match(rb"(?:[45][0-9][0-9]|221) ", last) is not None


def _pop3_closing(sent: list[bytes]) -> bool:
    return bool(sent) and sent[-1].startswith((b"-ERR", b"+OK Bye"))


def _imap_closing(sent: list[bytes]) -> bool:
    return any(b"* BYE " in data for data in sent)


_SASL_LINE = rb"[A-Za-z0-9+/=]*\r\n"
_PLAIN = b64(f"\0{USER}\0{PASSWORD}")

SMTP = Protocol(
    name="smtp",
    make_core=SmtpCore,
    port=587,
    commands=re.compile(rb"EHLO [!-~]+\r\n|STARTTLS\r\n|AUTH (?:XOAUTH2|OAUTHBEARER)\r\n"),
    closing_reply=_smtp_closing,
    client_lines=(
        b"EHLO app.local\r\n",
        b"HELO app.local\r\n",
        b"STARTTLS\r\n",
        b"AUTH PLAIN " + _PLAIN + b"\r\n",
        b"AUTH PLAIN\r\n",
        _PLAIN + b"\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH LOGIN " + b64(USER) + b"\r\n",
        b64(USER) + b"\r\n",
        b64(PASSWORD) + b"\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH XOAUTH2\r\n",
        b"*\r\n",
        b"NOOP\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"DATA\r\n",
        b"EHLO\r\n",
        b"EH\x00LO x\r\n",
    ),
    dialogue=(
        (
            re.compile(rb""),
            (b"220 up.example ESMTP\r\n", b"220-up\r\n220 up\r\n", b"554 no service\r\n"),
        ),
        (
            re.compile(rb"EHLO .*\r\n"),
            (
                b"250-up.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH XOAUTH2\r\n",
                b"250 up.example\r\n",
                b"500 what\r\n",
            ),
        ),
        (re.compile(rb"STARTTLS\r\n"), (b"220 go ahead\r\n", b"454 TLS not available\r\n")),
        (
            re.compile(rb"AUTH .*\r\n"),
            (b"334 \r\n", b"535 5.7.8 no\r\n", b"454 4.7.0 later\r\n", b"235 what\r\n"),
        ),
        (
            re.compile(rb"(?:|AQ==)\r\n"),
            (b"535 5.7.8 Authentication failed\r\n", b"454 4.7.0 try later\r\n", b"250 ok\r\n"),
        ),
        (
            re.compile(_SASL_LINE),
            (
                b"235 2.7.0 Accepted\r\n",
                b"334 " + CH401 + b"\r\n",
                b"334 " + CH_INVALID + b"\r\n",
                b"334 " + CH_500 + b"\r\n",
                b"535 5.7.8 Username and Password not accepted\r\n",
                b"454 4.7.0 Temporary failure\r\n",
            ),
        ),
    ),
)

POP3 = Protocol(
    name="pop3",
    make_core=Pop3Core,
    port=995,
    commands=re.compile(rb"CAPA\r\n|STLS\r\n|AUTH (?:XOAUTH2|OAUTHBEARER)\r\n"),
    closing_reply=_pop3_closing,
    client_lines=(
        b"CAPA\r\n",
        b"STLS\r\n",
        b"USER " + USER.encode() + b"\r\n",
        b"PASS " + PASSWORD.encode() + b"\r\n",
        b"AUTH\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN " + _PLAIN + b"\r\n",
        _PLAIN + b"\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH XOAUTH2\r\n",
        b"*\r\n",
        b"QUIT\r\n",
        b"STAT\r\n",
        b"USER\r\n",
        b"PASS\r\n",
        b"RETR 1\r\n",
    ),
    dialogue=(
        (re.compile(rb""), (b"+OK Dovecot ready.\r\n", b"-ERR [SYS/TEMP] busy\r\n")),
        (
            re.compile(rb"CAPA\r\n"),
            (
                b"+OK\r\nTOP\r\nUSER\r\nSTLS\r\nSASL XOAUTH2 OAUTHBEARER\r\n..odd\r\n.\r\n",
                b"+OK\r\nUIDL\r\n.\r\n",
                b"-ERR no CAPA\r\n",
            ),
        ),
        (re.compile(rb"STLS\r\n"), (b"+OK Begin TLS\r\n", b"-ERR no\r\n")),
        (
            re.compile(rb"AUTH .*\r\n"),
            (b"+ \r\n", b"-ERR [SYS/TEMP] later\r\n", b"-ERR no\r\n", b"+OK what\r\n"),
        ),
        (
            re.compile(rb"(?:|AQ==)\r\n"),
            (b"-ERR [AUTH] Authentication failed\r\n", b"-ERR [SYS/TEMP] x\r\n", b"+OK\r\n"),
        ),
        (
            re.compile(_SASL_LINE),
            (
                b"+OK Logged in.\r\n",
                b"+ " + CH401 + b"\r\n",
                b"+ " + CH_INVALID + b"\r\n",
                b"-ERR [AUTH] Authentication failed\r\n",
                b"-ERR [IN-USE] busy\r\n",
                b"-ERR [LOGIN-DELAY] wait\r\n",
            ),
        ),
    ),
)

IMAP = Protocol(
    name="imap",
    make_core=ImapCore,
    port=993,
    commands=re.compile(
        rb"mw[0-9]+ (?:CAPABILITY|STARTTLS|NOOP|AUTHENTICATE (?:XOAUTH2|OAUTHBEARER)"
        rb"(?: [A-Za-z0-9+/=]+)?)\r\n"
    ),
    closing_reply=_imap_closing,
    client_lines=(
        b"a CAPABILITY\r\n",
        b"a NOOP\r\n",
        b"a STARTTLS\r\n",
        b"a ID NIL\r\n",
        b"a LOGOUT\r\n",
        b'a LOGIN "' + USER.encode() + b'" "' + PASSWORD.encode() + b'"\r\n',
        b"a LOGIN " + USER.encode() + b" {12}\r\n",
        PASSWORD.encode() + b"\r\n",
        b"a LOGIN {15+}\r\n" + USER.encode() + b" {12+}\r\n" + PASSWORD.encode() + b"\r\n",
        b"a AUTHENTICATE PLAIN " + _PLAIN + b"\r\n",
        b"a AUTHENTICATE PLAIN\r\n",
        _PLAIN + b"\r\n",
        b"a AUTHENTICATE XOAUTH2 abc\r\n",
        b"*\r\n",
        b"a SELECT INBOX\r\n",
        b"a LOGIN user {99999999}\r\n",
        b"a LOGIN user {40+}\r\n",
        b"* LOGIN\r\n",
        b"\r\n",
    ),
    dialogue=(
        (
            re.compile(rb""),
            (
                b"* OK [CAPABILITY IMAP4rev1 SASL-IR STARTTLS AUTH=XOAUTH2] ready\r\n",
                b"* OK [CAPABILITY IMAP4rev1 STARTTLS AUTH=OAUTHBEARER] no SASL-IR\r\n",
                b"* OK ready\r\n",
                b"* PREAUTH hi\r\n",
                b"* BYE busy\r\n",
            ),
        ),
        (
            re.compile(rb"mw[0-9]+ CAPABILITY\r\n"),
            (
                b"* CAPABILITY IMAP4rev1 STARTTLS SASL-IR\r\nTAG OK done\r\n",
                b"TAG OK done\r\n",
                b"TAG NO refused\r\n",
            ),
        ),
        (re.compile(rb"mw[0-9]+ STARTTLS\r\n"), (b"TAG OK go\r\n", b"TAG BAD no\r\n")),
        (
            re.compile(rb"mw[0-9]+ AUTHENTICATE .*\r\n|" + _SASL_LINE),
            (
                b"TAG OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
                b"+ \r\n",
                b"+ " + CH401 + b"\r\n",
                b"+ " + CH_INVALID + b"\r\n",
                b"TAG NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
                b"TAG NO [UNAVAILABLE] later\r\n",
                b"* CAPABILITY IMAP4rev1 IDLE\r\n",
            ),
        ),
        (
            re.compile(rb"mw[0-9]+ NOOP\r\n"),
            (
                b"TAG OK NOOP completed\r\n",
                b"* 3 EXISTS\r\nTAG OK done\r\n",
                b"TAG NO User is authenticated but not connected.\r\n",
                b"* BYE User is authenticated but not connected.\r\n",
            ),
        ),
    ),
    tagged=True,
)

PROTOCOLS = {p.name: p for p in (SMTP, POP3, IMAP)}


def bounds(core: SessionCore) -> dict[str, tuple[int, int]]:
    """(bytes held, limit) for each buffer of a running core.

    Line cores: a partial client line or client input waiting for a reply is at most
    `max_line`; upstream input at most the upstream line limit, and one reply's lines
    together likewise. IMAP: client input waiting is at most `max_line + max_literal`
    (its pending limit), a command being assembled at most `max_line + 2 * max_literal`;
    upstream input at most a line or a literal, one response together its reader's limit,
    untagged responses kept during the login one upstream line.
    """
    up_line = core.upstream_in.max_line
    if isinstance(core, ImapCore):
        reader, responses = core._reader, core._responses
        held = {
            "client_in": (len(core.client_in), core.max_line + core.max_literal),
            "command": (sum(map(len, reader._texts + reader._literals)), reader.max_command),
            "upstream_in": (len(core.upstream_in), max(up_line, core.max_literal)),
            "response": (sum(map(len, responses._parts)), responses.max_response),
            "untagged": (sum(map(len, core._untagged)), up_line),
        }
    else:
        held = {
            "client_in": (len(core.client_in), core.max_line),
            "upstream_in": (len(core.upstream_in), up_line),
        }
        if isinstance(core, SmtpCore):
            held["reply"] = (sum(map(len, core._reader._lines)), core._reader.max_bytes)
        elif isinstance(core, Pop3Core):
            held["list"] = (sum(map(len, core._list._lines)), core._list.max_bytes)
    return held


# -- the checker -----------------------------------------------------------------------------


class Violation(AssertionError):
    """A rule above was broken (the message says which)."""


@dataclass
class Checker:
    protocol: Protocol
    core: SessionCore
    actions: list[Action] = field(default_factory=list)
    finished: bool = False
    logged_in: bool = False
    outstanding: Action | None = None  # the Authenticate / NeedFreshToken to answer
    responses: set[bytes] = field(default_factory=set)  # SASL responses from given tokens
    from_client: bytearray = field(default_factory=bytearray)
    from_upstream: bytearray = field(default_factory=bytearray)

    @classmethod
    def create(
        cls,
        protocol: Protocol,
        *,
        starttls: bool = False,
        local_starttls: bool = False,
        tls_active: bool = False,
        max_line: int = 1024,
        max_literal: int = 256,
    ) -> Checker:
        core = protocol.make_core(
            UpstreamInfo(f"{protocol.name}.example", protocol.port, starttls),
            LocalInfo(starttls=local_starttls, tls_active=tls_active, hostname="proxy.test"),
            max_line=max_line,
            max_literal=max_literal,
        )
        return cls(protocol, core)

    # -- inputs ------------------------------------------------------------------------------

    def client(self, data: bytes) -> list[Action]:
        self.from_client += data
        self.core.receive_client(data)
        return self._collect("client")

    def upstream(self, data: bytes) -> list[Action]:
        self.from_upstream += data
        self.core.receive_upstream(data)
        return self._collect("upstream")

    def client_closed(self) -> list[Action]:
        self.core.client_closed()
        return self._collect("client closed")

    def upstream_closed(self) -> list[Action]:
        self.core.upstream_closed()
        return self._collect("upstream closed")

    def answer(self, choice: int) -> list[Action] | None:
        """Answer the outstanding request: 0 XOAUTH2 token, 1 OAUTHBEARER token, 2 wrong
        local password, 3 no token for now, 4 no token for good, 5 rate-limited (refused
        unchecked). None if nothing was asked."""
        asked, self.outstanding = self.outstanding, None
        if asked is None:
            return None
        choice %= 6
        if choice in (2, 5) and isinstance(asked, NeedFreshToken):
            choice = 4  # reject_login only answers Authenticate (contract)
        if choice in (0, 1):
            mechanism = Mechanism.XOAUTH2 if choice == 0 else Mechanism.OAUTHBEARER
            raw = initial_response(
                mechanism, UPSTREAM_USER, TOKEN, self.core.upstream.host, self.core.upstream.port
            )
            self.responses.add(b64(raw))
            self.core.provide_token(UPSTREAM_USER, TOKEN, mechanism)
        elif choice in (2, 5):
            self.core.reject_login(rate_limited=choice == 5)
        else:
            self.core.token_unavailable(permanent=choice == 4)
        return self._collect("answer")

    def answer_out_of_turn(self) -> None:
        """Calling an answer when nothing was asked is a caller bug: RuntimeError, no output."""
        if self.outstanding is not None or self.finished:
            return
        calls: tuple[Callable[[], None], ...] = (
            lambda: self.core.provide_token(UPSTREAM_USER, TOKEN, Mechanism.XOAUTH2),
            self.core.reject_login,
            lambda: self.core.token_unavailable(permanent=False),
        )
        for call in calls:
            try:
                call()
            except RuntimeError:
                pass
            else:
                raise Violation("an answer out of turn was accepted")
            if self.core.next_action() is not None:
                raise Violation("an answer out of turn produced output")

    def last_sent_upstream(self) -> bytes:
        for action in reversed(self.actions):
            if isinstance(action, SendUpstream):
                return action.data
        return b""

    # -- the rules ---------------------------------------------------------------------------

    def _collect(self, cause: str) -> list[Action]:
        batch: list[Action] = []
        while (action := self.core.next_action()) is not None:
            batch.append(action)
        for action in batch:
            self._check(action, cause, batch)
            self.actions.append(action)
        if self.core.finished != self.finished:
            raise Violation(f"core.finished={self.core.finished} but no Close/Splice seen")
        if not self.finished:
            for name, (held, limit) in bounds(self.core).items():
                if held > limit:
                    raise Violation(f"{name} holds {held} bytes, limit {limit} (after {cause})")
        return batch

    def _secret_leaks(self, data: bytes) -> list[str]:
        """Secrets in `data` that the peers did not send themselves."""
        peers = bytes(self.from_upstream)
        found = []
        for name, secret in (
            ("token", TOKEN.encode()),
            ("password", PASSWORD.encode()),
            ("password (base64)", b64(PASSWORD)),
            *(("SASL response", r) for r in self.responses),
        ):
            if secret in data and secret not in peers:
                found.append(name)
        return found

    def _check(self, action: Action, cause: str, batch: Sequence[Action]) -> None:
        if not isinstance(action, ACTION_TYPES):
            raise Violation(f"not an Action: {action!r}")
        if self.finished:
            raise Violation(f"{action!r} after the session finished")
        previous = self.actions[-1] if self.actions else None
        if isinstance(action, Authenticate | NeedFreshToken):
            if self.outstanding is not None:
                raise Violation(f"{action!r} while {self.outstanding!r} is unanswered")
            self.outstanding = action
        elif isinstance(action, SendClient):
            shown = action.data
            if self.protocol.tagged:  # IMAP echoes the client's tag, whatever it holds
                shown = b"\n".join(line.partition(b" ")[2] for line in shown.split(b"\n"))
            if leaks := self._secret_leaks(shown):
                raise Violation(f"{', '.join(leaks)} sent to the client: {action.data[:300]!r}")
            if not action.data.endswith(b"\n"):
                raise Violation(f"client output is not whole lines: {action.data[-40:]!r}")
            # The proxy's own replies hold no bare CR/LF (reply splitting), NUL or other
            # controls, even where built from upstream's text. IMAP relays upstream's
            # untagged responses during the login as they are: there only the last line
            # (ours) counts.
            own = action.data.removesuffix(b"\r\n")
            if self.protocol.tagged:
                own = own.rpartition(b"\n")[2]
            if _CONTROL.search(own.replace(b"\r\n", b"")):
                raise Violation(f"control characters in a reply: {action.data[:200]!r}")
        elif isinstance(action, SendUpstream):
            self._check_upstream(action.data)
        elif isinstance(action, LoginSucceeded):
            if not self.responses:
                raise Violation("login succeeded without a token")
            self.logged_in = True
        elif isinstance(action, Splice):
            if not isinstance(previous, LoginSucceeded):
                raise Violation("Splice not right after LoginSucceeded")
            self.finished = True
        elif isinstance(action, Close):
            if leaks := self._secret_leaks(action.reason.encode()):
                raise Violation(f"{', '.join(leaks)} in a Close reason")
            if cause != "client closed":
                sent = [a.data for a in batch if isinstance(a, SendClient)]
                if not self.protocol.closing_reply(sent):
                    raise Violation(f"Close after {cause} without a proper reply: {sent!r}")
            self.finished = True
        elif isinstance(action, LoginFailed):
            if leaks := self._secret_leaks(action.detail.encode()):
                raise Violation(f"{', '.join(leaks)} in LoginFailed.detail")
        elif isinstance(action, NeedFreshToken) and self._secret_leaks(action.status.encode()):
            raise Violation("a secret in NeedFreshToken.status")

    def _check_upstream(self, data: bytes) -> None:
        if self.logged_in:
            raise Violation("SendUpstream after LoginSucceeded")
        if leaks := [x for x in self._secret_leaks(data) if x != "SASL response"]:
            raise Violation(f"{', '.join(leaks)} sent upstream")
        for line in data.splitlines(keepends=True):
            if self.protocol.commands.fullmatch(line):
                if b"AUTH" in line and not self.responses:
                    raise Violation("AUTH sent upstream before a token was provided")
                ir = line.split(b" ")[3:]
                if ir and ir[0].rstrip(b"\r\n") not in self.responses:
                    raise Violation("an initial response not made from the given token")
                continue
            body = line.removesuffix(b"\r\n")
            if self.responses and (body in (b"", b"AQ==") or body in self.responses):
                continue
            raise Violation(f"not a proxy command sent upstream: {line[:60]!r}")

"""Stateful fuzzing of the three protocol cores (hypothesis `RuleBasedStateMachine`).

The existing property tests (test_imap_fuzz.py, test_smtp_pop3_fuzz.py) feed byte lists
and check the action stream; here one machine per core interleaves everything a session
can meet, step by step: plausible and garbage client input (commands, AUTH exchanges,
STARTTLS, literals, pipelined lines, oversized lines), a cooperative upstream answering
the proxy's last command well or badly (greetings, capabilities, multi-line replies, SASL
challenges, tagged and untagged responses), garbage and oversized upstream input, the
I/O layer's answers (provide_token / reject_login / token_unavailable, and answers out
of turn) and closes. After every step `fuzz.checks.Checker` enforces the rules listed
there: no exception, a proper error reply with every Close, bounded buffers, nothing
upstream but the proxy's own pre-auth commands, no token to the client, no password
outside `Authenticate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from fuzz.checks import IMAP, PASSWORD, POP3, SMTP, USER, Checker, Protocol, b64
from fuzz.targets import cooperative_prelude
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mailwarden_proxy.protocols.imap import ImapCore
from mailwarden_proxy.protocols.line_core import LineDrivenCore
from mailwarden_proxy.protocols.session import SendClient, SessionCore

GENERIC_PIECES = (
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\x00",
    b"\xff",
    b"\x7f",
    b'"',
    b"\\",
    b"*",
    b"=",
    b"+",
    b"{5}\r\n",
    b"{3+}\r\n",
    b"{0}\r\n",
    b"{4294967296}\r\n",
    b"AUTH",
    b"PLAIN",
)
UPSTREAM_PIECES = (b"mw0 ", b"mw1 ", b"mw2 ", b"* ", b"+ ", b"OK ", b"NO ", b"BAD ", b"BYE ")


def _noise(pieces: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    return st.lists(
        st.one_of(st.sampled_from(pieces), st.binary(max_size=24)), min_size=1, max_size=10
    ).map(b"".join)


# Whole logins, as clients send them (the cooperative path to the deep states).
LOGINS = {
    "smtp": (
        b"EHLO app\r\nAUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}") + b"\r\n",
        b"EHLO app\r\nAUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64(PASSWORD) + b"\r\n",
    ),
    "pop3": (
        f"USER {USER}\r\nPASS {PASSWORD}\r\n".encode(),
        b"AUTH PLAIN\r\n" + b64(f"\0{USER}\0{PASSWORD}") + b"\r\n",
    ),
    "imap": (
        f'a LOGIN {USER} "{PASSWORD}"\r\n'.encode(),
        f"b LOGIN {{{len(USER)}+}}\r\n{USER} {{{len(PASSWORD)}}}\r\n{PASSWORD}\r\n".encode(),
        b"c AUTHENTICATE PLAIN " + b64(f"\0{USER}\0{PASSWORD}") + b"\r\n",
    ),
}


def awaits_upstream(core: SessionCore) -> bool:
    if isinstance(core, ImapCore):
        return core.state.name.startswith("UPSTREAM")
    assert isinstance(core, LineDrivenCore)
    return core._reads_upstream()


def hostile(rule_function: Callable[..., None]) -> Callable[..., None]:
    """Hostile steps start after a calm prefix drawn per run, so that runs get deep first."""
    return precondition(lambda self: self.steps >= self.calm)(rule_function)


class CoreMachine(RuleBasedStateMachine):
    protocol: ClassVar[Protocol]

    def __init__(self) -> None:
        super().__init__()
        self.checker = Checker.create(self.protocol)
        self.steps, self.calm = 0, 0

    @initialize(
        starttls=st.booleans(),
        local=st.sampled_from([(False, False), (True, False), (False, True)]),
        max_line=st.sampled_from([1024, 1024, 128]),
        max_literal=st.sampled_from([32, 256]),
        prelude=st.booleans(),
        calm=st.integers(min_value=0, max_value=30),
    )
    def start(
        self,
        starttls: bool,
        local: tuple[bool, bool],
        max_line: int,
        max_literal: int,
        prelude: bool,
        calm: int,
    ) -> None:
        self.calm = calm
        self.checker = Checker.create(
            self.protocol,
            starttls=starttls,
            local_starttls=local[0],
            tls_active=local[1],
            max_line=max_line,
            max_literal=max_literal,
        )
        if prelude:
            cooperative_prelude(self.checker)

    @invariant()
    def count_steps(self) -> None:
        self.steps += 1

    @rule(login=st.integers(min_value=0, max_value=2))
    def cooperate(self, login: int) -> None:
        """The next step of a well-behaved session: answer, reply, or log in."""
        if self.checker.outstanding is not None:
            self.checker.answer(0)
        elif awaits_upstream(self.checker.core):
            answers = self.protocol.upstream_answers(self.checker.last_sent_upstream())
            self.checker.upstream(answers[0] if answers else b"\r\n")
        else:
            logins = LOGINS[self.protocol.name]
            self.checker.client(logins[login % len(logins)])

    # -- the client ---------------------------------------------------------------------------

    @rule(data=st.data())
    def client_login(self, data: st.DataObject) -> None:
        self.checker.client(data.draw(st.sampled_from(LOGINS[self.protocol.name])))

    @rule(data=st.data())
    def client_line(self, data: st.DataObject) -> None:
        self.checker.client(data.draw(st.sampled_from(self.protocol.client_lines)))

    @hostile
    @rule(data=st.data(), cut=st.integers(min_value=0))
    def client_pipeline(self, data: st.DataObject, cut: int) -> None:
        """Several lines in one stream, cut into two reads anywhere."""
        lines = data.draw(st.lists(st.sampled_from(self.protocol.client_lines), max_size=5))
        stream = b"".join(lines)
        cut %= len(stream) + 1
        self.checker.client(stream[:cut])
        self.checker.client(stream[cut:])

    @hostile
    @rule(data=st.data())
    def client_garbage(self, data: st.DataObject) -> None:
        self.checker.client(data.draw(_noise(GENERIC_PIECES + self.protocol.client_lines)))

    @hostile
    @rule(extra=st.integers(min_value=-2, max_value=300), newline=st.booleans())
    def client_oversize(self, extra: int, newline: bool) -> None:
        size = self.checker.core.max_line + self.checker.core.max_literal + extra
        self.checker.client(b"a" * size + b"\r\n" * newline)

    # -- the upstream -------------------------------------------------------------------------

    @precondition(lambda self: awaits_upstream(self.checker.core))
    @rule(index=st.integers(min_value=0))
    def upstream_answers(self, index: int) -> None:
        answers = self.protocol.upstream_answers(self.checker.last_sent_upstream())
        if answers:
            self.checker.upstream(answers[index % len(answers)])

    @hostile
    @rule(data=st.data())
    def upstream_garbage(self, data: st.DataObject) -> None:
        answers = tuple(a for _, group in self.protocol.dialogue for a in group)
        pieces = GENERIC_PIECES + UPSTREAM_PIECES + answers
        self.checker.upstream(data.draw(_noise(pieces)))

    @hostile
    @precondition(lambda self: awaits_upstream(self.checker.core))
    @rule(
        index=st.integers(min_value=0),
        at=st.integers(min_value=0),
        byte=st.one_of(st.sampled_from(b"\r\n\x00\x1b\x7f"), st.integers(0, 255)).map(
            lambda b: bytes([b])
        ),
    )
    def upstream_answer_corrupted(self, index: int, at: int, byte: bytes) -> None:
        """A plausible answer with one byte inserted (a control character, often)."""
        answers = self.protocol.upstream_answers(self.checker.last_sent_upstream())
        if answers:
            answer = answers[index % len(answers)]
            at %= len(answer)
            self.checker.upstream(answer[:at] + byte + answer[at:])

    @hostile
    @rule(size=st.sampled_from([64 * 1024, 64 * 1024 + 1, 70_000]), newline=st.booleans())
    def upstream_oversize(self, size: int, newline: bool) -> None:
        self.checker.upstream(b"* " + b"x" * size + b"\r\n" * newline)

    @hostile
    @rule(count=st.integers(min_value=1, max_value=40))
    def upstream_multiline(self, count: int) -> None:
        """A long multi-line reply in the shape each protocol uses."""
        line = {"smtp": b"250-EXT", "pop3": b"CAPA-LINE", "imap": b"* OK [ALERT] chatter"}
        self.checker.upstream((line[self.protocol.name] + b" " + b"y" * 2000 + b"\r\n") * count)

    # -- the I/O layer ------------------------------------------------------------------------

    @precondition(lambda self: self.checker.outstanding is not None)
    @rule(choice=st.integers(min_value=0, max_value=5))
    def answer(self, choice: int) -> None:
        self.checker.answer(choice)

    @precondition(lambda self: self.checker.outstanding is None)
    @rule()
    def answer_out_of_turn(self) -> None:
        self.checker.answer_out_of_turn()

    @hostile
    @precondition(lambda self: not self.checker.finished)
    @rule(client=st.booleans())
    def close(self, client: bool) -> None:
        if client:
            self.checker.client_closed()
        else:
            self.checker.upstream_closed()

    def teardown(self) -> None:
        core = self.checker.core
        end = "logged in" if self.checker.logged_in else "closed" if core.finished else "open"
        event(f"session {end}; reached {getattr(core, 'state', None)}")

    @invariant()
    def finished_means_silent(self) -> None:
        if self.checker.finished:
            self.checker.client(b"NOOP\r\n")
            self.checker.upstream(b"+OK\r\n")


SETTINGS = settings(
    max_examples=300,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class SmtpMachine(CoreMachine):
    protocol = SMTP


class Pop3Machine(CoreMachine):
    protocol = POP3


class ImapMachine(CoreMachine):
    protocol = IMAP


def test_smtp_core_stateful() -> None:
    run_state_machine_as_test(SmtpMachine, settings=SETTINGS)


def test_pop3_core_stateful() -> None:
    run_state_machine_as_test(Pop3Machine, settings=SETTINGS)


def test_imap_core_stateful() -> None:
    run_state_machine_as_test(ImapMachine, settings=SETTINGS)


# -- regressions found by the fuzzers ------------------------------------------------------


def test_upstream_control_characters_stay_out_of_the_ehlo_reply() -> None:
    """atheris smtp_upstream: an EHLO line holding CR/NUL went into our EHLO reply."""
    checker = Checker.create(SMTP)
    checker.upstream(b"220 up\r\n")
    checker.upstream(b"250-up\r\n250-X\rY\x00Z\r\n250-8BITMIME\x07\r\n250 SIZE 1\r\n")
    assert checker.client(b"EHLO app\r\n") == [
        SendClient(
            b"250-proxy.test\r\n250-SIZE 1\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
        )
    ]


def test_upstream_control_characters_stay_out_of_the_capa_reply() -> None:
    """atheris pop3_upstream: a CAPA line holding CR/NUL went into our CAPA reply."""
    checker = Checker.create(POP3)
    checker.upstream(b"+OK up\r\n")
    checker.upstream(b"+OK\r\nTOP\r\n\r\x00\x05+O\r\nUIDL\x1b\r\n.\r\n")
    assert checker.client(b"CAPA\r\n") == [
        SendClient(
            b"+OK Capability list follows\r\nTOP\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\n"
            b"SASL PLAIN\r\nIMPLEMENTATION mailwarden\r\n.\r\n"
        )
    ]


def test_upstream_control_characters_stay_out_of_the_imap_login_reply() -> None:
    """The IMAP login OK carried upstream's [CAPABILITY ...] code as it came, CR and NUL too."""
    checker = Checker.create(IMAP)
    checker.upstream(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n")
    checker.client(b"a LOGIN user pw\r\n")
    checker.answer(0)
    checker.upstream(b"mw0 OK [CAPABILITY IMAP4rev1\rX\x00 \xff IDLE] done\r\n")
    assert checker.upstream(b"mw1 OK done\r\n")[0] == SendClient(
        b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    )

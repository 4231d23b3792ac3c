"""Property tests for SmtpCore and Pop3Core.

The rule, as in h11's fuzzing: whatever the peers send, the cores never raise; they emit
well-formed actions (nothing after Splice/Close), and the token or password never
reaches the client. A second property: any chunking of a scripted session yields the
same actions.
"""

from __future__ import annotations

import base64
import itertools
import json

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.errors import UpstreamProtocolError
from mailwarden_proxy.protocols.pop3 import Pop3Core
from mailwarden_proxy.protocols.replies import SmtpReplyReader, chomp, safe_text
from mailwarden_proxy.protocols.session import (
    Authenticate,
    LocalInfo,
    NeedFreshToken,
    SessionCore,
)
from mailwarden_proxy.protocols.smtp import SmtpCore
from tests.unit import test_pop3_core, test_smtp_core
from tests.unit.test_smtp_core import PASSWORD, TOKEN, check_well_formed, drain, run

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


_CHALLENGE = _b64(json.dumps({"status": "401"}))
CLIENT_LINES = [
    b"EHLO x",
    b"HELO x",
    b"STARTTLS",
    b"STLS",
    b"CAPA",
    b"NOOP",
    b"QUIT",
    b"USER alice",
    b"PASS " + PASSWORD.encode(),
    b"AUTH PLAIN",
    b"AUTH PLAIN " + _b64(f"\0alice\0{PASSWORD}"),
    b"AUTH LOGIN",
    b"AUTH",
    _b64("alice"),
    _b64(PASSWORD),
    _b64(f"\0alice\0{PASSWORD}"),
    b"*",
    b"=",
    b"MAIL FROM:<a@b>",
    b"\x00\xff garbage",
]
UPSTREAM_LINES = [
    b"220 hi",
    b"220-hi",
    b"250-x",
    b"250 STARTTLS",
    b"250 AUTH XOAUTH2",
    b"334 ",
    b"334 " + _CHALLENGE,
    b"235 ok",
    b"454 4.7.0 later",
    b"535 5.7.8 no",
    b"421 bye",
    b"+OK",
    b"+OK hi",
    b"-ERR [SYS/TEMP] later",
    b"-ERR no",
    b"+ ",
    b"+ " + _CHALLENGE,
    b"STLS",
    b".",
    b"..x",
    b"garbage",
]


def _line(choices: list[bytes]) -> st.SearchStrategy[bytes]:
    ending = st.sampled_from([b"\r\n", b"\n", b"", b"\r"])
    return st.tuples(st.sampled_from(choices), ending).map(lambda t: t[0] + t[1])


_CHUNK = st.one_of(
    st.binary(max_size=80),
    _line(CLIENT_LINES),
    _line(UPSTREAM_LINES),
)
_EVENTS = st.lists(st.tuples(st.sampled_from(["c", "u", "cclose", "uclose"]), _CHUNK), max_size=40)
_ANSWERS = st.lists(st.sampled_from(["xo", "ob", "reject", "temp", "perm"]), max_size=40)
_LOCALS = st.sampled_from(
    [LocalInfo(), LocalInfo(starttls=True), LocalInfo(starttls=True, tls_active=True)]
)


def _answer(core: SessionCore, choice: str) -> None:
    if choice in ("xo", "ob"):
        mech = Mechanism.XOAUTH2 if choice == "xo" else Mechanism.OAUTHBEARER
        core.provide_token("alice@example.com", TOKEN, mech)
    elif choice == "reject":
        try:
            core.reject_login()
        except RuntimeError:  # only valid after Authenticate, not NeedFreshToken
            core.token_unavailable(permanent=True)
    else:
        core.token_unavailable(permanent=choice == "perm")


def _cases() -> st.SearchStrategy[tuple[type[SessionCore], object]]:
    smtp = [(SmtpCore, case) for case in test_smtp_core.CASES]
    pop3 = [(Pop3Core, case) for case in test_pop3_core.CASES]
    return st.sampled_from(smtp + pop3)


@SETTINGS
@given(pair=_cases(), local=_LOCALS, events=_EVENTS, answers=_ANSWERS, data=st.data())
def test_any_input_is_handled(
    pair: tuple[type[SmtpCore] | type[Pop3Core], object],
    local: LocalInfo,
    events: list[tuple[str, bytes]],
    answers: list[str],
    data: st.DataObject,
) -> None:
    """A scripted session cut short at a random point (to reach the deep states), then
    random bytes and lines from both sides, with random answers to Authenticate."""
    cls, case = pair
    assert isinstance(case, (test_smtp_core.Case, test_pop3_core.Case))
    prefix = [s for s in case.steps if s[0] in ("c", "u")]
    prefix = prefix[: data.draw(st.integers(0, len(prefix)))]
    max_line = data.draw(st.sampled_from([32, 256, 4096]))
    core = cls(case.upstream, local, max_line=max_line)
    answers = list(answers)
    actions = []
    for kind, chunk in [*prefix, *events]:
        if kind == "c":
            core.receive_client(chunk)
        elif kind == "u":
            core.receive_upstream(chunk)
        elif kind == "cclose":
            core.client_closed()
        else:
            core.upstream_closed()
        new = drain(core)
        while new:
            actions += new
            pending = [a for a in new if isinstance(a, (Authenticate, NeedFreshToken))]
            new = []
            for _ in pending:
                _answer(core, answers.pop() if answers else "xo")
                new += drain(core)
    check_well_formed(actions)
    event(f"{cls.__name__} ends in {core.state.name}")
    if core.finished:
        core.receive_client(b"NOOP\r\n")
        core.receive_upstream(b"+OK\r\n")
        assert drain(core) == []


@SETTINGS
@given(pair=_cases(), data=st.data())
def test_any_chunking_gives_the_same_actions(
    pair: tuple[type[SmtpCore] | type[Pop3Core], object], data: st.DataObject
) -> None:
    cls, case = pair
    assert isinstance(case, (test_smtp_core.Case, test_pop3_core.Case))
    steps = []
    for step in case.steps:
        if step[0] not in ("c", "u") or len(step[1]) < 2:
            steps.append(step)
            continue
        cuts = data.draw(st.lists(st.integers(1, len(step[1]) - 1), max_size=4, unique=True))
        bounds = [0, *sorted(cuts), len(step[1])]
        steps += [(step[0], step[1][a:b]) for a, b in itertools.pairwise(bounds)]
    core = cls(case.upstream, case.local, max_line=case.max_line)
    assert run(core, steps, bytewise=False) == case.expected


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_reply_reader_raises_only_protocol_errors(lines: list[bytes]) -> None:
    reader = SmtpReplyReader(200)
    for line in lines:
        try:
            reply = reader.feed(line + b"\r\n")
        except UpstreamProtocolError:
            reader = SmtpReplyReader(200)
            continue
        if reply is not None:
            assert 200 <= reply.code < 600


@given(st.binary(max_size=100), st.binary(min_size=1, max_size=10))
def test_safe_text_is_printable_and_drops_secrets(text: bytes, secret: bytes) -> None:
    shown = safe_text(text, [secret])
    assert shown.isascii() and shown.isprintable()
    if secret in text:
        assert shown == ""
    assert chomp(text + b"\r\n") == text

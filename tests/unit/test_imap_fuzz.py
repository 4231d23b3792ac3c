"""Property tests for ImapCore: whatever either peer sends, the core answers or closes.

The rules: no exception at all; every action is an `Action`; nothing after `Close` or
`Splice`; at most one outstanding `Authenticate`/`NeedFreshToken`; the token never reaches
the client; and how the client's bytes are split into reads does not change the result.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any, get_args

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.imap import ImapCore
from mailwarden_proxy.protocols.session import (
    Action,
    Authenticate,
    Close,
    LoginSucceeded,
    NeedFreshToken,
    SendClient,
    SendUpstream,
    Splice,
    StartClientTLS,
)
from tests.unit.imap_script import TOKEN, drain, make_core

UP_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 STARTTLS] hi\r\n"
SECRETS = (
    TOKEN.encode(),
    base64.b64encode(f"user=u\x01auth=Bearer {TOKEN}\x01\x01".encode())[:40],
)

# Fragments worth combining ("|"-separated), besides arbitrary bytes.
CLIENT_PIECES = (
    b"a |LOGIN |login|AUTHENTICATE PLAIN| |\r\n|\n|\r|{5}\r\n|{3+}\r\n|{0}\r\n|{99999999999}\r\n"
    b'|"|\\"|\\\\|*|=|+|user|pw|STARTTLS|CAPABILITY|NOOP|LOGOUT|ID (|)|NIL|AHVzZXIAcHc='
    b"|\x00|\xff|\x01|]|(|%|\xc3\xa9|a LOGIN u p\r\n|b AUTHENTICATE PLAIN AHUAcA==\r\n"
).split(b"|")
UPSTREAM_PIECES = (
    b"* |OK |NO |BAD |BYE |PREAUTH |[CAPABILITY IMAP4rev1 SASL-IR] |[UNAVAILABLE] "
    b"|CAPABILITY IMAP4rev1 STARTTLS AUTH=XOAUTH2|mw0 |mw1 |mw2 |mw3 |+ |+\r\n|\r\n"
    b"|eyJzdGF0dXMiOiI0MDEifQ==|{4}\r\n|{9999999}\r\n|text|\x00|\xff"
    b"|User is authenticated but not connected."
    # whole responses, so that logins get somewhere
    b"|mw0 OK done\r\n|mw1 OK done\r\n|mw2 OK done\r\n|mw3 OK done\r\n|mw0 NO bad\r\n"
    b"|mw1 NO [UNAVAILABLE] down\r\n|+ eyJzdGF0dXMiOiI0MDEifQ==\r\n|* CAPABILITY IMAP4rev1\r\n"
    b"|mw2 BAD User is authenticated but not connected.\r\n|* BYE later\r\n|* OK hi\r\n"
).split(b"|")

client_bytes = st.lists(
    st.one_of(st.sampled_from(CLIENT_PIECES), st.binary(max_size=40)), max_size=30
).map(b"".join)
upstream_bytes = st.one_of(
    st.sampled_from([p for p in UPSTREAM_PIECES if p.endswith(b"\n")]),  # one whole response
    st.lists(st.one_of(st.sampled_from(UPSTREAM_PIECES), st.binary(max_size=40)), max_size=30).map(
        b"".join
    ),
)

ACTION_TYPES = get_args(Action)


class Checker:
    """Feeds a core and checks every action it emits against the rules above."""

    def __init__(self, core: ImapCore, answers: st.DataObject | None = None) -> None:
        self.core, self.answers = core, answers
        self.actions: list[Action] = []
        self.terminal = False
        self.outstanding: Action | None = None  # Authenticate / NeedFreshToken to answer

    def check(self) -> None:
        for action in drain(self.core):
            assert isinstance(action, ACTION_TYPES)
            assert not self.terminal, f"{action!r} after the session finished"
            if isinstance(action, Close | Splice):
                self.terminal = True
            if isinstance(action, Authenticate | NeedFreshToken):
                assert self.outstanding is None
                self.outstanding = action
            if isinstance(action, Splice):
                assert self.actions and isinstance(self.actions[-1], LoginSucceeded)
            if isinstance(action, SendClient):
                assert not any(secret in action.data for secret in SECRETS)
            self.actions.append(action)
        assert self.core.finished == self.terminal

    def client(self, data: bytes) -> None:
        self.core.receive_client(data)
        self.check()
        self.answer()

    def upstream(self, data: bytes) -> None:
        self.core.receive_upstream(data)
        self.check()
        self.answer()

    def answer(self) -> None:
        asked, self.outstanding = self.outstanding, None
        if asked is None or self.answers is None:
            return
        choice = self.answers.draw(
            st.sampled_from(["token", "oauthbearer", "reject", "temp", "perm"])
        )
        if choice in {"token", "oauthbearer"}:
            self.core.provide_token("u", TOKEN, Mechanism(choice.replace("token", "xoauth2")))
        elif choice == "reject" and isinstance(asked, Authenticate):
            self.core.reject_login()
        else:
            self.core.token_unavailable(choice == "perm")
        self.check()


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(chunks=st.lists(client_bytes, max_size=8), data=st.data())
def test_arbitrary_client_bytes(chunks: list[bytes], data: st.DataObject) -> None:
    checker = Checker(make_core(local_starttls=True, max_line=128, max_literal=32), data)
    checker.upstream(UP_GREETING)
    for chunk in chunks:
        checker.client(chunk)
    checker.core.client_closed()
    checker.check()
    assert checker.terminal


@FUZZ
@given(
    steps=st.lists(st.tuples(st.booleans(), st.one_of(client_bytes, upstream_bytes)), max_size=12),
    starttls=st.booleans(),
    greet=st.booleans(),
    data=st.data(),
)
def test_arbitrary_upstream_and_client_bytes(
    steps: list[tuple[bool, bytes]], starttls: bool, greet: bool, data: st.DataObject
) -> None:
    checker = Checker(make_core(starttls=starttls, max_line=128, max_literal=32), data)
    if greet:
        checker.upstream(UP_GREETING)
    for from_upstream, chunk in steps:
        (checker.upstream if from_upstream else checker.client)(chunk)
    checker.core.upstream_closed()
    checker.check()
    assert checker.terminal


# Replies to whatever the core asked last ("TAG" becomes its latest upstream tag).
DIALOGUE = [
    b"TAG OK done\r\n",
    b"TAG OK [CAPABILITY IMAP4rev1 IDLE] done\r\n",
    b"TAG NO bad\r\n",
    b"TAG NO [UNAVAILABLE] down\r\n",
    b"TAG BAD User is authenticated but not connected.\r\n",
    b"+ \r\n",
    b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n",
    b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n",
    b"* CAPABILITY IMAP4rev1 IDLE\r\n",
    b"* BYE later\r\n",
    b"* OK hi\r\n",
    b"mw99 OK wrong tag\r\n",
]


@FUZZ
@given(
    responses=st.lists(st.one_of(st.sampled_from(DIALOGUE), upstream_bytes), max_size=8),
    client=client_bytes,
    sasl_ir=st.booleans(),
    data=st.data(),
)
def test_arbitrary_upstream_during_login(
    responses: list[bytes], client: bytes, sasl_ir: bool, data: st.DataObject
) -> None:
    checker = Checker(make_core(max_line=128, max_literal=32), data)
    checker.upstream(b"* OK [CAPABILITY IMAP4rev1%s] hi\r\n" % (b" SASL-IR" * sasl_ir))
    checker.client(b"a LOGIN user pw\r\n")  # answered by a drawn choice
    for response in responses:
        sent = [a.data for a in checker.actions if isinstance(a, SendUpstream)]
        tag = sent[-1].split(b" ")[0] if sent and sent[-1].startswith(b"mw") else b"mw0"
        checker.upstream(response.replace(b"TAG", tag))
        checker.client(client)  # retries after a failure, buffered input otherwise
        client = b""


@FUZZ
@given(stream=client_bytes, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_splitting_client_reads_changes_nothing(stream: bytes, cuts: list[int]) -> None:
    def run(chunks: list[bytes]) -> list[Any]:
        core = make_core(local_starttls=True, max_line=128, max_literal=32)
        core.receive_upstream(UP_GREETING)
        for chunk in chunks:
            core.receive_client(chunk)
        return drain(core)

    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    whole = run([stream])
    if StartClientTLS() in whole:
        return  # discarding plaintext after STARTTLS depends on the reads by design
    assert run(chunks) == whole

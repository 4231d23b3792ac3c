"""Pop3Core: table-driven scenarios, each fed whole and byte by byte with identical actions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.errors import UpstreamProtocolError
from mailwarden_proxy.protocols.pop3 import Pop3Core, Pop3State, Status, parse_status
from mailwarden_proxy.protocols.session import (
    Action,
    Authenticate,
    Close,
    FailureKind,
    LocalInfo,
    LoginFailed,
    LoginSucceeded,
    NeedFreshToken,
    Splice,
    StartClientTLS,
    StartUpstreamTLS,
    UpstreamInfo,
)
from tests.unit.test_smtp_core import PASSWORD, TOKEN, C, Step, U, b64, challenge, drain, run

XO, OB = Mechanism.XOAUTH2, Mechanism.OAUTHBEARER
UPSTREAM = UpstreamInfo("pop.example", 995, starttls=False)

GREETING = b"+OK mailwarden POP3 ready (mailwarden)\r\n"
UP_CAPA = (
    b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\n"
    b"SASL PLAIN XOAUTH2 OAUTHBEARER\r\nIMPLEMENTATION Dovecot\r\n..odd\r\n.\r\n"
)
OUR_CAPA = (
    b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\n"
    b"AUTH-RESP-CODE\r\n..odd\r\nUSER\r\nSASL PLAIN\r\n"
)
OUR_CAPA_END = b"IMPLEMENTATION mailwarden\r\n.\r\n"
PRELUDE: list[Step] = [("u", b"+OK Dovecot ready.\r\n"), ("u", UP_CAPA)]
PRELUDE_OUT: list[Action] = [U(b"CAPA\r\n"), C(GREETING)]

PLAIN = b64(f"\0alice@example.com\0{PASSWORD}")
LOGGED = Authenticate("alice@example.com", PASSWORD)
USERPASS: list[Step] = [*PRELUDE, ("c", f"USER alice@example.com\r\nPASS {PASSWORD}\r\n".encode())]
USERPASS_OUT: list[Action] = [*PRELUDE_OUT, C(b"+OK\r\n"), LOGGED]
GIVE: Step = ("token", "alice@example.com", TOKEN, XO)
XO_RESPONSE = b64(f"user=alice@example.com\x01auth=Bearer {TOKEN}\x01\x01") + b"\r\n"
OB_RESPONSE = (
    b64(f"n,a=alice@example.com,\x01host=pop.example\x01port=995\x01auth=Bearer {TOKEN}\x01\x01")
    + b"\r\n"
)
CH401 = b"+ " + challenge(status="401", schemes="Bearer")
AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
TEMPORARY = b"-ERR [SYS/TEMP] Temporary authentication failure, try again later\r\n"
NOT_NOW = b"-ERR Command not valid before authentication\r\n"


def failed(kind: FailureKind, detail: str = "") -> LoginFailed:
    return LoginFailed("alice@example.com", kind, detail)


@dataclass
class Case:
    name: str
    steps: list[Step]
    expected: list[Action]
    local: LocalInfo = field(default_factory=LocalInfo)
    upstream: UpstreamInfo = UPSTREAM
    max_line: int = 1024


CASES = [
    # upstream side
    Case("prelude", PRELUDE, PRELUDE_OUT),
    Case(
        "greeting -ERR",
        [("u", b"-ERR [SYS/TEMP] busy\r\n")],
        [
            C(b"-ERR [SYS/TEMP] mailwarden upstream unavailable\r\n"),
            Close("upstream greeting refused"),
        ],
    ),
    Case(
        "garbage greeting",
        [("u", b"* OK imap?\r\n")],
        [
            C(b"-ERR [SYS/TEMP] mailwarden upstream unavailable\r\n"),
            Close("malformed POP3 status line"),
        ],
    ),
    Case(
        "CAPA unsupported upstream",
        [("u", b"+OK\r\n"), ("u", b"-ERR unknown command\r\n"), ("c", b"CAPA\r\n")],
        [
            U(b"CAPA\r\n"),
            C(GREETING),
            C(
                b"+OK Capability list follows\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n" + b"USER\r\n"
                b"SASL PLAIN\r\n" + OUR_CAPA_END
            ),
        ],
    ),
    Case(
        "upstream STLS",
        [
            ("u", b"+OK\r\n"),
            ("u", b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n"),
            ("u", b"+OK Begin TLS negotiation now.\r\n"),
            ("u", UP_CAPA),
        ],
        [U(b"CAPA\r\n"), U(b"STLS\r\n"), StartUpstreamTLS(), U(b"CAPA\r\n"), C(GREETING)],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream lacks STLS",
        PRELUDE,
        [
            U(b"CAPA\r\n"),
            C(b"-ERR [SYS/TEMP] mailwarden upstream unavailable\r\n"),
            Close("upstream does not offer STLS"),
        ],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream refuses STLS",
        [("u", b"+OK\r\n"), ("u", b"+OK\r\nSTLS\r\n.\r\n"), ("u", b"-ERR no\r\n")],
        [
            U(b"CAPA\r\n"),
            U(b"STLS\r\n"),
            C(b"-ERR [SYS/TEMP] mailwarden upstream unavailable\r\n"),
            Close("upstream refused STLS"),
        ],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream talks out of turn",
        [*PRELUDE, ("u", b"-ERR timeout\r\n")],
        [
            *PRELUDE_OUT,
            C(b"-ERR [SYS/TEMP] mailwarden upstream connection failed\r\n"),
            Close("upstream sent data out of turn"),
        ],
    ),
    Case(
        "upstream closes",
        [*PRELUDE, ("uclose",)],
        [
            *PRELUDE_OUT,
            C(b"-ERR [SYS/TEMP] mailwarden upstream closed the connection\r\n"),
            Close("upstream closed the connection"),
        ],
    ),
    # client commands
    Case(
        "CAPA rewritten", [*PRELUDE, ("c", b"capa\r\n")], [*PRELUDE_OUT, C(OUR_CAPA + OUR_CAPA_END)]
    ),
    Case(
        "CAPA offers STLS",
        [*PRELUDE, ("c", b"CAPA\r\n")],
        [*PRELUDE_OUT, C(OUR_CAPA + b"STLS\r\n" + OUR_CAPA_END)],
        local=LocalInfo(starttls=True),
    ),
    Case(
        "client STLS",
        [*PRELUDE, ("c", b"STLS\r\n"), ("c", b"CAPA\r\nSTLS\r\n")],
        [
            *PRELUDE_OUT,
            C(b"+OK Begin TLS negotiation\r\n"),
            StartClientTLS(),
            C(OUR_CAPA + OUR_CAPA_END),
            C(b"-ERR Command not permitted when TLS active\r\n"),
        ],
        local=LocalInfo(starttls=True),
    ),
    Case(
        "STLS not offered or with argument",
        [*PRELUDE, ("c", b"STLS\r\nSTLS now\r\n")],
        [*PRELUDE_OUT, C(b"-ERR STLS not available\r\n"), C(b"-ERR Syntax: STLS\r\n")],
    ),
    Case(
        "QUIT",
        [*PRELUDE, ("c", b"QUIT\r\nCAPA\r\n")],
        [*PRELUDE_OUT, C(b"+OK Bye\r\n"), Close("client quit")],
    ),
    Case(
        "transaction commands and garbage before login",
        [*PRELUDE, ("c", b"NOOP\r\nSTAT\r\nRETR 1\r\nAPOP a b\r\n\r\n\xff\xfe\r\n")],
        [*PRELUDE_OUT, *[C(NOT_NOW)] * 6],
    ),
    Case(
        "control characters",
        [*PRELUDE, ("c", b"USER a\x00b\r\nCA\rPA\r\n")],
        [*PRELUDE_OUT, *[C(b"-ERR Invalid characters in command\r\n")] * 2],
    ),
    Case(
        "line too long",
        [*PRELUDE, ("c", b"USER " + b"a" * 3000)],
        [*PRELUDE_OUT, C(b"-ERR Line too long\r\n"), Close("client line too long")],
    ),
    Case("USER PASS", USERPASS, USERPASS_OUT),
    Case(
        "password with spaces, lowercase verbs",
        [*PRELUDE, ("c", b"user bob\r\npass  two words \r\n")],
        [*PRELUDE_OUT, C(b"+OK\r\n"), Authenticate("bob", " two words ")],
    ),
    Case(
        "USER and PASS syntax",
        [
            *PRELUDE,
            ("c", b"PASS x\r\nUSER\r\nUSER a b\r\nUSER \xff\r\nUSER a\r\nPASS\r\nPASS y\r\n"),
        ],
        [
            *PRELUDE_OUT,
            C(b"-ERR USER first\r\n"),
            *[C(b"-ERR Syntax: USER name\r\n")] * 3,
            C(b"+OK\r\n"),
            C(b"-ERR Syntax: PASS password\r\n"),
            C(b"-ERR USER first\r\n"),
        ],
    ),
    Case(
        "AUTH lists mechanisms",
        [*PRELUDE, ("c", b"AUTH\r\n")],
        [*PRELUDE_OUT, C(b"+OK\r\nPLAIN\r\n.\r\n")],
    ),
    Case(
        "AUTH PLAIN initial response",
        [*PRELUDE, ("c", b"AUTH PLAIN " + PLAIN + b"\r\n")],
        [*PRELUDE_OUT, LOGGED],
    ),
    Case(
        "AUTH PLAIN continuation",
        [*PRELUDE, ("c", b"auth plain\r\n"), ("c", PLAIN + b"\r\n")],
        [*PRELUDE_OUT, C(b"+ \r\n"), LOGGED],
    ),
    Case(
        "AUTH PLAIN cancelled, undecodable, unsupported",
        [
            *PRELUDE,
            ("c", b"AUTH PLAIN\r\n*\r\nAUTH PLAIN =\r\nAUTH PLAIN\r\n!!\r\n"),
            ("c", b"AUTH XOAUTH2\r\nAUTH PLAIN a b\r\n"),
        ],
        [
            *PRELUDE_OUT,
            C(b"+ \r\n"),
            C(b"-ERR Authentication cancelled\r\n"),
            C(b"-ERR Cannot decode response\r\n"),
            C(b"+ \r\n"),
            C(b"-ERR Cannot decode response\r\n"),
            C(b"-ERR [AUTH] Unsupported mechanism\r\n"),
            C(b"-ERR Syntax: AUTH mechanism [initial-response]\r\n"),
        ],
    ),
    Case(
        "wrong local password, USER needed again",
        [*USERPASS, ("reject",), ("c", b"PASS again\r\n")],
        [
            *USERPASS_OUT,
            C(AUTH_FAILED + b"\r\n"),
            failed(FailureKind.LOCAL_CREDENTIALS),
            C(b"-ERR USER first\r\n"),
        ],
    ),
    Case(
        "token temporarily unavailable",
        [*USERPASS, ("unavailable", False)],
        [*USERPASS_OUT, C(TEMPORARY), failed(FailureKind.TOKEN_UNAVAILABLE, "temporary")],
    ),
    Case(
        "token permanently unavailable",
        [*USERPASS, ("unavailable", True)],
        [
            *USERPASS_OUT,
            C(AUTH_FAILED + b"\r\n"),
            failed(FailureKind.TOKEN_UNAVAILABLE, "permanent"),
        ],
    ),
    Case(
        "flood while checking",
        [*USERPASS, ("c", b"LIST\r\n" * 300)],
        [
            *USERPASS_OUT,
            C(b"-ERR Too much input before the reply\r\n"),
            Close("client sent too much before the reply"),
        ],
    ),
    # upstream login
    Case(
        "XOAUTH2 success, response on its own line, leftovers spliced",
        [
            *PRELUDE,
            ("c", f"USER alice@example.com\r\nPASS {PASSWORD}\r\nSTAT\r\n".encode()),
            GIVE,
            ("u", b"+ \r\n"),
            ("u", b"+OK Logged in.\r\n"),
        ],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(b"+OK Logged in.\r\n"),
            LoginSucceeded("alice@example.com"),
            Splice(to_upstream=b"STAT\r\n"),
        ],
    ),
    Case(
        "OAUTHBEARER success with a bare + continuation",
        [*USERPASS, ("token", "alice@example.com", TOKEN, OB), ("u", b"+\r\n"), ("u", b"+OK\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH OAUTHBEARER\r\n"),
            U(OB_RESPONSE),
            C(b"+OK Logged in\r\n"),
            LoginSucceeded("alice@example.com"),
            Splice(),
        ],
    ),
    Case(
        "401 challenge, empty reply, retry, success",
        [
            *USERPASS,
            GIVE,
            ("u", b"+ \r\n"),
            ("u", CH401 + b"\r\n"),
            ("u", b"-ERR [AUTH] Authentication failed.\r\n"),
            GIVE,
            ("u", b"+ \r\n"),
            ("u", b"+OK Logged in.\r\n"),
        ],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            NeedFreshToken("401"),
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(b"+OK Logged in.\r\n"),
            LoginSucceeded("alice@example.com"),
            Splice(),
        ],
    ),
    Case(
        "OAUTHBEARER challenge answered with AQ==, retried once, then refused",
        [
            *USERPASS,
            ("token", "alice@example.com", TOKEN, OB),
            ("u", b"+ \r\n"),
            ("u", b"+ " + challenge(status="invalid_token") + b"\r\n"),
            ("u", b"-ERR [AUTH] Authentication failed.\r\n"),
            ("token", "alice@example.com", TOKEN, OB),
            ("u", b"+ \r\n"),
            ("u", b"+ " + challenge(status="invalid_token") + b"\r\n"),
            ("u", b"-ERR [AUTH] Authentication failed.\r\n"),
        ],
        [
            *USERPASS_OUT,
            U(b"AUTH OAUTHBEARER\r\n"),
            U(OB_RESPONSE),
            U(b"AQ==\r\n"),
            NeedFreshToken("invalid_token"),
            U(b"AUTH OAUTHBEARER\r\n"),
            U(OB_RESPONSE),
            U(b"AQ==\r\n"),
            C(AUTH_FAILED + b" (upstream refused the token: invalid_token)\r\n"),
            failed(
                FailureKind.TOKEN_REJECTED,
                '[AUTH] Authentication failed. {"status":"invalid_token"}',
            ),
        ],
    ),
    Case(
        "refused without challenge",
        [*USERPASS, GIVE, ("u", b"+ \r\n"), ("u", b"-ERR [AUTH] Authentication failed.\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(AUTH_FAILED + b"\r\n"),
            failed(FailureKind.TOKEN_REJECTED, "[AUTH] Authentication failed."),
        ],
    ),
    Case(
        "IdP down at the server: SYS/TEMP passed on",
        [*USERPASS, GIVE, ("u", b"+ \r\n"), ("u", b"-ERR [SYS/TEMP] Temporary failure\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(TEMPORARY),
            failed(FailureKind.UPSTREAM_ERROR, "[SYS/TEMP] Temporary failure"),
        ],
    ),
    Case(
        "mailbox in use passed on",
        [*USERPASS, GIVE, ("u", b"+ \r\n"), ("u", b"-ERR [IN-USE] Mailbox locked\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(b"-ERR [IN-USE] Mailbox locked\r\n"),
            failed(FailureKind.UPSTREAM_ERROR, "[IN-USE] Mailbox locked"),
        ],
    ),
    Case(
        "upstream lacks the mechanism",
        [*USERPASS, GIVE, ("u", b"-ERR Unsupported authentication mechanism.\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(b"-ERR [SYS/PERM] Upstream refused the login\r\n"),
            failed(FailureKind.UPSTREAM_ERROR, "Unsupported authentication mechanism."),
        ],
    ),
    Case(
        "fresh token unavailable",
        [
            *USERPASS,
            GIVE,
            ("u", b"+ \r\n"),
            ("u", CH401 + b"\r\n-ERR no\r\n"),
            ("unavailable", True),
        ],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            NeedFreshToken("401"),
            C(AUTH_FAILED + b"\r\n"),
            failed(FailureKind.TOKEN_UNAVAILABLE, "permanent"),
        ],
    ),
    Case(
        "upstream says +OK to an aborted AUTH",
        [*USERPASS, GIVE, ("u", b"+ \r\n"), ("u", CH401 + b"\r\n+OK\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            C(b"-ERR [SYS/TEMP] mailwarden upstream connection failed\r\n"),
            Close("upstream did not refuse an aborted AUTH"),
        ],
    ),
    Case(
        "upstream +OK before the response",
        [*USERPASS, GIVE, ("u", b"+OK\r\n")],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(b"-ERR [SYS/TEMP] mailwarden upstream connection failed\r\n"),
            Close("upstream accepted AUTH without a response"),
        ],
    ),
    Case(
        "upstream text echoing the token is dropped",
        [*USERPASS, GIVE, ("u", b"+ \r\n"), ("u", b"+OK hi " + XO_RESPONSE)],
        [
            *USERPASS_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(b"+OK Logged in\r\n"),
            LoginSucceeded("alice@example.com"),
            Splice(),
        ],
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_scenario(case: Case, bytewise: bool) -> None:
    core = Pop3Core(case.upstream, case.local, max_line=case.max_line)
    assert run(core, case.steps, bytewise) == case.expected


def test_client_plaintext_pipelined_after_stls_is_discarded() -> None:
    core = Pop3Core(UPSTREAM, LocalInfo(starttls=True))
    run(core, PRELUDE, bytewise=False)
    core.receive_client(b"USER a\r\nSTLS\r\nPASS injected\r\n")
    assert drain(core) == [C(b"+OK\r\n"), C(b"+OK Begin TLS negotiation\r\n"), StartClientTLS()]
    core.receive_client(b"PASS x\r\n")  # USER from before TLS is forgotten too
    assert drain(core) == [C(b"-ERR USER first\r\n")]


def test_upstream_plaintext_after_stls_reply_is_discarded() -> None:
    core = Pop3Core(replace(UPSTREAM, starttls=True))
    core.receive_upstream(b"+OK\r\n+OK\r\nSTLS\r\n.\r\n+OK go\r\n+OK\r\nSASL EVIL\r\n.\r\n")
    assert drain(core) == [U(b"CAPA\r\n"), U(b"STLS\r\n"), StartUpstreamTLS(), U(b"CAPA\r\n")]
    core.receive_upstream(b"+OK\r\nTOP\r\n.\r\n")
    assert drain(core) == [C(GREETING)]
    assert core.upstream_capabilities == (b"TOP",)


def test_parse_status() -> None:
    assert parse_status(b"+OK hi\r\n") == (Status.OK, b"hi")
    assert parse_status(b"+OK\r\n") == (Status.OK, b"")
    assert parse_status(b"-ERR [SYS/TEMP] x\n") == (Status.ERR, b"[SYS/TEMP] x")
    assert parse_status(b"+ abc\r\n") == (Status.CONTINUE, b"abc")
    for bad in (b"+OKAY\r\n", b"-ERROR\r\n", b"+abc\r\n", b"\r\n"):
        with pytest.raises(UpstreamProtocolError):
            parse_status(bad)


def test_state_and_misuse() -> None:
    core = Pop3Core(UPSTREAM)
    assert core.state.name == Pop3State.UPSTREAM_GREETING.name
    with pytest.raises(RuntimeError):
        core.token_unavailable(False)
    run(core, [*USERPASS, GIVE, ("u", b"+ \r\n+OK\r\n")], bytewise=False)
    assert core.state is Pop3State.DONE and core.finished
    core.reject_login()  # ignored once finished
    assert drain(core) == []

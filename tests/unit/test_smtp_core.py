"""SmtpCore: table-driven scenarios, each fed whole and byte by byte with identical actions.

A scenario is a list of steps (bytes from the client "c" or upstream "u", or an answer
from the I/O layer) and the complete list of actions the core must emit. `run` also
checks, for every scenario, that no token or password ever reaches the client.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.session import (
    Action,
    Authenticate,
    Close,
    FailureKind,
    LocalInfo,
    LoginFailed,
    LoginSucceeded,
    NeedFreshToken,
    SendClient,
    SendUpstream,
    SessionCore,
    Splice,
    StartClientTLS,
    StartUpstreamTLS,
    UpstreamInfo,
)
from mailwarden_proxy.protocols.smtp import SmtpCore, SmtpState

XO, OB = Mechanism.XOAUTH2, Mechanism.OAUTHBEARER
TOKEN = "ya29.TOKEN-never-shown"
PASSWORD = "local-Secret pw"
UPSTREAM = UpstreamInfo("smtp.example", 587, starttls=False)


def C(data: bytes) -> SendClient:
    return SendClient(data)


def U(data: bytes) -> SendUpstream:
    return SendUpstream(data)


def b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def challenge(**payload: str) -> bytes:
    return b64(json.dumps(payload))


# -- the driver (shared with the POP3 and fuzz tests) ---------------------------------------

Step = tuple[Any, ...]


def drain(core: SessionCore) -> list[Action]:
    out = []
    while (action := core.next_action()) is not None:
        out.append(action)
    return out


def run(core: SessionCore, steps: list[Step], bytewise: bool) -> list[Action]:
    """Perform `steps`; bytes fed after the core finished are folded into its Splice, since
    the I/O layer relays them itself: so whole and byte-wise runs compare equal."""
    out: list[Action] = []
    late = {"c": b"", "u": b""}
    for step in steps:
        kind = step[0]
        if kind in ("c", "u"):
            data: bytes = step[1]
            chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
            feed = core.receive_client if kind == "c" else core.receive_upstream
            for chunk in chunks:
                if core.finished:
                    late[kind] += chunk
                feed(chunk)
                out += drain(core)
            continue
        if kind == "token":
            core.provide_token(step[1], step[2], step[3])
        elif kind == "reject":
            core.reject_login()
        elif kind == "unavailable":
            core.token_unavailable(step[1])
        elif kind == "uclose":
            core.upstream_closed()
        elif kind == "cclose":
            core.client_closed()
        else:  # pragma: no cover
            raise AssertionError(step)
        out += drain(core)
    out = [
        replace(a, to_upstream=a.to_upstream + late["c"], to_client=a.to_client + late["u"])
        if isinstance(a, Splice)
        else a
        for a in out
    ]
    check_well_formed(out)
    return out


def check_well_formed(actions: list[Action], secrets: tuple[str, ...] = (TOKEN, PASSWORD)) -> None:
    forbidden = [s.encode() for s in secrets] + [b64(s) for s in secrets]
    for index, action in enumerate(actions):
        if isinstance(action, (Splice, Close)):
            assert index == len(actions) - 1, f"{action} must be the last action"
        if isinstance(action, SendClient):
            assert not any(s in action.data for s in forbidden), action
        if isinstance(action, (Close, LoginFailed)):
            text = action.reason if isinstance(action, Close) else action.detail
            assert not any(s in text for s in secrets), action
        assert PASSWORD not in repr(action)


# -- SMTP scenarios -------------------------------------------------------------------------

GREETING = b"220 mailwarden ESMTP mailwarden ready\r\n"
UP_EHLO = (
    b"250-up.example Hello\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n"
    b"250-AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER\r\n250-AUTH=LOGIN PLAIN\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250 CHUNKING\r\n"
)
OUR_EHLO = (
    b"250-mailwarden\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
)
PRELUDE: list[Step] = [("u", b"220 up.example ESMTP\r\n"), ("u", UP_EHLO)]
PRELUDE_OUT: list[Action] = [U(b"EHLO mailwarden\r\n"), C(GREETING)]
EHLO: list[Step] = [*PRELUDE, ("c", b"EHLO app.local\r\n")]
EHLO_OUT: list[Action] = [*PRELUDE_OUT, C(OUR_EHLO)]

PLAIN = b64(f"\0alice@example.com\0{PASSWORD}")
LOGGED = Authenticate("alice@example.com", PASSWORD)
XO_RESPONSE = b64(f"user=alice@example.com\x01auth=Bearer {TOKEN}\x01\x01") + b"\r\n"
OB_RESPONSE = (
    b64(f"n,a=alice@example.com,\x01host=smtp.example\x01port=587\x01auth=Bearer {TOKEN}\x01\x01")
    + b"\r\n"
)
AUTHED: list[Step] = [*EHLO, ("c", b"AUTH PLAIN " + PLAIN + b"\r\n")]
AUTHED_OUT: list[Action] = [*EHLO_OUT, LOGGED]
GIVE: Step = ("token", "alice@example.com", TOKEN, XO)
CH401 = b"334 " + challenge(status="401", schemes="Bearer", scope="https://mail.google.com/")
INVALID = b"535 5.7.8 Authentication credentials invalid"
LOGIN_OK: list[Action] = [
    C(b"235 2.7.0 Authentication successful\r\n"),
    LoginSucceeded("alice@example.com"),
]


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
    # upstream side: greeting, EHLO, STARTTLS
    Case("prelude", PRELUDE, PRELUDE_OUT),
    Case(
        "multi-line greeting",
        [("u", b"220-up.example ESMTP\r\n220 second line\r\n"), ("u", UP_EHLO)],
        PRELUDE_OUT,
    ),
    Case(
        "greeting 554",
        [("u", b"554 5.3.2 go away\r\n")],
        [C(b"421 4.3.2 mailwarden upstream unavailable\r\n"), Close("upstream greeting 554")],
    ),
    Case(
        "garbage greeting",
        [("u", b"hello\r\n")],
        [
            C(b"421 4.3.2 mailwarden upstream unavailable\r\n"),
            Close("malformed SMTP reply line"),
        ],
    ),
    Case(
        "EHLO refused",
        [("u", b"220 up\r\n"), ("u", b"502 5.5.1 no EHLO\r\n")],
        [
            U(b"EHLO mailwarden\r\n"),
            C(b"421 4.3.2 mailwarden upstream unavailable\r\n"),
            Close("upstream EHLO 502"),
        ],
    ),
    Case(
        "upstream STARTTLS",
        [
            ("u", b"220 up\r\n"),
            ("u", b"250-up\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"),
            ("u", b"220 2.0.0 go ahead\r\n"),
            ("u", UP_EHLO),
        ],
        [
            U(b"EHLO mailwarden\r\n"),
            U(b"STARTTLS\r\n"),
            StartUpstreamTLS(),
            U(b"EHLO mailwarden\r\n"),
            C(GREETING),
        ],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream lacks STARTTLS",
        [("u", b"220 up\r\n"), ("u", UP_EHLO)],
        [
            U(b"EHLO mailwarden\r\n"),
            C(b"421 4.3.2 mailwarden upstream unavailable\r\n"),
            Close("upstream does not offer STARTTLS"),
        ],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream STARTTLS refused",
        [("u", b"220 up\r\n"), ("u", b"250-up\r\n250 STARTTLS\r\n"), ("u", b"454 4.7.0 no\r\n")],
        [
            U(b"EHLO mailwarden\r\n"),
            U(b"STARTTLS\r\n"),
            C(b"421 4.3.2 mailwarden upstream unavailable\r\n"),
            Close("upstream STARTTLS 454"),
        ],
        upstream=replace(UPSTREAM, starttls=True),
    ),
    Case(
        "upstream closes before greeting",
        [("uclose",)],
        [
            C(b"421 4.4.2 mailwarden upstream closed the connection\r\n"),
            Close("upstream closed the connection"),
        ],
    ),
    Case(
        "upstream talks out of turn",
        [*PRELUDE, ("u", b"421 4.4.2 idle timeout\r\n")],
        [
            *PRELUDE_OUT,
            C(b"421 4.4.2 mailwarden upstream connection failed\r\n"),
            Close("upstream sent data out of turn"),
        ],
    ),
    Case(
        "early talker is answered after the greeting",
        [("c", b"EHLO app\r\n"), *PRELUDE],
        [*PRELUDE_OUT, C(OUR_EHLO)],
    ),
    # client commands before login
    Case("EHLO rewritten", EHLO, EHLO_OUT),
    Case(
        "EHLO offers STARTTLS",
        EHLO,
        [*PRELUDE_OUT, C(OUR_EHLO.replace(b"250 AUTH", b"250-AUTH") + b"250 STARTTLS\r\n")],
        local=LocalInfo(starttls=True),
    ),
    Case(
        "no STARTTLS on a TLS connection",
        EHLO,
        EHLO_OUT,
        local=LocalInfo(starttls=True, tls_active=True),
    ),
    Case(
        "EHLO without name",
        [*PRELUDE, ("c", b"ehlo\r\n")],
        [*PRELUDE_OUT, C(b"501 5.5.4 Syntax: EHLO hostname\r\n")],
    ),
    Case("HELO", [*PRELUDE, ("c", b"HELO app\r\n")], [*PRELUDE_OUT, C(b"250 mailwarden\r\n")]),
    Case(
        "NOOP RSET lowercase",
        [*PRELUDE, ("c", b"noop\r\nRset\r\nNOOP hi there\r\n")],
        [*PRELUDE_OUT, *[C(b"250 2.0.0 OK\r\n")] * 3],
    ),
    Case(
        "QUIT",
        [*PRELUDE, ("c", b"QUIT\r\nNOOP\r\n")],
        [*PRELUDE_OUT, C(b"221 2.0.0 Bye\r\n"), Close("client quit")],
    ),
    Case(
        "mail commands need a login",
        [*EHLO, ("c", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nBDAT 10 LAST\r\nVRFY x\r\n")],
        [*EHLO_OUT, *[C(b"530 5.7.0 Authentication required\r\n")] * 5],
    ),
    Case(
        "unknown, empty and non-ASCII verbs",
        [*PRELUDE, ("c", b"FROB x\r\n\r\n\xc3\xa9HLO x\r\nEHLO1 x\r\n")],
        [*PRELUDE_OUT, *[C(b"500 5.5.2 Command not recognized\r\n")] * 4],
    ),
    Case(
        "control characters",
        [*PRELUDE, ("c", b"NOOP a\x00b\r\nNO\rOP\r\nNOOP\r\r\nNOOP \x7f\r\nNOOP\ttab\r\n")],
        [
            *PRELUDE_OUT,
            *[C(b"501 5.5.2 Invalid characters in command\r\n")] * 4,
            C(b"500 5.5.2 Command not recognized\r\n"),  # "NOOP\ttab" is not "NOOP"
        ],
    ),
    Case("bare LF accepted", [*PRELUDE, ("c", b"NOOP\n")], [*PRELUDE_OUT, C(b"250 2.0.0 OK\r\n")]),
    Case(
        "line too long",
        [*PRELUDE, ("c", b"NOOP " + b"x" * 2000 + b"\r\nNOOP\r\n")],
        [*PRELUDE_OUT, C(b"500 5.5.6 Line too long\r\n"), Close("client line too long")],
    ),
    Case(
        "client STARTTLS, then EHLO again",
        [*PRELUDE, ("c", b"STARTTLS\r\n"), ("c", b"AUTH PLAIN " + PLAIN + b"\r\nEHLO a\r\n")],
        [
            *PRELUDE_OUT,
            C(b"220 2.0.0 Ready to start TLS\r\n"),
            StartClientTLS(),
            C(b"503 5.5.1 Send EHLO first\r\n"),
            C(OUR_EHLO),
        ],
        local=LocalInfo(starttls=True),
    ),
    Case(
        "STARTTLS not offered, active, or with argument",
        [*PRELUDE, ("c", b"STARTTLS\r\n")],
        [*PRELUDE_OUT, C(b"502 5.5.1 STARTTLS not available\r\n")],
    ),
    Case(
        "STARTTLS twice",
        [*PRELUDE, ("c", b"STARTTLS\r\nSTARTTLS x\r\n")],
        [
            *PRELUDE_OUT,
            C(b"503 5.5.1 TLS already active\r\n"),
            C(b"501 5.5.4 Syntax: STARTTLS\r\n"),
        ],
        local=LocalInfo(starttls=True, tls_active=True),
    ),
    # local login
    Case(
        "AUTH before EHLO",
        [*PRELUDE, ("c", b"AUTH PLAIN " + PLAIN + b"\r\n")],
        [*PRELUDE_OUT, C(b"503 5.5.1 Send EHLO first\r\n")],
    ),
    Case(
        "AUTH after HELO",
        [*PRELUDE, ("c", b"HELO a\r\nauth plain " + PLAIN + b"\r\n")],
        [*PRELUDE_OUT, C(b"250 mailwarden\r\n"), LOGGED],
    ),
    Case("AUTH PLAIN initial response", AUTHED, AUTHED_OUT),
    Case(
        "AUTH PLAIN continuation",
        [*EHLO, ("c", b"AUTH PLAIN\r\n"), ("c", PLAIN + b"\r\n")],
        [*EHLO_OUT, C(b"334 \r\n"), LOGGED],
    ),
    Case(
        "AUTH PLAIN with authzid",
        [*EHLO, ("c", b"AUTH PLAIN " + b64(f"bob\0bob\0{PASSWORD}") + b"\r\n")],
        [*EHLO_OUT, Authenticate("bob", PASSWORD)],
    ),
    Case(
        "AUTH PLAIN cancelled",
        [*EHLO, ("c", b"AUTH PLAIN\r\n*\r\nNOOP\r\n")],
        [
            *EHLO_OUT,
            C(b"334 \r\n"),
            C(b"501 5.7.0 Authentication cancelled\r\n"),
            C(b"250 2.0.0 OK\r\n"),
        ],
    ),
    Case(
        "AUTH PLAIN undecodable",
        [
            *EHLO,
            ("c", b"AUTH PLAIN =\r\nAUTH PLAIN !!!\r\nAUTH PLAIN " + b64("a\0b\0c") + b"\r\n"),
            (
                "c",
                b"AUTH PLAIN "
                + b64("nouser")
                + b"\r\nAUTH PLAIN\r\n"
                + b64(b"\0\xff\0x")
                + b"\r\n",
            ),
        ],
        [
            *EHLO_OUT,
            *[C(b"501 5.5.2 Cannot decode response\r\n")] * 4,
            C(b"334 \r\n"),
            C(b"501 5.5.2 Cannot decode response\r\n"),
        ],
    ),
    Case(
        "AUTH LOGIN",
        [
            *EHLO,
            ("c", b"AUTH LOGIN\r\n"),
            ("c", b64("alice@example.com") + b"\r\n"),
            ("c", b64(PASSWORD) + b"\r\n"),
        ],
        [*EHLO_OUT, C(b"334 VXNlcm5hbWU6\r\n"), C(b"334 UGFzc3dvcmQ6\r\n"), LOGGED],
    ),
    Case(
        "AUTH LOGIN with initial username",
        [
            *EHLO,
            ("c", b"AUTH LOGIN " + b64("alice@example.com") + b"\r\n" + b64(PASSWORD) + b"\r\n"),
        ],
        [*EHLO_OUT, C(b"334 UGFzc3dvcmQ6\r\n"), LOGGED],
    ),
    Case(
        "AUTH LOGIN cancelled and undecodable",
        [*EHLO, ("c", b"AUTH LOGIN\r\n*\r\nAUTH LOGIN =\r\nAUTH LOGIN eA==\r\n%%\r\n")],
        [
            *EHLO_OUT,
            C(b"334 VXNlcm5hbWU6\r\n"),
            C(b"501 5.7.0 Authentication cancelled\r\n"),
            C(b"501 5.5.2 Cannot decode response\r\n"),
            C(b"334 UGFzc3dvcmQ6\r\n"),
            C(b"501 5.5.2 Cannot decode response\r\n"),
        ],
    ),
    Case(
        "AUTH syntax and unknown mechanisms",
        [*EHLO, ("c", b"AUTH\r\nAUTH CRAM-MD5\r\nAUTH XOAUTH2 abc\r\nAUTH PLAIN a b\r\n")],
        [
            *EHLO_OUT,
            C(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
            C(b"504 5.5.4 Unrecognized authentication type\r\n"),
            C(b"504 5.5.4 Unrecognized authentication type\r\n"),
            C(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        ],
    ),
    Case(
        "wrong local password, then success",
        [*AUTHED, ("reject",), ("c", b"AUTH PLAIN " + PLAIN + b"\r\n")],
        [*AUTHED_OUT, C(INVALID + b"\r\n"), failed(FailureKind.LOCAL_CREDENTIALS), LOGGED],
    ),
    Case(
        "commands queued during the check are answered after a rejection",
        [*EHLO, ("c", b"AUTH PLAIN " + PLAIN + b"\r\nNOOP\r\n"), ("reject",)],
        [
            *AUTHED_OUT,
            C(INVALID + b"\r\n"),
            failed(FailureKind.LOCAL_CREDENTIALS),
            C(b"250 2.0.0 OK\r\n"),
        ],
    ),
    Case(
        "token temporarily unavailable",
        [*AUTHED, ("unavailable", False)],
        [
            *AUTHED_OUT,
            C(b"454 4.7.0 Temporary authentication failure\r\n"),
            failed(FailureKind.TOKEN_UNAVAILABLE, "temporary"),
        ],
    ),
    Case(
        "token permanently unavailable",
        [*AUTHED, ("unavailable", True)],
        [*AUTHED_OUT, C(INVALID + b"\r\n"), failed(FailureKind.TOKEN_UNAVAILABLE, "permanent")],
    ),
    Case(
        "flood while the login is checked",
        [*AUTHED, ("c", b"x" * 1100)],
        [
            *AUTHED_OUT,
            C(b"421 4.7.0 Too much input before the reply\r\n"),
            Close("client sent too much before the reply"),
        ],
    ),
    # upstream login
    Case(
        "XOAUTH2 success, token after the 334, leftovers spliced",
        [
            *EHLO,
            ("c", b"AUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a@b>\r\n"),
            GIVE,
            ("u", b"334 \r\n"),
            ("u", b"235 2.7.0 Accepted\r\n"),
        ],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            *LOGIN_OK,
            Splice(to_upstream=b"MAIL FROM:<a@b>\r\n"),
        ],
    ),
    Case(
        "OAUTHBEARER success",
        [
            *AUTHED,
            ("token", "alice@example.com", TOKEN, OB),
            ("u", b"334\r\n"),
            ("u", b"235 ok\r\n"),
        ],
        [*AUTHED_OUT, U(b"AUTH OAUTHBEARER\r\n"), U(OB_RESPONSE), *LOGIN_OK, Splice()],
    ),
    Case(
        "401 challenge, one retry, success",
        [
            *AUTHED,
            GIVE,
            ("u", b"334 \r\n"),
            ("u", CH401 + b"\r\n"),
            ("u", b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n"),
            ("token", "alice@example.com", TOKEN, XO),
            ("u", b"334 \r\n"),
            ("u", b"235 2.7.0 Accepted\r\n"),
        ],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            NeedFreshToken("401"),
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            *LOGIN_OK,
            Splice(),
        ],
    ),
    Case(
        "OAUTHBEARER challenge answered with AQ==, retried once, then refused",
        [
            *AUTHED,
            ("token", "alice@example.com", TOKEN, OB),
            ("u", b"334 \r\n"),
            ("u", b"334 " + challenge(status="invalid_token") + b"\r\n"),
            ("u", b"535 5.7.8 no\r\n"),
            ("token", "alice@example.com", TOKEN, OB),
            ("u", b"334 \r\n"),
            ("u", b"334 " + challenge(status="invalid_token") + b"\r\n"),
            ("u", b"535 5.7.8 no\r\n"),
        ],
        [
            *AUTHED_OUT,
            U(b"AUTH OAUTHBEARER\r\n"),
            U(OB_RESPONSE),
            U(b"AQ==\r\n"),
            NeedFreshToken("invalid_token"),
            U(b"AUTH OAUTHBEARER\r\n"),
            U(OB_RESPONSE),
            U(b"AQ==\r\n"),
            C(INVALID + b" (upstream refused the token: invalid_token)\r\n"),
            failed(FailureKind.TOKEN_REJECTED, '535 5.7.8 no {"status":"invalid_token"}'),
        ],
    ),
    Case(
        "non-retryable challenge status",
        [
            *AUTHED,
            GIVE,
            ("u", b"334 \r\n"),
            ("u", b"334 " + challenge(status="403") + b"\r\n"),
            ("u", b"535 no\r\n"),
        ],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            C(INVALID + b" (upstream refused the token: 403)\r\n"),
            failed(FailureKind.TOKEN_REJECTED, '535 no {"status":"403"}'),
        ],
    ),
    Case(
        "garbage challenge",
        [*AUTHED, GIVE, ("u", b"334 \r\n"), ("u", b"334 %%%\r\n"), ("u", b"535 no\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            C(INVALID + b"\r\n"),
            failed(FailureKind.TOKEN_REJECTED, "535 no"),
        ],
    ),
    Case(
        "fresh token unavailable",
        [
            *AUTHED,
            GIVE,
            ("u", b"334 \r\n"),
            ("u", CH401 + b"\r\n"),
            ("u", b"535 no\r\n"),
            ("unavailable", False),
        ],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            U(b"\r\n"),
            NeedFreshToken("401"),
            C(b"454 4.7.0 Temporary authentication failure\r\n"),
            failed(FailureKind.TOKEN_UNAVAILABLE, "temporary"),
        ],
    ),
    Case(
        "upstream 535 without challenge (Microsoft)",
        [*AUTHED, GIVE, ("u", b"334 \r\n"), ("u", b"535 5.7.3 Authentication unsuccessful\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(INVALID + b"\r\n"),
            failed(FailureKind.TOKEN_REJECTED, "535 5.7.3 Authentication unsuccessful"),
        ],
    ),
    Case(
        "upstream temporary failure",
        [*AUTHED, GIVE, ("u", b"454 4.7.0 Too many login attempts\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(
                b"454 4.7.0 Temporary authentication failure"
                b" (upstream: 4.7.0 Too many login attempts)\r\n"
            ),
            failed(FailureKind.UPSTREAM_ERROR, "454 4.7.0 Too many login attempts"),
        ],
    ),
    Case(
        "upstream lacks the mechanism",
        [*AUTHED, GIVE, ("u", b"504 5.7.4 Unrecognized authentication type\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(INVALID + b"\r\n"),
            failed(FailureKind.UPSTREAM_ERROR, "504 5.7.4 Unrecognized authentication type"),
        ],
    ),
    Case(
        "upstream echoing the token is not passed on",
        [*AUTHED, GIVE, ("u", b"334 \r\n"), ("u", b"454 4.7.0 bad " + XO_RESPONSE)],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            C(b"454 4.7.0 Temporary authentication failure\r\n"),
            failed(FailureKind.UPSTREAM_ERROR, "454"),
        ],
    ),
    Case(
        "upstream closes during the login",
        [*AUTHED, GIVE, ("uclose",)],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(b"421 4.4.2 mailwarden upstream closed the connection\r\n"),
            Close("upstream closed the connection"),
        ],
    ),
    Case(
        "upstream answers nonsense during AUTH",
        [*AUTHED, GIVE, ("u", b"250 what\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            C(b"421 4.4.2 mailwarden upstream connection failed\r\n"),
            Close("unexpected upstream reply 250 during AUTH"),
        ],
    ),
    Case(
        "client leaves",
        [*PRELUDE, ("cclose",), ("c", b"NOOP\r\n")],
        [*PRELUDE_OUT, Close("client closed the connection")],
    ),
    Case(
        "upstream bytes after 235 go to the client",
        [*AUTHED, GIVE, ("u", b"334 \r\n"), ("u", b"235 ok\r\n250 extra\r\n")],
        [
            *AUTHED_OUT,
            U(b"AUTH XOAUTH2\r\n"),
            U(XO_RESPONSE),
            *LOGIN_OK,
            Splice(to_client=b"250 extra\r\n"),
        ],
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_scenario(case: Case, bytewise: bool) -> None:
    core = SmtpCore(case.upstream, case.local, max_line=case.max_line)
    assert run(core, case.steps, bytewise) == case.expected


def test_client_plaintext_pipelined_after_starttls_is_discarded() -> None:
    core = SmtpCore(UPSTREAM, LocalInfo(starttls=True), max_line=1024)
    run(core, PRELUDE, bytewise=False)
    core.receive_client(b"STARTTLS\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<evil>\r\n")
    assert drain(core) == [C(b"220 2.0.0 Ready to start TLS\r\n"), StartClientTLS()]
    assert len(core.client_in) == 0
    core.receive_client(b"EHLO again\r\n")  # now over TLS: STARTTLS no longer offered
    assert drain(core) == [C(OUR_EHLO)]


def test_upstream_plaintext_after_starttls_reply_is_discarded() -> None:
    core = SmtpCore(replace(UPSTREAM, starttls=True), max_line=1024)
    core.receive_upstream(b"220 up\r\n250-up\r\n250 STARTTLS\r\n")
    core.receive_upstream(b"220 go ahead\r\n250-injected\r\n250 AUTH PLAIN\r\n")
    assert drain(core) == [
        U(b"EHLO mailwarden\r\n"),
        U(b"STARTTLS\r\n"),
        StartUpstreamTLS(),
        U(b"EHLO mailwarden\r\n"),
    ]
    assert len(core.upstream_in) == 0
    core.receive_upstream(b"250-up\r\n250 SIZE 10\r\n")
    assert drain(core) == [C(GREETING)]
    assert core.upstream_extensions == (b"SIZE 10",)


def test_state_and_misuse() -> None:
    core = SmtpCore(UPSTREAM)
    assert core.state.name == SmtpState.UPSTREAM_GREETING.name
    with pytest.raises(RuntimeError):
        core.provide_token("u", TOKEN, XO)
    with pytest.raises(RuntimeError):
        core.reject_login()
    run(core, [*AUTHED, GIVE, ("u", b"334 \r\n"), ("u", b"235 ok\r\n")], bytewise=False)
    assert core.state is SmtpState.DONE and core.finished
    core.provide_token("u", TOKEN, XO)  # late answers after the end are ignored
    core.receive_client(b"NOOP\r\n")
    assert drain(core) == []


def test_token_is_never_inline_and_never_in_repr() -> None:
    core = SmtpCore(UPSTREAM)
    actions = run(core, [*AUTHED, GIVE], bytewise=False)
    assert actions[-1] == U(b"AUTH XOAUTH2\r\n")
    assert TOKEN not in repr(core.__dict__.get("actions"))
    assert PASSWORD not in repr(actions)


# -- resuming from a warm upstream (relay.pool) -------------------------------------------
#
# A session given a pooled connection skips the upstream prelude: `resume` greets the
# client at once with the extensions a warm-up core learnt. Every scenario above that
# starts with the plain prelude must behave the same from a resumed core, minus the
# prelude's own actions.

WARM_EXTENSIONS = (
    b"PIPELINING",
    b"SIZE 35882577",
    b"AUTH LOGIN PLAIN XOAUTH2 OAUTHBEARER",
    b"AUTH=LOGIN PLAIN",
    b"8BITMIME",
    b"SMTPUTF8",
    b"CHUNKING",
)
RESUMABLE = [
    c
    for c in CASES
    if c.steps[: len(PRELUDE)] == PRELUDE
    and c.expected[: len(PRELUDE_OUT)] == PRELUDE_OUT
    and not c.upstream.starttls
]


def resumed(case: Case, *, upstream_tls: bool = False) -> SmtpCore:
    core = SmtpCore(case.upstream, case.local, max_line=case.max_line)
    core.resume(WARM_EXTENSIONS, upstream_tls=upstream_tls)
    return core


def test_warm_extensions_are_what_the_prelude_learns() -> None:
    core = SmtpCore(UPSTREAM)
    run(core, PRELUDE, bytewise=False)
    assert core.upstream_extensions == WARM_EXTENSIONS
    assert core.upstream_ready and not core.upstream_tls
    assert len(RESUMABLE) > 30  # the filter above keeps most of the table


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("case", RESUMABLE, ids=[c.name for c in RESUMABLE])
def test_resumed_scenario(case: Case, bytewise: bool) -> None:
    core = resumed(case)
    assert core.state is SmtpState.COMMAND and core.upstream_ready
    greeting = drain(core)
    actions = run(core, case.steps[len(PRELUDE) :], bytewise)
    assert greeting + actions == [C(GREETING), *case.expected[len(PRELUDE_OUT) :]]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_resumed_after_upstream_starttls(bytewise: bool) -> None:
    case = Case("starttls", [], [], upstream=replace(UPSTREAM, starttls=True))
    core = resumed(case, upstream_tls=True)
    steps: list[Step] = [
        ("c", b"EHLO app.local\r\nAUTH PLAIN " + PLAIN + b"\r\n"),
        GIVE,
        ("u", b"334 \r\n"),
        ("u", b"235 2.7.0 ok\r\n250 early\r\n"),
    ]
    assert run(core, steps, bytewise) == [
        C(GREETING),
        C(OUR_EHLO),
        LOGGED,
        U(b"AUTH XOAUTH2\r\n"),
        U(XO_RESPONSE),
        *LOGIN_OK,
        Splice(to_client=b"250 early\r\n"),
    ]
    assert core.upstream_tls


def test_resume_answers_an_early_talker_after_the_greeting() -> None:
    core = SmtpCore(UPSTREAM)
    core.receive_client(b"EHLO app\r\nNOOP\r\n")
    assert drain(core) == []
    core.resume(WARM_EXTENSIONS, upstream_tls=False)
    assert drain(core) == [C(GREETING), C(OUR_EHLO), C(b"250 2.0.0 OK\r\n")]


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            [("u", b"421 4.4.2 idle timeout\r\n")],
            [
                C(b"421 4.4.2 mailwarden upstream connection failed\r\n"),
                Close("upstream sent data out of turn"),
            ],
        ),
        (
            [("uclose",)],
            [
                C(b"421 4.4.2 mailwarden upstream closed the connection\r\n"),
                Close("upstream closed the connection"),
            ],
        ),
    ],
    ids=["out of turn", "closed"],
)
def test_resumed_upstream_failures_after_the_greeting(
    steps: list[Step], expected: list[Action]
) -> None:
    for bytewise in (False, True):
        core = resumed(Case("x", [], []))
        assert run(core, steps, bytewise) == [C(GREETING), *expected]


def test_resume_misuse() -> None:
    with pytest.raises(RuntimeError):  # STARTTLS configured: never resume in plaintext
        SmtpCore(replace(UPSTREAM, starttls=True)).resume(WARM_EXTENSIONS, upstream_tls=False)
    core = SmtpCore(UPSTREAM)
    run(core, PRELUDE, bytewise=False)
    with pytest.raises(RuntimeError):  # only as the first call
        core.resume(WARM_EXTENSIONS, upstream_tls=False)
    gone = SmtpCore(UPSTREAM)
    gone.client_closed()
    drain(gone)
    gone.resume(WARM_EXTENSIONS, upstream_tls=False)  # the client left first: ignored
    assert drain(gone) == [] and gone.finished

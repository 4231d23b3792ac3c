"""ImapCore, scenario by scenario; every scenario is fed whole and one byte at a time."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.imap import State
from mailwarden_proxy.protocols.imap_parse import (
    Command,
    CommandReader,
    client_capabilities,
    parse_astrings,
)
from mailwarden_proxy.protocols.lines import LineBuffer
from mailwarden_proxy.protocols.session import (
    Authenticate,
    Close,
    FailureKind,
    LoginFailed,
    LoginSucceeded,
    NeedFreshToken,
    SendClient,
    SendUpstream,
    Splice,
    StartClientTLS,
    StartUpstreamTLS,
)
from tests.unit.imap_script import (
    FRESH,
    HOST,
    PORT,
    TOKEN,
    C,
    Call,
    Step,
    U,
    drain,
    feed,
    make_core,
    run,
    to_c,
    to_u,
    token,
)

USER = "user@example.com"
UP_CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=XOAUTH2 AUTH=OAUTHBEARER"
UP_GREETING = b"* OK [CAPABILITY " + UP_CAPS + b"] Dovecot ready.\r\n"
CAPS = b"IMAP4rev1 ID ENABLE IDLE LITERAL+ SASL-IR AUTH=PLAIN"
GREETING = b"* OK [CAPABILITY " + CAPS + b"] proxy.test ready (mailwarden)\r\n"
START: list[Step] = [(U(UP_GREETING), [to_c(GREETING)])]
BYE_UNAVAILABLE = b"* BYE [UNAVAILABLE] Upstream server unavailable, try again later\r\n"
AUTH_FAILED = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
TEMP_FAILURE = b"NO [UNAVAILABLE] Temporary authentication failure, try again later\r\n"
NOT_CONNECTED_REPLY = (
    b"a NO [AUTHENTICATIONFAILED] Authenticated upstream, but the mailbox is not accessible for "
    b"this application (check the Exchange service principal and its mailbox permission)\r\n"
)
CONTINUE = to_c(b"+ Ready for literal\r\n")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def xoauth2(user: str = USER, tok: str = TOKEN) -> bytes:
    return b64(f"user={user}\x01auth=Bearer {tok}\x01\x01".encode())


def oauthbearer(user: str = USER, tok: str = TOKEN) -> bytes:
    return b64(f"n,a={user},\x01host={HOST}\x01port={PORT}\x01auth=Bearer {tok}\x01\x01".encode())


def challenge(status: str) -> bytes:
    return b"+ " + b64(json.dumps({"status": status, "schemes": "bearer"}).encode()) + b"\r\n"


def plain(user: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\x00{user}\x00{password}".encode())


def authenticated(tag: str = "a", user: str = USER, password: str = "pw") -> list[Step]:
    """The client logs in with LOGIN, the token goes upstream with SASL-IR."""
    return [
        (C(f"{tag} LOGIN {user} {password}\r\n".encode()), [Authenticate(user, password)]),
        (token(), [to_u(b"mw0 AUTHENTICATE XOAUTH2 " + xoauth2() + b"\r\n")]),
    ]


def success(tag: str = "a", tagged_ok: bytes = b"mw0 OK Logged in\r\n") -> list[Step]:
    return [
        (U(tagged_ok), [to_u(b"mw1 NOOP\r\n")]),
        (
            U(b"mw1 OK NOOP completed\r\n"),
            [to_c(f"{tag} OK Logged in\r\n".encode()), LoginSucceeded(USER), Splice()],
        ),
    ]


# -- scenarios: (core options, steps) ----------------------------------------------------------

SCENARIOS: dict[str, tuple[dict[str, Any], list[Step]]] = {
    # greeting and capabilities
    "greeting with capabilities": ({}, START),
    "greeting without capabilities asks for them": (
        {},
        [
            (U(b"* OK ready\r\n"), [to_u(b"mw0 CAPABILITY\r\n")]),
            (U(b"* OK [ALERT] hello\r\n* CAPABILITY " + UP_CAPS + b"\r\n"), []),
            (U(b"mw0 OK done\r\n"), [to_c(GREETING)]),
        ],
    ),
    "capability reply without a list": (
        {},
        [
            (U(b"* OK ready\r\n"), [to_u(b"mw0 CAPABILITY\r\n")]),
            (
                U(b"mw0 OK done\r\n"),
                [
                    to_c(
                        b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] proxy.test ready "
                        b"(mailwarden)\r\n"
                    )
                ],
            ),
        ],
    ),
    "capability refused": (
        {},
        [
            (U(b"* OK ready\r\n"), [to_u(b"mw0 CAPABILITY\r\n")]),
            (
                U(b"mw0 BAD no\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream refused CAPABILITY: no")],
            ),
        ],
    ),
    "upstream literal in an untagged response is followed": (
        {},
        [
            (U(b"* OK ready\r\n"), [to_u(b"mw0 CAPABILITY\r\n")]),
            (U(b"* XSTUFF {13}\r\nmw0 OK fake\r\n tail\r\n* CAPABILITY " + UP_CAPS + b"\r\n"), []),
            (U(b"mw0 OK done\r\n"), [to_c(GREETING)]),
        ],
    ),
    "PREAUTH greeting": (
        {},
        [
            (
                U(b"* PREAUTH welcome\r\n"),
                [
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream greeted with PREAUTH: cannot authenticate"),
                ],
            )
        ],
    ),
    "BYE greeting": (
        {},
        [
            (
                U(b"* BYE [UNAVAILABLE] overloaded\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream said BYE: overloaded")],
            )
        ],
    ),
    "garbage greeting": (
        {},
        [
            (
                U(b"HTTP/1.1 400 Bad\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream sent no IMAP greeting")],
            )
        ],
    ),
    "greeting that is not even a response": (
        {},
        [
            (
                U(b"\r\n"),
                [
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream protocol error: upstream sent a malformed response line"),
                ],
            )
        ],
    ),
    "upstream closes before the greeting": (
        {},
        [
            (
                Call("upstream_closed"),
                [to_c(BYE_UNAVAILABLE), Close("upstream closed the connection")],
            )
        ],
    ),
    "client input before the greeting waits": (
        {},
        [
            (C(b"a NOOP\r\n"), []),
            (U(UP_GREETING), [to_c(GREETING), to_c(b"a OK NOOP completed\r\n")]),
        ],
    ),
    # upstream STARTTLS
    "upstream STARTTLS, plaintext after the OK discarded": (
        {"starttls": True},
        [
            (
                U(b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n"),
                [to_u(b"mw0 STARTTLS\r\n")],
            ),
            (
                U(b"mw0 OK Begin TLS\r\n* CAPABILITY IMAP4rev1 EVIL\r\nmw1 OK injected\r\n"),
                [StartUpstreamTLS(), to_u(b"mw1 CAPABILITY\r\n")],
            ),
            (U(b"* CAPABILITY " + UP_CAPS + b"\r\nmw1 OK done\r\n"), [to_c(GREETING)]),
        ],
    ),
    "upstream STARTTLS missing": (
        {"starttls": True},
        [
            (
                U(UP_GREETING),
                [
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream does not offer STARTTLS, which is configured"),
                ],
            )
        ],
    ),
    "upstream STARTTLS refused": (
        {"starttls": True},
        [
            (U(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"), [to_u(b"mw0 STARTTLS\r\n")]),
            (
                U(b"mw0 NO not now\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream refused STARTTLS: not now")],
            ),
        ],
    ),
    "upstream STARTTLS with an unexpected tag": (
        {"starttls": True},
        [
            (U(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n"), [to_u(b"mw0 STARTTLS\r\n")]),
            (
                U(b"x OK fine\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream sent an unexpected response to STARTTLS")],
            ),
        ],
    ),
    # local commands before login
    "CAPABILITY NOOP ID LOGOUT": (
        {},
        [
            *START,
            (
                C(b"a CAPABILITY\r\n"),
                [to_c(b"* CAPABILITY " + CAPS + b"\r\n"), to_c(b"a OK CAPABILITY completed\r\n")],
            ),
            (C(b"b noop\r\n"), [to_c(b"b OK NOOP completed\r\n")]),
            (
                C(b'c ID ("name" "mutt" "version" {3}\r\n'),
                [CONTINUE],
            ),
            (C(b"1.0)\r\n"), [to_c(b"* ID NIL\r\n"), to_c(b"c OK ID completed\r\n")]),
            (
                C(b"d LOGOUT\r\n"),
                [
                    to_c(b"* BYE Logging out\r\n"),
                    to_c(b"d OK LOGOUT completed\r\n"),
                    Close("client logged out"),
                ],
            ),
            (C(b"e NOOP\r\n"), []),
        ],
    ),
    "commands not allowed before login and bad input": (
        {},
        [
            *START,
            (C(b"a SELECT INBOX\r\n"), [to_c(b"a BAD Command not allowed before login\r\n")]),
            (C(b"\r\n"), [to_c(b"* BAD Empty command line\r\n")]),
            (C(b"(bad NOOP\r\n"), [to_c(b"* BAD Invalid or missing tag\r\n")]),
            (C(b"+ NOOP\r\n"), [to_c(b"* BAD Invalid or missing tag\r\n")]),
            (C(b"lonely\r\n"), [to_c(b"lonely BAD Missing or invalid command name\r\n")]),
            (C(b"a NO{OP\r\n"), [to_c(b"a BAD Missing or invalid command name\r\n")]),
            (C(b"a NOOP now\r\n"), [to_c(b"a BAD NOOP takes no arguments\r\n")]),
            (C(b"\x00\xff\r\n"), [to_c(b"* BAD Invalid or missing tag\r\n")]),
            (C(b"a STARTTLS\r\n"), [to_c(b"a BAD STARTTLS not available\r\n")]),
            (C(b"b NOOP\n"), [to_c(b"b OK NOOP completed\r\n")]),  # bare LF tolerated
        ],
    ),
    "local STARTTLS discards pipelined plaintext": (
        {"local_starttls": True},
        [
            (
                U(UP_GREETING),
                [
                    to_c(
                        b"* OK [CAPABILITY IMAP4rev1 ID ENABLE IDLE LITERAL+ STARTTLS SASL-IR "
                        b"AUTH=PLAIN] proxy.test ready (mailwarden)\r\n"
                    )
                ],
            ),
            (
                C(b"a STARTTLS\r\nb LOGIN evil injected\r\n"),
                [to_c(b"a OK Begin TLS negotiation now\r\n"), StartClientTLS()],
            ),
            (
                C(b"c CAPABILITY\r\n"),
                [to_c(b"* CAPABILITY " + CAPS + b"\r\n"), to_c(b"c OK CAPABILITY completed\r\n")],
            ),
            (C(b"d STARTTLS\r\n"), [to_c(b"d BAD STARTTLS not available\r\n")]),
        ],
    ),
    "no STARTTLS offered on an implicit-TLS listener": (
        {"local_starttls": True, "tls_active": True},
        [*START, (C(b"a STARTTLS\r\n"), [to_c(b"a BAD STARTTLS not available\r\n")])],
    ),
    # AUTHENTICATE PLAIN
    "AUTHENTICATE PLAIN with SASL-IR": (
        {},
        [
            *START,
            (C(b"a AUTHENTICATE PLAIN " + plain(USER, "pw") + b"\r\n"), [Authenticate(USER, "pw")]),
        ],
    ),
    "AUTHENTICATE PLAIN with an authzid equal to the user": (
        {},
        [
            *START,
            (
                C(b"a authenticate plain " + plain(USER, "pw", USER) + b"\r\n"),
                [Authenticate(USER, "pw")],
            ),
        ],
    ),
    "AUTHENTICATE PLAIN without SASL-IR": (
        {},
        [
            *START,
            (C(b"a AUTHENTICATE PLAIN\r\n"), [to_c(b"+ \r\n")]),
            (
                C(plain("j\u00f6rg", "p\u00e4ss w") + b"\r\n"),
                [Authenticate("j\u00f6rg", "p\u00e4ss w")],
            ),
        ],
    ),
    "AUTHENTICATE PLAIN cancelled and refused": (
        {},
        [
            *START,
            (C(b"a AUTHENTICATE PLAIN\r\n"), [to_c(b"+ \r\n")]),
            (C(b"*\r\n"), [to_c(b"a BAD Authentication cancelled\r\n")]),
            (
                C(b"b AUTHENTICATE PLAIN =\r\n"),
                [
                    to_c(
                        b"b BAD Invalid SASL PLAIN response: PLAIN response must hold authzid NUL "
                        b"authcid NUL password\r\n"
                    )
                ],
            ),
            (
                C(b"c AUTHENTICATE PLAIN !!!\r\n"),
                [to_c(b"c BAD Invalid SASL PLAIN response: response is not valid base64\r\n")],
            ),
            (
                C(b"d AUTHENTICATE PLAIN " + plain(USER, "pw", "boss") + b"\r\n"),
                [
                    to_c(
                        b"d BAD Invalid SASL PLAIN response: PLAIN authorization identity differs "
                        b"from the username\r\n"
                    )
                ],
            ),
            (
                C(b"e AUTHENTICATE XOAUTH2 abc\r\n"),
                [to_c(b"e NO [CANNOT] Unsupported authentication mechanism\r\n")],
            ),
            (
                C(b"f AUTHENTICATE\r\n"),
                [to_c(b"f BAD AUTHENTICATE takes a mechanism and a response\r\n")],
            ),
            (C(b"g AUTHENTICATE PLAIN\r\n"), [to_c(b"+ \r\n")]),
            (
                C(b"\r\n"),
                [
                    to_c(
                        b"g BAD Invalid SASL PLAIN response: PLAIN response must hold "
                        b"authzid NUL authcid NUL password\r\n"
                    )
                ],
            ),
            (C(b"h NOOP\r\n"), [to_c(b"h OK NOOP completed\r\n")]),
        ],
    ),
    # answers to Authenticate
    "wrong local password, then a good login": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com wrong\r\nb NOOP\r\n"), [Authenticate(USER, "wrong")]),
            (
                Call("reject_login"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(USER, FailureKind.LOCAL_CREDENTIALS),
                    to_c(b"b OK NOOP completed\r\n"),
                ],
            ),
            *authenticated("c"),
            *success("c"),
        ],
    ),
    "token temporarily unavailable": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                Call("token_unavailable", (False,)),
                [
                    to_c(b"a " + TEMP_FAILURE),
                    LoginFailed(USER, FailureKind.TOKEN_UNAVAILABLE, "temporary"),
                ],
            ),
        ],
    ),
    "token permanently unavailable": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                Call("token_unavailable", (True,)),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(USER, FailureKind.TOKEN_UNAVAILABLE, "permanent"),
                ],
            ),
            (C(b"b NOOP\r\n"), [to_c(b"b OK NOOP completed\r\n")]),
        ],
    ),
    # upstream authentication
    "XOAUTH2 with SASL-IR, upstream capabilities kept": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(
                    b"* CAPABILITY IMAP4rev1 IDLE\r\n"
                    b"mw0 OK [CAPABILITY IMAP4rev1 IDLE MOVE] done\r\n"
                ),
                [to_u(b"mw1 NOOP\r\n")],
            ),
            (
                U(b"* OK still here\r\nmw1 OK NOOP completed\r\n* 3 EXISTS\r\n"),
                [
                    to_c(
                        b"* CAPABILITY IMAP4rev1 IDLE\r\n* OK still here\r\n"
                        b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
                    ),
                    LoginSucceeded(USER),
                    Splice(to_client=b"* 3 EXISTS\r\n"),
                ],
            ),
        ],
    ),
    "client commands pipelined after LOGIN go upstream with the splice": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\nb SELECT INBOX\r\n"), [Authenticate(USER, "pw")]),
            (C(b"c FETCH 1 BODY[]\r\n"), []),
            (token(), [to_u(b"mw0 AUTHENTICATE XOAUTH2 " + xoauth2() + b"\r\n")]),
            (U(b"mw0 OK done\r\n"), [to_u(b"mw1 NOOP\r\n")]),
            (
                U(b"mw1 OK done\r\n"),
                [
                    to_c(b"a OK Logged in\r\n"),
                    LoginSucceeded(USER),
                    Splice(to_upstream=b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n"),
                ],
            ),
        ],
    ),
    "OAUTHBEARER exact bytes": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                token(mech="oauthbearer"),
                [to_u(b"mw0 AUTHENTICATE OAUTHBEARER " + oauthbearer() + b"\r\n")],
            ),
            *success(),
        ],
    ),
    "no SASL-IR upstream: the response follows the continuation": (
        {},
        [
            (
                U(b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] hi\r\n"),
                [
                    to_c(
                        b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] proxy.test ready "
                        b"(mailwarden)\r\n"
                    )
                ],
            ),
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (token(), [to_u(b"mw0 AUTHENTICATE XOAUTH2\r\n")]),
            (U(b"+ \r\n"), [to_u(xoauth2() + b"\r\n")]),
            (U(challenge("401")), [to_u(b"\r\n")]),
            (U(b"mw0 NO [AUTHENTICATIONFAILED] bad\r\n"), [NeedFreshToken("401")]),
            (token(tok=FRESH), [to_u(b"mw1 AUTHENTICATE XOAUTH2\r\n")]),
            (U(b"+\r\n"), [to_u(xoauth2(tok=FRESH) + b"\r\n")]),
            (U(b"mw1 OK done\r\n"), [to_u(b"mw2 NOOP\r\n")]),
            (U(b"mw2 OK done\r\n"), [to_c(b"a OK Logged in\r\n"), LoginSucceeded(USER), Splice()]),
        ],
    ),
    "XOAUTH2 error challenge, retry, rejected again": (
        {},
        [
            *START,
            *authenticated(),
            (U(challenge("401")), [to_u(b"\r\n")]),
            (U(b"mw0 NO [AUTHENTICATIONFAILED] bad\r\n"), [NeedFreshToken("401")]),
            (token(tok=FRESH), [to_u(b"mw1 AUTHENTICATE XOAUTH2 " + xoauth2(tok=FRESH) + b"\r\n")]),
            (U(challenge("400")), [to_u(b"\r\n")]),
            (
                U(b"mw1 NO [AUTHENTICATIONFAILED] bad\r\n"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(
                        USER,
                        FailureKind.TOKEN_REJECTED,
                        'NO [AUTHENTICATIONFAILED] bad {"status":"400","schemes":"bearer"}',
                    ),
                ],
            ),
            # the client may try again: a new login gets its own retry
            (C(b"b LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (token(), [to_u(b"mw2 AUTHENTICATE XOAUTH2 " + xoauth2() + b"\r\n")]),
            (U(challenge("401")), [to_u(b"\r\n")]),
            (U(b"mw2 NO bad\r\n"), [NeedFreshToken("401")]),
            (
                Call("token_unavailable", (False,)),
                [
                    to_c(b"b " + TEMP_FAILURE),
                    LoginFailed(USER, FailureKind.TOKEN_UNAVAILABLE, "temporary"),
                ],
            ),
        ],
    ),
    "OAUTHBEARER error challenge answered with AQ==": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                token(mech="oauthbearer"),
                [to_u(b"mw0 AUTHENTICATE OAUTHBEARER " + oauthbearer() + b"\r\n")],
            ),
            (U(challenge("invalid_token")), [to_u(b"AQ==\r\n")]),
            (U(b"mw0 NO [AUTHENTICATIONFAILED] bad\r\n"), [NeedFreshToken("invalid_token")]),
            (
                token(tok=FRESH, mech="oauthbearer"),
                [to_u(b"mw1 AUTHENTICATE OAUTHBEARER " + oauthbearer(tok=FRESH) + b"\r\n")],
            ),
            (U(b"mw1 OK done\r\n"), [to_u(b"mw2 NOOP\r\n")]),
            (U(b"mw2 OK done\r\n"), [to_c(b"a OK Logged in\r\n"), LoginSucceeded(USER), Splice()]),
        ],
    ),
    "non-retryable challenge fails at once": (
        {},
        [
            *START,
            *authenticated(),
            (U(challenge("invalid_request")), [to_u(b"\r\n")]),
            (
                U(b"mw0 NO bad\r\n"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(
                        USER,
                        FailureKind.TOKEN_REJECTED,
                        'NO bad {"status":"invalid_request","schemes":"bearer"}',
                    ),
                ],
            ),
        ],
    ),
    "unparseable challenge fails at once": (
        {},
        [
            *START,
            *authenticated(),
            (U(b"+ not json at all\r\n"), [to_u(b"\r\n")]),
            (
                U(b"mw0 NO bad\r\n"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(USER, FailureKind.TOKEN_REJECTED, "NO bad"),
                ],
            ),
        ],
    ),
    "upstream NO without challenge": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(b"mw0 NO AUTHENTICATE failed.\r\n"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(USER, FailureKind.TOKEN_REJECTED, "NO AUTHENTICATE failed."),
                ],
            ),
        ],
    ),
    "upstream BAD": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(b"mw0 BAD unknown mechanism\r\n"),
                [
                    to_c(b"a " + AUTH_FAILED),
                    LoginFailed(USER, FailureKind.UPSTREAM_ERROR, "BAD unknown mechanism"),
                ],
            ),
        ],
    ),
    "upstream temporarily unavailable": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(b"mw0 NO [UNAVAILABLE] IdP down\r\n"),
                [
                    to_c(b"a " + TEMP_FAILURE),
                    LoginFailed(USER, FailureKind.UPSTREAM_ERROR, "NO [UNAVAILABLE] IdP down"),
                ],
            ),
        ],
    ),
    "second error challenge is a protocol error": (
        {},
        [
            *START,
            *authenticated(),
            (U(challenge("401")), [to_u(b"\r\n")]),
            (
                U(challenge("401")),
                [
                    LoginFailed(
                        USER, FailureKind.UPSTREAM_ERROR, "upstream sent a second error challenge"
                    ),
                    to_c(b"a " + TEMP_FAILURE),
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream sent a second error challenge"),
                ],
            ),
        ],
    ),
    "Microsoft: authenticated but not connected": (
        {},
        [
            *START,
            *authenticated(),
            (U(b"mw0 OK AUTHENTICATE completed.\r\n"), [to_u(b"mw1 NOOP\r\n")]),
            (
                U(b"mw1 BAD User is authenticated but not connected.\r\n"),
                [
                    to_c(NOT_CONNECTED_REPLY),
                    to_c(b"* BYE Closing the connection\r\n"),
                    LoginFailed(
                        USER, FailureKind.NOT_CONNECTED, "User is authenticated but not connected."
                    ),
                    Close("upstream: user is authenticated but not connected"),
                ],
            ),
        ],
    ),
    "not connected announced with BYE": (
        {},
        [
            *START,
            *authenticated(),
            (U(b"mw0 OK done\r\n"), [to_u(b"mw1 NOOP\r\n")]),
            (
                U(b"* BYE User is authenticated but not connected.\r\n"),
                [
                    to_c(NOT_CONNECTED_REPLY),
                    to_c(b"* BYE Closing the connection\r\n"),
                    LoginFailed(
                        USER, FailureKind.NOT_CONNECTED, "User is authenticated but not connected."
                    ),
                    Close("upstream: user is authenticated but not connected"),
                ],
            ),
        ],
    ),
    "NOOP refused for another reason": (
        {},
        [
            *START,
            *authenticated(),
            (U(b"mw0 OK done\r\n"), [to_u(b"mw1 NOOP\r\n")]),
            (
                U(b"mw1 NO server error\r\n"),
                [
                    LoginFailed(
                        USER,
                        FailureKind.UPSTREAM_ERROR,
                        "upstream refused NOOP after login: server error",
                    ),
                    to_c(b"a " + TEMP_FAILURE),
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream refused NOOP after login: server error"),
                ],
            ),
        ],
    ),
    "upstream closes while the token is fetched": (
        {},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                Call("upstream_closed"),
                [
                    LoginFailed(USER, FailureKind.UPSTREAM_ERROR, "upstream closed the connection"),
                    to_c(b"a " + TEMP_FAILURE),
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream closed the connection"),
                ],
            ),
            (token(), []),  # the answer arriving late is ignored
        ],
    ),
    "upstream BYE during AUTHENTICATE": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(b"* BYE shutting down\r\n"),
                [
                    LoginFailed(
                        USER, FailureKind.UPSTREAM_ERROR, "upstream said BYE: shutting down"
                    ),
                    to_c(b"a " + TEMP_FAILURE),
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream said BYE: shutting down"),
                ],
            ),
        ],
    ),
    "upstream chatter before login is ignored, garbage is not": (
        {},
        [
            *START,
            (U(b"* OK still here\r\n"), []),
            (
                U(b"mw7 OK what\r\n"),
                [to_c(BYE_UNAVAILABLE), Close("upstream sent an unexpected response")],
            ),
        ],
    ),
    "wrong upstream tag during AUTHENTICATE": (
        {},
        [
            *START,
            *authenticated(),
            (
                U(b"mw9 OK done\r\n"),
                [
                    LoginFailed(
                        USER,
                        FailureKind.UPSTREAM_ERROR,
                        "upstream sent an unexpected response to AUTHENTICATE",
                    ),
                    to_c(b"a " + TEMP_FAILURE),
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream sent an unexpected response to AUTHENTICATE"),
                ],
            ),
        ],
    ),
    "client closes": (
        {},
        [*START, (Call("client_closed"), [Close("client closed the connection")])],
    ),
    # limits
    "line too long": (
        {"max_line": 64},
        [
            *START,
            (
                C(b"a LOGIN " + b"x" * 80 + b"\r\n"),
                [
                    to_c(
                        b"* BAD [TOOBIG] Command line too long\r\n* BYE Closing the connection\r\n"
                    ),
                    Close("client: command line too long"),
                ],
            ),
        ],
    ),
    "SASL line too long": (
        {"max_line": 64},
        [
            *START,
            (C(b"a AUTHENTICATE PLAIN\r\n"), [to_c(b"+ \r\n")]),
            (
                C(b"A" * 80 + b"\r\n"),
                [
                    to_c(
                        b"* BAD [TOOBIG] Command line too long\r\n* BYE Closing the connection\r\n"
                    ),
                    Close("client: command line too long"),
                ],
            ),
        ],
    ),
    "synchronizing literal too large is refused, session goes on": (
        {"max_literal": 16},
        [
            *START,
            (C(b"a LOGIN {17}\r\n"), [to_c(b"a NO [TOOBIG] Literal too large\r\n")]),
            (C(b"b LOGIN {16}\r\n"), [CONTINUE]),
            (C(b"0123456789abcdef pw\r\n"), [Authenticate("0123456789abcdef", "pw")]),
        ],
    ),
    "non-synchronizing literal too large closes": (
        {"max_literal": 16},
        [
            *START,
            (
                C(b"a LOGIN {17+}\r\n"),
                [
                    to_c(b"a BAD [TOOBIG] Literal too large\r\n"),
                    to_c(b"* BYE Cannot continue after this error\r\n"),
                    Close("client error: [TOOBIG] Literal too large"),
                ],
            ),
        ],
    ),
    "many literals exceed the command limit": (
        {"max_line": 64, "max_literal": 16},
        [
            *START,
            (C(b"a ID ({16+}\r\n" + b"x" * 16), []),
            (C(b" {16+}\r\n" + b"y" * 16 + b" {16+}\r\n" + b"z" * 16), []),
            (
                C(b" {16+}\r\n"),
                [
                    to_c(b"a BAD [TOOBIG] Literal too large\r\n"),
                    to_c(b"* BYE Cannot continue after this error\r\n"),
                    Close("client error: [TOOBIG] Literal too large"),
                ],
            ),
        ],
    ),
    "client floods while the login is pending": (
        {"max_line": 64, "max_literal": 16},
        [
            *START,
            (C(b"a LOGIN user@example.com pw\r\n"), [Authenticate(USER, "pw")]),
            (
                C(b"b " + b"x" * 100),
                [
                    to_c(
                        b"* BAD [TOOBIG] Too much input before the previous command finished\r\n"
                        b"* BYE Closing the connection\r\n"
                    ),
                    Close("client: too much input before the previous command finished"),
                ],
            ),
        ],
    ),
    "upstream literal too large": (
        {"max_literal": 16},
        [
            (U(b"* OK ready\r\n"), [to_u(b"mw0 CAPABILITY\r\n")]),
            (
                U(b"* X {17}\r\n"),
                [
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream protocol error: upstream sent an oversized literal"),
                ],
            ),
        ],
    ),
    "upstream line too long": (
        {},
        [
            (
                U(b"* OK " + b"x" * 70000),
                [
                    to_c(BYE_UNAVAILABLE),
                    Close("upstream protocol error: line longer than 65536 bytes"),
                ],
            ),
        ],
    ),
}


# Bytes that arrive after a STARTTLS answer in the *same* read are the plaintext that must be
# discarded; fed one byte at a time they would be TLS-protected bytes instead.
WHOLE_ONLY = {
    "upstream STARTTLS, plaintext after the OK discarded",
    "local STARTTLS discards pipelined plaintext",
}


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, bytewise: bool) -> None:
    options, steps = SCENARIOS[name]
    if bytewise and name in WHOLE_ONLY:
        pytest.skip("the scenario is about bytes arriving together")
    run(make_core(**options), steps, bytewise=bytewise)


# -- LOGIN in every string form ------------------------------------------------------------------

LOGIN_FORMS: list[tuple[str, list[bytes], str, str]] = [
    ("atoms", [b"a LOGIN user pw\r\n"], "user", "pw"),
    ("quoted", [b'a LOGIN "user" "p w"\r\n'], "user", "p w"),
    ("quoted escapes", [b'a LOGIN "us\\\\er" "p\\"w"\r\n'], "us\\er", 'p"w'),
    ("empty quoted password", [b'a LOGIN user ""\r\n'], "user", ""),
    ("atom with ]", [b"a LOGIN user pa]ss\r\n"], "user", "pa]ss"),
    ("UTF-8 quoted", ['a LOGIN "j\u00f6rg" "p\u00e4ss"\r\n'.encode()], "j\u00f6rg", "p\u00e4ss"),
    ("sync literal password", [b"a LOGIN user {4}\r\n", b"p\r\nw\r\n"], "user", "p\r\nw"),
    ("sync literal both", [b"a LOGIN {4}\r\n", b"user {2}\r\n", b"pw\r\n"], "user", "pw"),
    ("literal user, quoted password", [b"a LOGIN {4}\r\n", b'user "pw"\r\n'], "user", "pw"),
    ("LITERAL+ both", [b"a LOGIN {4+}\r\nuser {3+}\r\np w\r\n"], "user", "p w"),
    ("LITERAL+ and sync", [b"a LOGIN {4+}\r\nuser {3}\r\n", b"p w\r\n"], "user", "p w"),
    (
        "UTF-8 literal",
        [b"a LOGIN user {6}\r\n", "p\u00e4\u00df\r\n".encode()[:-2] + b"!\r\n"],
        "user",
        "p\u00e4\u00df!",
    ),
    ("empty literal", [b"a LOGIN user {0}\r\n", b"\r\n"], "user", ""),
    ("lower-case command", [b"a login user pw\r\n"], "user", "pw"),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("chunks", "user", "password"), [f[1:] for f in LOGIN_FORMS], ids=[f[0] for f in LOGIN_FORMS]
)
def test_login_forms(chunks: list[bytes], user: str, password: str, bytewise: bool) -> None:
    core = make_core()
    feed(core, U(UP_GREETING))
    got: list[Any] = []
    for chunk in chunks:
        got += feed(core, C(chunk), bytewise=bytewise)
    continuations = [a for a in got if a == to_c(b"+ Ready for literal\r\n")]
    assert got == [*continuations, Authenticate(user, password)]
    assert len(continuations) == len(chunks) - 1
    assert core.state is State.AWAIT_TOKEN


BAD_LOGINS: list[tuple[bytes, bytes]] = [
    (b"a LOGIN user\r\n", b"a BAD LOGIN takes a user name and a password\r\n"),
    (b"a LOGIN a b c\r\n", b"a BAD LOGIN takes a user name and a password\r\n"),
    (b"a LOGIN\r\n", b"a BAD LOGIN takes a user name and a password\r\n"),
    (b'a LOGIN "user pw\r\n', b"a BAD Unterminated quoted string\r\n"),
    (b'a LOGIN "us\\er" pw\r\n', b"a BAD Invalid escape in quoted string\r\n"),
    (b'a LOGIN "user"pw x\r\n', b"a BAD Expected a space between arguments\r\n"),
    (b"a LOGIN user  pw\r\n", b"a BAD Empty argument\r\n"),
    (b"a LOGIN user pw \r\n", b"a BAD Empty argument\r\n"),
    (b"a LOGIN us(er pw\r\n", b"a BAD Invalid characters in atom\r\n"),
    (b"a LOGIN user p%w\r\n", b"a BAD Invalid characters in atom\r\n"),
    (b"a LOGIN user \xff\xfe\r\n", b"a BAD User name and password must be UTF-8\r\n"),
    (b'a LOGIN "" pw\r\n', b"a BAD Invalid user name\r\n"),
    (b'a LOGIN "us\x01er" pw\r\n', b"a BAD Invalid user name\r\n"),
    (b"a LOGIN user pw{2+}\r\nxx\r\n", b"a BAD A literal must follow a space\r\n"),
]


@pytest.mark.parametrize(("line", "reply"), BAD_LOGINS)
def test_bad_login_syntax_keeps_the_session(line: bytes, reply: bytes) -> None:
    for bytewise in (False, True):
        core = make_core()
        feed(core, U(UP_GREETING))
        assert feed(core, C(line), bytewise=bytewise) == [to_c(reply)]
        assert feed(core, C(b"z NOOP\r\n")) == [to_c(b"z OK NOOP completed\r\n")]


def test_literal_with_invalid_tag_gets_no_continuation() -> None:
    core = make_core()
    feed(core, U(UP_GREETING))
    assert feed(core, C(b"(x LOGIN {4}\r\n")) == [to_c(b"* BAD Invalid or missing tag\r\n")]


# -- capabilities ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "starttls", "expected"),
    [
        (
            ["IMAP4rev1", "AUTH=PLAIN", "AUTH=XOAUTH2", "SASL-IR", "IDLE"],
            False,
            ["IMAP4rev1", "IDLE", "SASL-IR", "AUTH=PLAIN"],
        ),
        (
            ["IMAP4rev2", "STARTTLS", "LOGINDISABLED", "LOGIN-REFERRALS", "LITERAL-"],
            True,
            ["IMAP4rev2", "LITERAL-", "STARTTLS", "SASL-IR", "AUTH=PLAIN"],
        ),
        ([], False, ["IMAP4rev1", "SASL-IR", "AUTH=PLAIN"]),
        (
            ["imap4rev1", "idle", "IDLE", "auth=oauthbearer", "starttls"],
            False,
            ["imap4rev1", "idle", "SASL-IR", "AUTH=PLAIN"],
        ),
    ],
)
def test_capability_rewriting(upstream: list[str], starttls: bool, expected: list[str]) -> None:
    assert client_capabilities(upstream, starttls) == expected


def test_garbage_capabilities_are_dropped() -> None:
    core = make_core()
    feed(core, U(b"* OK [CAPABILITY IMAP4rev1 X\x01Y (BAD IDLE] hi\r\n"))
    assert core.upstream_capabilities == ["IMAP4rev1", "IDLE"]


# -- parser details ------------------------------------------------------------------------------


def test_parse_astrings_mixture() -> None:
    command = Command("a", "LOGIN", (b" ", b' "q\\"x" atom '), (b"lit", b"lit2"))
    assert parse_astrings(command) == [b"lit", b'q"x', b"atom", b"lit2"]


def test_command_reader_resets_after_a_command() -> None:
    reader, buf = CommandReader(10, 100), LineBuffer(50)
    buf.feed(b"a LOGIN {2+}\r\nab cd\r\nb NOOP\r\n")
    first, second = reader.next(buf), reader.next(buf)
    assert isinstance(first, Command) and first.literals == (b"ab",)
    assert isinstance(second, Command) and second.name == "NOOP" and second.literals == ()
    assert reader.next(buf) is None


# -- secrets stay out of everything printable ----------------------------------------------------


def test_no_secret_in_replies_reasons_or_repr() -> None:
    core = make_core()
    actions: list[Any] = []
    items: list[C | U | Call] = [
        U(UP_GREETING),
        C(b"a LOGIN user@example.com hunter2\r\n"),
        token(),
    ]
    for item in items:
        actions += feed(core, item)
    actions += feed(core, U(challenge("401") + b"mw0 NO bad\r\n"))
    actions += feed(core, token(tok=FRESH))
    actions += feed(core, U(b"mw1 NO nope\r\n"))
    texts = [repr(a) for a in actions if a.__class__.__name__ != "SendUpstream"]
    texts += [repr(core), str(core.__dict__.get("_login"))]
    for secret in ("hunter2", TOKEN, FRESH, xoauth2().decode(), xoauth2(tok=FRESH).decode()):
        assert not any(secret in t for t in texts), secret
    assert not any(
        isinstance(a, SendClient) and (TOKEN.encode() in a.data or b"hunter2" in a.data)
        for a in actions
    )


def test_answers_in_the_wrong_state_are_bugs() -> None:
    core = make_core()
    feed(core, U(UP_GREETING))
    with pytest.raises(RuntimeError):
        core.reject_login()
    with pytest.raises(RuntimeError):
        core.provide_token("u", TOKEN, Mechanism.XOAUTH2)


def test_nothing_after_close() -> None:
    core = make_core()
    feed(core, U(UP_GREETING))
    feed(core, C(b"a LOGOUT\r\n"))
    core.receive_upstream(b"* BYE\r\n")
    core.receive_client(b"b NOOP\r\n")
    core.upstream_closed()
    core.client_closed()
    assert drain(core) == []


@pytest.mark.parametrize(
    ("mechanism", "user", "decoded"),
    [
        ("xoauth2", USER, f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01"),
        (
            "oauthbearer",
            "a,b=c@example.com",
            f"n,a=a=2Cb=3Dc@example.com,\x01host={HOST}\x01port={PORT}"
            f"\x01auth=Bearer {TOKEN}\x01\x01",
        ),
    ],
)
def test_upstream_initial_response_bytes(mechanism: str, user: str, decoded: str) -> None:
    core = make_core()
    feed(core, U(UP_GREETING))
    feed(core, C(b"a LOGIN local pw\r\n"))
    [sent] = feed(core, token(user, mech=mechanism))
    assert isinstance(sent, SendUpstream)
    tag, command, name, response = sent.data.rstrip(b"\r\n").split(b" ")
    assert (tag, command, name) == (b"mw0", b"AUTHENTICATE", mechanism.upper().encode())
    assert base64.b64decode(response, validate=True) == decoded.encode()

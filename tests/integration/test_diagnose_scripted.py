"""`doctor` against scripted servers on loopback: the exchanges our real servers don't
produce (IMAP without SASL-IR, Microsoft's replies, POP3's OAUTHBEARER error challenge,
literals), checked byte for byte on the wire and for the catalogue hint they get.

The servers speak plain text (`tls: none` with `allowInsecure`), so the login is what is
under test; TLS is covered against the real servers in `test_diagnose.py`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from dataclasses import dataclass, field

import pytest

from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    MailProtocol,
    Mechanism,
    OAuth2,
    ProviderKind,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.diagnose import Doctor, Options
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens import factory
from mailwarden_proxy.tokens.base import AccessToken

USER = "box@contoso.com"
TOKEN = "header.payload-that-is-secret.signature"


@dataclass
class Script:
    """Server lines to send, each after reading one client line (None: send at once)."""

    steps: list[tuple[bool, bytes]]
    received: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for read_first, reply in self.steps:
            if read_first:
                line = await reader.readline()
                if not line:
                    break
                self.received.append(line.rstrip(b"\r\n"))
            writer.write(reply)
            await writer.drain()
        if self.steps:  # whatever comes after the script (LOGOUT, QUIT) gets a close
            await reader.read(1024)
        writer.close()


def _config(protocol: MailProtocol, port: int, mechanism: Mechanism) -> ProxyConfig:
    upstream = Upstream("127.0.0.1", port, UpstreamTLS.NONE, allow_insecure=True)
    account = Account(
        username=USER,
        mechanism=mechanism,
        oauth2=OAuth2(
            ProviderKind.MICROSOFT,
            Flow.CLIENT_CREDENTIALS,
            "https://login.example/t/oauth2/v2.0/token",
            client_id="cid",
            client_secret=Secret("client-secret-value"),
        ),
    )
    return ProxyConfig((Listener("L", protocol, upstream),), (account,))


class _Provider:
    def fetch(self, username: str) -> AccessToken:
        return AccessToken(Secret(TOKEN), time.time() + 3600)


@pytest.fixture(autouse=True)
def _no_idp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The token step is tested against the real IdP elsewhere; here it always succeeds."""
    monkeypatch.setattr(factory, "provider_for", lambda account, **_: _Provider())


def run_doctor(
    protocol: MailProtocol, script: Script, mechanism: Mechanism = Mechanism.XOAUTH2
) -> tuple[bool, str]:
    out = io.StringIO()

    async def main() -> bool:
        server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = _config(protocol, port, mechanism)
        doctor = Doctor(cfg, cfg.accounts[0], USER, out, options=Options(timeout=5))
        async with server:
            return await doctor.run()

    ok = asyncio.run(main())
    text = out.getvalue()
    assert TOKEN not in text and "client-secret-value" not in text
    return ok, "\n".join(" ".join(line.split()) for line in text.splitlines())


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _xoauth2(user: str = USER) -> bytes:
    return _b64(f"user={user}\x01auth=Bearer {TOKEN}\x01\x01".encode())


CHALLENGE = _b64(json.dumps({"status": "401", "schemes": "bearer"}).encode())


def test_imap_without_sasl_ir_sends_the_response_after_the_continuation() -> None:
    script = Script([
        (False, b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n"),
        (True, b"* CAPABILITY IMAP4rev1 AUTH=XOAUTH2\r\nmw1 OK done\r\n"),
        (True, b"+ \r\n"),
        (True, b"mw2 OK [CAPABILITY IMAP4rev1] Logged in\r\n"),
        (True, b"mw3 OK NOOP done\r\n"),
        (True, b"* FLAGS (\\Seen)\r\n* 12 EXISTS\r\n* OK [UIDVALIDITY 1] x\r\n"
               b"mw4 OK [READ-ONLY] done\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.IMAP, script)
    assert ok, out
    assert script.received[:3] == [b"mw1 CAPABILITY", b"mw2 AUTHENTICATE XOAUTH2", _xoauth2()]
    assert script.received[3:] == [b"mw3 NOOP", b"mw4 EXAMINE INBOX"]
    assert "- TLS off (allowInsecure): the token travels in clear text" in out
    assert "✓ greeting OK ready" in out  # the capability list is not repeated
    assert "✓ EXAMINE INBOX 12 messages" in out


def test_imap_error_challenge_is_answered_and_diagnosed() -> None:
    script = Script([
        (False, b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n"),
        (True, b"mw1 OK done\r\n"),
        (True, b"+ " + CHALLENGE + b"\r\n"),
        (True, b"mw2 NO AUTHENTICATE failed.\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.IMAP, script)
    assert not ok
    assert script.received[1] == b"mw2 AUTHENTICATE XOAUTH2 " + _xoauth2()  # SASL-IR
    assert script.received[2] == b""  # XOAUTH2's answer to an error challenge
    login = "✗ login XOAUTH2 as box@contoso.com: NO AUTHENTICATE failed.; error challenge"
    assert f'{login} {{"status": "401"' in out
    assert "reason: " in out and "fix: " in out
    assert out.splitlines()[-1] == "result: FAIL (1 of 5 checks failed; first: login)"


def test_microsofts_authenticated_but_not_connected() -> None:
    script = Script([
        (False, b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"),
        (True, b"* CAPABILITY IMAP4 IMAP4rev1 AUTH=XOAUTH2 SASL-IR\r\nmw1 OK done\r\n"),
        (True, b"mw2 OK AUTHENTICATE completed.\r\n"),
        (True, b"mw3 BAD User is authenticated but not connected.\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.IMAP, script)
    assert not ok
    assert "✓ login XOAUTH2 as box@contoso.com: OK AUTHENTICATE completed." in out
    assert "✗ NOOP BAD User is authenticated but not connected." in out
    assert "reason: AuthenticatedButNotConnected" in out
    assert "EXAMINE" not in out


def test_imap_literal_in_an_untagged_response_is_skipped() -> None:
    script = Script([
        (False, b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n"),
        (True, b"mw1 OK done\r\n"),
        (True, b"mw2 OK Logged in\r\n"),
        (True, b"* ID {5}\r\nab\r\nc)\r\nmw3 OK NOOP done\r\n"),
        (True, b"* 0 EXISTS\r\nmw4 OK done\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.IMAP, script)
    assert ok, out
    assert "✓ EXAMINE INBOX 0 messages" in out


def test_smtp_auth_disabled_for_the_tenant() -> None:
    reply = (
        b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
        b"the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.\r\n"
    )
    script = Script([
        (False, b"220 outlook.example Microsoft ESMTP MAIL Service ready\r\n"),
        (True, b"250-outlook.example Hello\r\n250-SIZE 157286400\r\n250 AUTH LOGIN XOAUTH2\r\n"),
        (True, b"334 \r\n"),
        (True, reply),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.SMTP, script)
    assert not ok
    assert script.received == [b"EHLO mailwarden", b"AUTH XOAUTH2", _xoauth2()]
    assert "✗ login XOAUTH2 as box@contoso.com: 535 5.7.139 Authentication unsuccessful" in out
    assert "reason: SmtpAuthDisabled, microsoft code 535 5.7.139" in out


def test_smtp_mechanism_refused_outright_notes_what_the_server_offers() -> None:
    script = Script([
        (False, b"220 mx ready\r\n"),
        (True, b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n"),
        (True, b"504 5.7.4 Unrecognized authentication type\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.SMTP, script, Mechanism.OAUTHBEARER)
    assert not ok
    assert (
        "✗ login OAUTHBEARER as box@contoso.com (the server does not announce OAUTHBEARER): "
        "504 5.7.4 Unrecognized authentication type"
    ) in out


@pytest.mark.parametrize("mechanism", [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER])
def test_pop3_error_challenge_answer_per_mechanism(mechanism: Mechanism) -> None:
    script = Script([
        (False, b"+OK POP3 ready\r\n"),
        (True, b"+OK\r\nUSER\r\nSASL XOAUTH2 OAUTHBEARER\r\n.\r\n"),
        (True, b"+ \r\n"),
        (True, b"+ " + CHALLENGE + b"\r\n"),
        (True, b"-ERR [AUTH] Authentication failed.\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.POP3, script, mechanism)
    assert not ok
    name = mechanism.value.upper().encode()
    assert script.received[:2] == [b"CAPA", b"AUTH " + name]
    assert script.received[3] == (b"AQ==" if mechanism is Mechanism.OAUTHBEARER else b"")
    assert f"✗ login {name.decode()} as box@contoso.com: -ERR [AUTH] Authentication failed." in out


def test_pop3_stat() -> None:
    script = Script([
        (False, b"+OK POP3 ready\r\n"),
        (True, b"+OK\r\nSASL XOAUTH2\r\n..dot-stuffed\r\n.\r\n"),
        (True, b"+ \r\n"),
        (True, b"+OK Logged in\r\n"),
        (True, b"+OK 3 4096\r\n"),
    ])  # fmt: skip
    ok, out = run_doctor(MailProtocol.POP3, script)
    assert ok, out
    assert "✓ STAT 3 messages, 4096 bytes" in out


def test_a_server_that_hangs_up_before_the_greeting() -> None:
    ok, out = run_doctor(MailProtocol.SMTP, Script([]))
    assert not ok
    assert "✗ greeting the server closed the connection" in out
    assert "reason: UpstreamConnectionLost" in out

"""The mail servers the proxy is tested against, proven with direct OAuth 2.0 clients.

No proxy here: imaplib, poplib, smtplib and curl speak XOAUTH2/OAUTHBEARER themselves to
Dovecot, Postfix (SASL via Dovecot) and the aiosmtpd submission server, with tokens
minted by the local identity provider. If these fail, the proxy's tests can't mean much.
"""

from __future__ import annotations

import base64
import imaplib
import json
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from typing import Any

import pytest

from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.dovecot import DovecotServer, private_directory, start_dovecot, stop_process
from tests.fixtures.postfix import PostfixServer

FAST_FAILURE = 1.5  # seconds: failed logins must not be slowed down by the servers


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user: str, token: str) -> bytes:
    return f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def new_user(domain: str = "example.test") -> str:
    return f"user-{uuid.uuid4().hex[:10]}@{domain}"


def message(sender: str, rcpt: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, subject
    msg.set_content(f"{subject}\n")
    return msg


def pop3_command(pop: poplib.POP3, line: str) -> bytes:
    """A raw POP3 command (poplib has no AUTH); raises `poplib.error_proto` on -ERR."""
    reply: bytes = getattr(pop, "_shortcmd")(line)  # noqa: B009
    return reply


def fetched(data: list[Any]) -> bytes:
    """The literal of the first item of an imaplib FETCH answer."""
    item = data[0]
    assert isinstance(item, tuple)
    return bytes(item[1])


class SaslResponder:
    """imaplib `authenticate()` callback: the initial response, then `after_error` for the
    error challenge; remembers the challenges it was given."""

    def __init__(self, first: bytes, after_error: bytes) -> None:
        self.responses = [first, after_error]
        self.challenges: list[bytes] = []

    def __call__(self, challenge: bytes) -> bytes:
        self.challenges.append(challenge)
        return self.responses[min(len(self.challenges) - 1, 1)]


@pytest.fixture
def tls(local_ca: LocalCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(local_ca.ca_path))


# -- Dovecot: IMAP ----------------------------------------------------------------------


def imaps(dovecot: DovecotServer, tls: ssl.SSLContext) -> imaplib.IMAP4_SSL:
    return imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=tls, timeout=10)


@pytest.mark.dovecot
def test_dovecot_imaps_xoauth2_reads_a_delivered_message(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    dovecot.deliver(user, b"Subject: stored\r\nFrom: a@example.test\r\n\r\nhello\r\n")
    client = imaps(dovecot, tls)
    assert "AUTH=XOAUTH2" in client.capabilities
    assert "AUTH=OAUTHBEARER" in client.capabilities
    token = idp.issue_token(user)
    typ, _ = client.authenticate("XOAUTH2", lambda _: xoauth2(user, token))
    assert typ == "OK"
    typ, count = client.select("INBOX")
    assert (typ, count) == ("OK", [b"1"])
    typ, data = client.fetch("1", "(RFC822)")
    assert typ == "OK"
    assert b"hello" in fetched(data)
    client.logout()
    assert idp.introspections >= 1


@pytest.mark.dovecot
def test_dovecot_imap_starttls_oauthbearer(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    assert "STARTTLS" in client.capabilities
    assert "LOGINDISABLED" in client.capabilities
    client.starttls(tls)
    token = idp.issue_token(user)
    typ, _ = client.authenticate("OAUTHBEARER", lambda _: oauthbearer(user, token))
    assert typ == "OK"
    assert client.select("INBOX")[0] == "OK"
    client.logout()


@pytest.mark.dovecot
def test_dovecot_imap_refuses_authentication_before_starttls(
    dovecot: DovecotServer, idp: LocalIdP
) -> None:
    user = new_user()
    client = imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        client.authenticate("XOAUTH2", lambda _: xoauth2(user, idp.issue_token(user)))
    client.shutdown()


@pytest.mark.dovecot
def test_dovecot_xoauth2_bad_token_error_challenge(
    dovecot: DovecotServer, tls: ssl.SSLContext
) -> None:
    user = new_user()
    client = imaps(dovecot, tls)
    responder = SaslResponder(xoauth2(user, "not-a-token"), b"")
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", responder)
    assert time.monotonic() - started < FAST_FAILURE
    # first call: the empty continuation; second: the JSON error challenge
    error = json.loads(responder.challenges[1])
    assert error["status"] == "401"
    # the connection stays usable for another attempt
    assert client.noop()[0] == "OK"
    client.logout()


@pytest.mark.dovecot
def test_dovecot_oauthbearer_bad_token_error_challenge(
    dovecot: DovecotServer, tls: ssl.SSLContext
) -> None:
    client = imaps(dovecot, tls)
    responder = SaslResponder(oauthbearer(new_user(), "not-a-token"), b"\x01")
    started = time.monotonic()
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("OAUTHBEARER", responder)
    assert time.monotonic() - started < FAST_FAILURE
    assert json.loads(responder.challenges[1])["status"] == "invalid_token"
    client.logout()


@pytest.mark.dovecot
def test_dovecot_raw_error_challenge_wire_format(
    dovecot: DovecotServer, tls: ssl.SSLContext
) -> None:
    """Exactly what a proxy sees: `+ <base64 JSON>`, empty line, tagged NO."""
    raw = socket.create_connection((dovecot.host, dovecot.imaps_port), timeout=10)
    with tls.wrap_socket(raw, server_hostname=dovecot.host) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        line = b"a1 AUTHENTICATE XOAUTH2 " + b64(xoauth2(new_user(), "bad")).encode() + b"\r\n"
        sock.sendall(line)
        challenge = reader.readline()
        assert challenge.startswith(b"+ ")
        assert json.loads(base64.b64decode(challenge[2:].strip()))["status"] == "401"
        sock.sendall(b"\r\n")
        assert reader.readline().startswith(b"a1 NO [AUTHENTICATIONFAILED]")


@pytest.mark.dovecot
def test_dovecot_token_of_another_user_is_refused(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    client = imaps(dovecot, tls)
    token = idp.issue_token(new_user())
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", SaslResponder(xoauth2(new_user(), token), b""))
    client.logout()


@pytest.mark.dovecot
def test_dovecot_expired_token_is_refused(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    client = imaps(dovecot, tls)
    token = idp.issue_token(user, lifetime=-1)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        client.authenticate("XOAUTH2", SaslResponder(xoauth2(user, token), b""))
    client.logout()


@pytest.mark.dovecot
def test_dovecot_app_only_token_opens_any_mailbox(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    """Client-credentials tokens name no user (Microsoft's application permission)."""
    token = idp.issue_token(None)
    for user in (new_user(), new_user("example.org")):
        client = imaps(dovecot, tls)
        responder = SaslResponder(xoauth2(user, token), b"")
        assert client.authenticate("XOAUTH2", responder)[0] == "OK"
        client.logout()


@pytest.mark.dovecot
def test_dovecot_survives_a_burst_of_100_logins(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    token = idp.issue_token(user)

    def login(_: int) -> str:
        client = imaps(dovecot, tls)
        typ, _data = client.authenticate("XOAUTH2", lambda _: xoauth2(user, token))
        client.logout()
        return typ

    started = time.monotonic()
    with ThreadPoolExecutor(100) as pool:
        results = list(pool.map(login, range(100)))
    assert results == ["OK"] * 100
    assert time.monotonic() - started < 30


@pytest.mark.dovecot
def test_dovecot_answers_unavailable_when_the_idp_is_down(
    local_ca: LocalCA, tls: ssl.SSLContext
) -> None:
    """Own Dovecot and IdP: the IdP stops, logins get a temporary failure."""
    idp = LocalIdP(local_ca.issue("idp-down"), local_ca.ca_path).start()
    directory = private_directory("mailwarden-dovecot-down-")
    server = start_dovecot(directory, local_ca, idp)
    try:
        user = new_user()
        token = idp.issue_token(user)
        idp.stop()
        client = imaps(server, tls)
        with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
            client.authenticate("XOAUTH2", SaslResponder(xoauth2(user, token), b""))
        client.logout()
        pop = poplib.POP3_SSL(server.host, server.pop3s_port, context=tls, timeout=10)
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            pop3_command(pop, "AUTH XOAUTH2 " + b64(xoauth2(user, token)))
        pop.quit()
    finally:
        stop_process(server.process)
        shutil.rmtree(directory, ignore_errors=True)


# -- Dovecot: POP3 ----------------------------------------------------------------------


@pytest.mark.dovecot
def test_dovecot_pop3s_xoauth2_retrieves_a_message(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    dovecot.deliver(user, b"Subject: pop\r\n\r\nover pop3\r\n")
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=tls, timeout=10)
    assert "XOAUTH2" in pop.capa()["SASL"]
    reply = pop3_command(pop, "AUTH XOAUTH2 " + b64(xoauth2(user, idp.issue_token(user))))
    assert reply.startswith(b"+OK")
    assert pop.stat()[0] == 1
    assert b"over pop3" in b"\r\n".join(pop.retr(1)[1])
    pop.quit()


@pytest.mark.dovecot
def test_dovecot_pop3_stls_oauthbearer_after_334_style_challenge(
    dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    assert "STLS" in pop.capa()
    pop.stls(tls)
    assert pop3_command(pop, "AUTH OAUTHBEARER") == b"+ "  # empty challenge, token follows
    reply = pop3_command(pop, b64(oauthbearer(user, idp.issue_token(user))))
    assert reply.startswith(b"+OK")
    assert pop.stat()[0] == 0
    pop.quit()


@pytest.mark.dovecot
def test_dovecot_pop3_bad_token_error_challenge(
    dovecot: DovecotServer, tls: ssl.SSLContext
) -> None:
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=tls, timeout=10)
    challenge = pop3_command(pop, "AUTH XOAUTH2 " + b64(xoauth2(new_user(), "bad")))
    assert challenge.startswith(b"+ ")
    assert json.loads(base64.b64decode(challenge[2:]))["status"] == "401"
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop3_command(pop, "")
    pop.quit()


# -- Dovecot with curl ------------------------------------------------------------------


@pytest.mark.dovecot
def test_curl_oauth2_bearer_against_dovecot_imaps(
    dovecot: DovecotServer, idp: LocalIdP, local_ca: LocalCA
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    user = new_user()
    dovecot.deliver(user, b"Subject: curl\r\n\r\nfetched by curl\r\n")
    url = f"imaps://{dovecot.host}:{dovecot.imaps_port}/INBOX;MAILINDEX=1"
    args = [curl, "-sS", "--cacert", str(local_ca.ca_path), "--user", f"{user}:", url]
    good = subprocess.run(
        [*args, "--oauth2-bearer", idp.issue_token(user)], capture_output=True, timeout=30
    )
    assert good.returncode == 0, good.stderr
    assert b"fetched by curl" in good.stdout
    bad = subprocess.run([*args, "--oauth2-bearer", "bad"], capture_output=True, timeout=30)
    assert bad.returncode == 67  # CURLE_LOGIN_DENIED
    assert f"user=<{user}>, method=OAUTHBEARER" in dovecot.log()  # curl prefers it


# -- Postfix (SASL through Dovecot, delivery over LMTP) ---------------------------------


def smtp_starttls(postfix: PostfixServer, tls: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP(postfix.host, postfix.submission_port, timeout=10)
    client.ehlo()
    assert not client.has_extn("auth")  # only after STARTTLS
    client.starttls(context=tls)
    client.ehlo()
    return client


def sasl_after_334(client: smtplib.SMTP, mechanism: str, response: bytes) -> tuple[int, bytes]:
    """AUTH without an initial response: the token goes after the `334 ` (as Gmail needs)."""
    code, text = client.docmd("AUTH", mechanism)
    assert code == 334, text
    return client.docmd(b64(response))


@pytest.mark.postfix
def test_postfix_advertises_oauth_mechanisms_from_dovecot(
    postfix: PostfixServer, tls: ssl.SSLContext
) -> None:
    with smtp_starttls(postfix, tls) as client:
        assert client.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER"]
    with smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=tls, timeout=10) as client:
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"XOAUTH2", "OAUTHBEARER"}


@pytest.mark.postfix
def test_postfix_starttls_xoauth2_send_then_read_back_over_imap(
    postfix: PostfixServer, dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    sender, rcpt = new_user(), new_user()
    with smtp_starttls(postfix, tls) as client:
        code, text = sasl_after_334(client, "XOAUTH2", xoauth2(sender, idp.issue_token(sender)))
        assert code == 235, text
        client.send_message(message(sender, rcpt, "via postfix"))
    assert len(dovecot.wait_for_messages(rcpt, 1)) == 1, postfix.log_tail()
    imap = imaps(dovecot, tls)
    token = idp.issue_token(rcpt)
    assert imap.authenticate("XOAUTH2", lambda _: xoauth2(rcpt, token))[0] == "OK"
    imap.select("INBOX")
    typ, data = imap.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    assert b"via postfix" in fetched(data)
    imap.logout()


@pytest.mark.postfix
def test_postfix_implicit_tls_oauthbearer_send_then_read_back_over_pop3(
    postfix: PostfixServer, dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    sender, rcpt = new_user(), new_user("example.org")
    with smtplib.SMTP_SSL(postfix.host, postfix.smtps_port, context=tls, timeout=10) as client:
        client.ehlo()
        initial = b64(oauthbearer(sender, idp.issue_token(sender)))
        code, text = client.docmd("AUTH", f"OAUTHBEARER {initial}")
        assert code == 235, text
        client.send_message(message(sender, rcpt, "implicit tls"))
    assert len(dovecot.wait_for_messages(rcpt, 1)) == 1, postfix.log_tail()
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=tls, timeout=10)
    pop3_command(pop, "AUTH XOAUTH2 " + b64(xoauth2(rcpt, idp.issue_token(rcpt))))
    assert b"implicit tls" in b"\r\n".join(pop.retr(1)[1])
    pop.quit()


@pytest.mark.postfix
def test_postfix_smtplib_auth_xoauth2_helper(
    postfix: PostfixServer, dovecot: DovecotServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    """smtplib's own `auth()` (initial response inline) works too."""
    sender = new_user()
    token = idp.issue_token(sender)
    with smtp_starttls(postfix, tls) as client:
        code, _ = client.auth("XOAUTH2", lambda _=None: xoauth2(sender, token).decode())
        assert code == 235
        client.send_message(message(sender, sender, "to myself"))
    assert len(dovecot.wait_for_messages(sender, 1)) == 1


@pytest.mark.postfix
def test_postfix_bad_token_error_challenge_then_535(
    postfix: PostfixServer, tls: ssl.SSLContext
) -> None:
    with smtp_starttls(postfix, tls) as client:
        started = time.monotonic()
        code, challenge = sasl_after_334(client, "XOAUTH2", xoauth2(new_user(), "bad"))
        assert code == 334
        assert json.loads(base64.b64decode(challenge))["status"] == "401"
        code, text = client.docmd("")
        assert (code, text[:5]) == (535, b"5.7.8")
        code, challenge = sasl_after_334(client, "OAUTHBEARER", oauthbearer(new_user(), "bad"))
        assert json.loads(base64.b64decode(challenge))["status"] == "invalid_token"
        assert client.docmd("AQ==")[0] == 535
        assert time.monotonic() - started < 2 * FAST_FAILURE


@pytest.mark.postfix
def test_postfix_refuses_mail_without_authentication(
    postfix: PostfixServer, tls: ssl.SSLContext
) -> None:
    with smtp_starttls(postfix, tls) as client, pytest.raises(smtplib.SMTPRecipientsRefused):
        client.send_message(message(new_user(), new_user(), "no auth"))


# -- aiosmtpd submission server ---------------------------------------------------------

SubmissionFactory = Callable[..., LocalSubmissionServer]


def submission_client(server: LocalSubmissionServer, tls: ssl.SSLContext) -> smtplib.SMTP:
    if server.tls == "implicit":
        client: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", server.port, context=tls, timeout=10)
        client.ehlo()
        return client
    client = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
    client.ehlo()
    if server.tls == "starttls":
        client.starttls(context=tls)
        client.ehlo()
    return client


@pytest.fixture(params=["starttls", "implicit", "none"])
def any_submission(
    request: pytest.FixtureRequest, make_submission_server: SubmissionFactory
) -> Iterator[LocalSubmissionServer]:
    yield make_submission_server(request.param)


def test_submission_xoauth2_after_334_in_every_tls_mode(
    any_submission: LocalSubmissionServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    with submission_client(any_submission, tls) as client:
        assert client.esmtp_features["auth"].split() == ["OAUTHBEARER", "XOAUTH2"]
        code, _ = sasl_after_334(client, "XOAUTH2", xoauth2(user, idp.issue_token(user)))
        assert code == 235
        client.send_message(message(user, "rcpt@example.com", "aiosmtpd"))
    [received] = any_submission.messages
    assert (received.mail_from, received.rcpt_tos) == (user, ("rcpt@example.com",))
    assert received.username == user
    assert received.subject == "aiosmtpd"
    assert received.tls == (any_submission.tls != "none")
    [attempt] = any_submission.attempts
    assert (attempt.mechanism, attempt.outcome, attempt.initial_response) == (
        "XOAUTH2",
        "accepted",
        False,
    )
    assert any_submission.auth_attempts == 1


def test_submission_oauthbearer_initial_response(
    make_submission_server: SubmissionFactory, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    server = make_submission_server("implicit")
    user = new_user()
    with submission_client(server, tls) as client:
        code, _ = client.auth(
            "OAUTHBEARER", lambda _=None: oauthbearer(user, idp.issue_token(user)).decode()
        )
        assert code == 235
        client.sendmail(user, [user], b"Subject: x\r\n\r\ny\r\n")
    assert server.attempts[0].initial_response is True
    assert server.attempts[0].username == user


def test_submission_app_only_token_is_accepted(
    submission_server: LocalSubmissionServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    with submission_client(submission_server, tls) as client:
        code, _ = sasl_after_334(client, "XOAUTH2", xoauth2(new_user(), idp.issue_token(None)))
        assert code == 235


ERROR_FLOWS = {
    "XOAUTH2": (xoauth2, "401", ""),  # the client acknowledges with an empty line
    "OAUTHBEARER": (oauthbearer, "invalid_token", "AQ=="),  # RFC 7628: a lone ^A
}


@pytest.mark.parametrize("mechanism", list(ERROR_FLOWS))
def test_submission_rejected_token_error_challenge(
    submission_server: LocalSubmissionServer, tls: ssl.SSLContext, mechanism: str
) -> None:
    encode, status, ack = ERROR_FLOWS[mechanism]
    with submission_client(submission_server, tls) as client:
        code, challenge = sasl_after_334(client, mechanism, encode(new_user(), "bad"))
        assert code == 334
        assert json.loads(base64.b64decode(challenge))["status"] == status
        code, text = client.docmd(ack)
        assert (code, text[:5]) == (535, b"5.7.8")
    [attempt] = submission_server.attempts
    assert attempt.outcome == "rejected"
    assert attempt.error_response == base64.b64decode(ack)


def test_submission_scripted_token_rejection_and_temporary_failure(
    submission_server: LocalSubmissionServer, idp: LocalIdP, tls: ssl.SSLContext
) -> None:
    user = new_user()
    token = idp.issue_token(user)
    submission_server.reject_next_tokens(1)
    submission_server.fail_temporarily(1)
    with submission_client(submission_server, tls) as client:
        code, text = client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))
        assert (code, text[:5]) == (454, b"4.7.0")
        code, _ = client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))
        assert code == 334  # the valid token, refused once on purpose
        assert client.docmd("")[0] == 535
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))[0] == 235
    outcomes = [a.outcome for a in submission_server.attempts]
    assert outcomes == ["temporary", "rejected", "accepted"]
    submission_server.fail_temporarily()  # until recover()
    with submission_client(submission_server, tls) as client:
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))[0] == 454
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))[0] == 454
    submission_server.recover()
    with submission_client(submission_server, tls) as client:
        assert client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2(user, token)))[0] == 235


def test_submission_requires_auth_and_tls(
    submission_server: LocalSubmissionServer, tls: ssl.SSLContext
) -> None:
    with smtplib.SMTP("127.0.0.1", submission_server.port, timeout=10) as client:
        client.ehlo()
        assert client.docmd("AUTH", "XOAUTH2")[0] == 530  # STARTTLS first
        client.starttls(context=tls)
        client.ehlo()
        assert "PLAIN" not in client.esmtp_features["auth"]
        assert client.docmd("AUTH", "PLAIN")[0] == 504
        assert client.docmd("MAIL", "FROM:<a@example.test>")[0] == 530
        assert client.docmd("AUTH", "XOAUTH2 " + b64(b"garbage"))[0] == 501


def test_submission_scripted_replies_and_long_tokens(
    local_ca: LocalCA, tls: ssl.SSLContext
) -> None:
    long_token = "t" * 3000  # Microsoft's tokens run to kilobytes
    cert = local_ca.issue("submission-long")
    with LocalSubmissionServer(lambda t, u: t == long_token, tls="implicit", cert=cert) as server:
        server.script_reply("RCPT", "452 4.2.2 Mailbox full")
        with submission_client(server, tls) as client:
            code, _ = client.docmd("AUTH", "XOAUTH2 " + b64(xoauth2("a@example.test", long_token)))
            assert code == 235
            assert client.docmd("MAIL", "FROM:<a@example.test>")[0] == 250
            assert client.docmd("RCPT", "TO:<b@example.test>") == (452, b"4.2.2 Mailbox full")
            assert client.docmd("RCPT", "TO:<b@example.test>")[0] == 250
        assert server.attempts[0].token == long_token

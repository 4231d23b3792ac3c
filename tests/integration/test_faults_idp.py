"""Fault injection at the identity provider, through the proxy, with real clients.

The local IdP (`LocalIdP.set_failure`) answers every token request with a 500, never
answers, or refuses the grant. The client must get its protocol's temporary reply for
the first two (SMTP `454 4.7.0`, IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`) and an
authentication failure for the third (`535`, `NO [AUTHENTICATIONFAILED]`, `-ERR [AUTH]`),
nothing may be sent, and once the IdP is healthy again the same proxy logs in.

Refresh-token rotation: the IdP retires a refresh token when it is used and hands out a
new one (`single_use_refresh_tokens`, as Microsoft does), so every refresh after the
first only works if the proxy kept the newest token.
"""

from __future__ import annotations

import functools
import imaplib
import poplib
import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailwarden_proxy.config.model import MailProtocol, ProviderKind, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.tokens.base import PermanentTokenError
from mailwarden_proxy.tokens.factory import provider_for
from tests.fixtures.dovecot import DovecotServer
from tests.integration.proxyconf import (
    LOCAL_PASSWORD,
    app_account,
    config,
    listener,
    refresh_account,
)

pytestmark = pytest.mark.dovecot

USER = "idp-faults@example.com"
PROTOCOLS = [MailProtocol.SMTP, MailProtocol.IMAP, MailProtocol.POP3]
TOKEN_TIMEOUT = 0.5  # the proxy's token request timeout in these tests (15 s by default)
NEGATIVE_TTL = 0.2  # how long a failed token request is remembered (1.5 s by default)


class LoginRefused(Exception):
    """A login the proxy answered with an error; `reply` is what the client read."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def login(protocol: MailProtocol, port: int, *, send: bytes | None = None) -> None:
    """Log in (and, for SMTP, optionally send `send`); raise `LoginRefused` with the
    server's reply text on a refused login."""
    if protocol is MailProtocol.SMTP:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
            try:
                smtp.login(USER, LOCAL_PASSWORD)
            except smtplib.SMTPAuthenticationError as exc:
                text = exc.smtp_error
                text = text.decode() if isinstance(text, bytes) else text
                raise LoginRefused(f"{exc.smtp_code} {text}") from None
            if send is not None:
                assert smtp.sendmail(USER, ["rcpt@example.org"], send) == {}
    elif protocol is MailProtocol.IMAP:
        with imaplib.IMAP4("127.0.0.1", port, timeout=15) as imap:
            try:
                imap.login(USER, LOCAL_PASSWORD)
            except imaplib.IMAP4.error as exc:
                raise LoginRefused(f"NO {exc}") from None
            assert imap.select("INBOX")[0] == "OK"
            imap.logout()
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=15)
        try:
            pop.user(USER)
            try:
                pop.pass_(LOCAL_PASSWORD)
            except poplib.error_proto as exc:
                raise LoginRefused(str(exc.args[0].decode())) from None
            assert pop.stat()[0] >= 0
        finally:
            pop.quit()


def eventually(check: Callable[[], Any], timeout: float = 15) -> Any:
    """`check()`'s result once it stops raising; the proxy remembers a failed token
    request for a moment (`negative_ttl`), so recovery is polled, not assumed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (LoginRefused, OSError, smtplib.SMTPException, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def submission(make_submission_server: Any) -> LocalSubmissionServer:
    server: LocalSubmissionServer = make_submission_server("starttls")
    return server


def start_proxy(
    run_proxy: Any,
    protocol: MailProtocol,
    account: Any,
    dovecot: DovecotServer,
    submission: LocalSubmissionServer,
) -> Any:
    if protocol is MailProtocol.SMTP:
        host, port, tls = "127.0.0.1", submission.port, UpstreamTLS.STARTTLS
    elif protocol is MailProtocol.IMAP:
        host, port, tls = dovecot.host, dovecot.imaps_port, UpstreamTLS.IMPLICIT
    else:
        host, port, tls = dovecot.host, dovecot.pop3s_port, UpstreamTLS.IMPLICIT
    lst = listener("idp", protocol, port, tls, dovecot.ca_path, host=host)
    proxy = run_proxy(config([lst], [account]))
    # tests can't wait 15 s for a hung IdP: the same providers, with a short timeout,
    # and failures remembered for less time, so recovery is quick to observe
    assert proxy.app is not None
    proxy.app.tokens._factory = functools.partial(provider_for, timeout=TOKEN_TIMEOUT)
    proxy.app.tokens._negative_ttl = NEGATIVE_TTL
    return proxy


EXPECTED = {
    # (protocol, temporary?) -> a marker the reply must carry
    (MailProtocol.SMTP, True): "454 4.",
    (MailProtocol.SMTP, False): "535 5.",
    (MailProtocol.IMAP, True): "[UNAVAILABLE]",
    (MailProtocol.IMAP, False): "[AUTHENTICATIONFAILED]",
    (MailProtocol.POP3, True): "-ERR [SYS/TEMP]",
    (MailProtocol.POP3, False): "-ERR [AUTH]",
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("mode", ["500", "timeout", "invalid_grant"])
def test_identity_provider_failure_and_recovery(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission: LocalSubmissionServer,
    protocol: MailProtocol,
    mode: str,
) -> None:
    temporary = mode != "invalid_grant"
    proxy = start_proxy(run_proxy, protocol, app_account(idp, USER), dovecot, submission)
    port = proxy.port("idp")
    idp.set_failure(mode)
    with pytest.raises(LoginRefused) as refused:
        login(protocol, port, send=b"Subject: never\r\n\r\nnot sent\r\n")
    assert EXPECTED[(protocol, temporary)] in refused.value.reply, refused.value.reply
    assert idp.request_count("client_credentials") >= 1
    assert submission.messages == [] and submission.auth_attempts == 0
    failed = {"listener": "idp", "protocol": protocol.value, "result": "token_unavailable"}
    assert proxy.metric("mailwarden_logins_total", **failed) >= 1

    idp.set_failure(None)
    eventually(lambda: login(protocol, port, send=b"Subject: after\r\n\r\nrecovered\r\n"))
    if protocol is MailProtocol.SMTP:
        assert [m.subject for m in submission.wait_for_messages(1)] == ["after"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_single_failure_is_retried_by_the_next_login(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission: LocalSubmissionServer,
    protocol: MailProtocol,
) -> None:
    """One 500, then a healthy IdP: a temporary reply, and the client's own retry works
    (the failure is remembered only for a moment, never for the token's lifetime)."""
    proxy = start_proxy(run_proxy, protocol, app_account(idp, USER), dovecot, submission)
    idp.fail_next("500")
    with pytest.raises(LoginRefused) as refused:
        login(protocol, proxy.port("idp"))
    assert EXPECTED[(protocol, True)] in refused.value.reply
    eventually(lambda: login(protocol, proxy.port("idp")))
    assert idp.request_count("client_credentials") == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_outage_after_a_token_was_cached(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission: LocalSubmissionServer,
    protocol: MailProtocol,
) -> None:
    """An IdP outage doesn't matter while the cached token is good; once the upstream
    refuses that token, the forced refresh fails temporarily (not as a bad password)."""
    proxy = start_proxy(run_proxy, protocol, app_account(idp, USER), dovecot, submission)
    port = proxy.port("idp")
    login(protocol, port)
    idp.set_failure("500")
    login(protocol, port, send=b"Subject: cached\r\n\r\nstill fine\r\n")
    assert idp.request_count("client_credentials") == 1
    idp.revoke_all_access_tokens()
    with pytest.raises(LoginRefused) as refused:
        login(protocol, port, send=b"Subject: never\r\n\r\nnot sent\r\n")
    assert EXPECTED[(protocol, True)] in refused.value.reply, refused.value.reply
    idp.set_failure(None)
    eventually(lambda: login(protocol, port, send=b"Subject: back\r\n\r\nok\r\n"))
    if protocol is MailProtocol.SMTP:
        subjects = [m.subject for m in submission.wait_for_messages(2)]
        assert subjects == ["cached", "back"]


@pytest.mark.parametrize(
    "provider", [ProviderKind.MICROSOFT, ProviderKind.GOOGLE, ProviderKind.GENERIC]
)
@pytest.mark.parametrize("protocol", [MailProtocol.SMTP, MailProtocol.IMAP])
def test_rotated_refresh_token_is_used(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    submission: LocalSubmissionServer,
    protocol: MailProtocol,
    provider: ProviderKind,
) -> None:
    """Each refresh retires the refresh token it used: the second and third refreshes
    only succeed with the token the previous answer carried."""
    assert idp.single_use_refresh_tokens
    account = refresh_account(idp, USER, provider=provider)
    proxy = start_proxy(run_proxy, protocol, account, dovecot, submission)
    port = proxy.port("idp")
    for round_ in range(1, 4):
        login(protocol, port, send=b"Subject: round %d\r\n\r\nhi\r\n" % round_)
        assert idp.request_count("refresh_token") == round_
        # the cached access token dies: the next login makes the proxy refresh again
        idp.revoke_all_access_tokens()
    if protocol is MailProtocol.SMTP:
        subjects = [m.subject for m in submission.wait_for_messages(3)]
        assert subjects == ["round 1", "round 2", "round 3"]
    # the initial refresh token was retired by the IdP: the proxy never reused it
    oauth2 = account.oauth2
    assert oauth2.refresh_token is not None
    reused = idp.request_count("refresh_token")
    with pytest.raises(PermanentTokenError) as refused:
        provider_for(account, timeout=TOKEN_TIMEOUT).fetch(USER)
    assert refused.value.code == "invalid_grant"
    assert idp.request_count("refresh_token") == reused + 1

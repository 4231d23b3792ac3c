"""The leak scan (tests/fixtures/secrets_scan.py): that it sees what it claims to see, and
the failure scenarios where a secret is most likely to slip into a log line, an exception
text or a metric label — each scanned on its own.

Every credential here carries the IdP's marker: the local password, the client secret, the
access and refresh tokens the IdP mints, and the wrong passwords typed by the "user".
"""

from __future__ import annotations

import base64
import imaplib
import logging
import smtplib
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from mailwarden_proxy.config.model import Flow, MailProtocol, ProviderKind, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.idp_grants import SECRET_MARKER
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError
from mailwarden_proxy.tokens.factory import provider_for
from tests.fixtures import secrets_scan
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.idp import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_TENANT
from tests.integration.proxyconf import (
    LOCAL_PASSWORD,
    app_account,
    config,
    listener,
    refresh_account,
)

USER = "app@example.com"
WRONG_PASSWORD = f"{SECRET_MARKER}-typo-in-the-app-config"

pytestmark = pytest.mark.skipif(
    not secrets_scan.enabled(), reason="MAILWARDEN_SECRETS_SCAN=0 switched the scan off"
)


@pytest.fixture
def scan() -> Iterator[int]:
    """The collector's position before the test; the test must leave no hit after it."""
    since = secrets_scan.mark()
    yield since
    secrets_scan.assert_no_hits(since)


def _smtp_proxy(run_proxy: Any, idp: LocalIdP, server: LocalSubmissionServer, **kw: Any) -> Any:
    lst = listener("SMTP-scan", MailProtocol.SMTP, server.port, UpstreamTLS.STARTTLS, idp.ca_path)
    account = kw.pop("account", None) or app_account(idp, USER)
    return run_proxy(config([lst], [account]))


def _send(port: int, password: str = LOCAL_PASSWORD) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(USER, password)
        client.sendmail(USER, ["rcpt@example.com"], b"Subject: scan\r\n\r\nbody\r\n")


# ----------------------------------------------------------------- the scan itself


def test_the_scan_sees_the_marker_in_logs_exceptions_and_base64() -> None:
    since = secrets_scan.mark()
    log = logging.getLogger("mailwarden_proxy.scan_selftest")
    token = f"{SECRET_MARKER}selftest"
    try:
        log.debug("plain %s", token)
        try:
            raise RuntimeError(f"carrying {token}")
        except RuntimeError:
            log.exception("an exception")
        sasl = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        log.info("sasl line %s", sasl)
        log.info("extra field", extra={"credential": token})
        # a value the product generated (harvested from the apiserver's Secrets at the end)
        secrets_scan.COLLECTOR.add_secret("harvested-selftest-9d2f", "a harvested selftest")
        log.warning("generated password: %s", "harvested-selftest-9d2f")
        found = secrets_scan.hits(since)
        kinds = sorted(h.what for h in found)
        assert kinds == [
            "a harvested selftest",
            "the marker",
            "the marker",
            "the marker",
            "the marker, base64-encoded",
        ], found
        assert "harvested-selftest-9d2f" not in str(found)
        for hit in found:
            assert token not in str(hit)  # reported, never printed
            assert "during tests/integration/test_secrets_scan.py::" in hit.where
    finally:
        secrets_scan.COLLECTOR.forget(since)
    assert secrets_scan.hits(since) == []


def test_the_scan_sees_product_subprocess_output(tmp_path: Any) -> None:
    since = secrets_scan.mark()
    missing = tmp_path / f"{SECRET_MARKER}-not-a-config.yaml"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mailwarden_proxy.cli", "--config", str(missing), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode != 0
        assert missing.name in proc.stderr  # the test still gets the output
        found = secrets_scan.hits(since)
        assert found and all(h.where.startswith("stderr of `") for h in found), found
    finally:
        secrets_scan.COLLECTOR.forget(since)


# ----------------------------------------------------------------- failure scenarios


def test_wrong_local_password(
    scan: int, run_proxy: Any, idp: LocalIdP, submission_server: LocalSubmissionServer
) -> None:
    proxy = _smtp_proxy(run_proxy, idp, submission_server)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        _send(proxy.port("SMTP-scan"), WRONG_PASSWORD)
    labels = {"listener": "SMTP-scan", "protocol": "smtp"}
    assert proxy.metric("mailwarden_logins_total", **labels, result="local_credentials") >= 1
    _send(proxy.port("SMTP-scan"))
    assert len(submission_server.messages) == 1


@pytest.mark.dovecot
def test_wrong_local_password_imap(
    scan: int, run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    lst = listener(
        "IMAP-scan",
        MailProtocol.IMAP,
        dovecot.imaps_port,
        UpstreamTLS.IMPLICIT,
        dovecot.ca_path,
        host=dovecot.host,
    )
    proxy = run_proxy(config([lst], [app_account(idp, USER)]))
    client = imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-scan"), timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        client.login(USER, WRONG_PASSWORD)
    client.logout()
    # and the upstream refusing a token the IdP has revoked: one retry with a fresh one
    client = imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-scan"), timeout=10)
    client.login(USER, LOCAL_PASSWORD)
    client.logout()
    idp.revoke_all_access_tokens()
    client = imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-scan"), timeout=10)
    client.login(USER, LOCAL_PASSWORD)
    client.select("INBOX")
    client.logout()


def test_idp_refuses_the_client_secret(
    scan: int, run_proxy: Any, idp: LocalIdP, submission_server: LocalSubmissionServer
) -> None:
    proxy = _smtp_proxy(run_proxy, idp, submission_server)
    idp.set_failure("invalid_client")  # the request carried the (marked) client secret
    with pytest.raises(smtplib.SMTPException):
        _send(proxy.port("SMTP-scan"))
    assert idp.request_count() >= 1
    assert submission_server.auth_attempts == 0


@pytest.mark.parametrize("mode", ["invalid_client", "invalid_grant", "500"])
def test_token_errors_as_exceptions(scan: int, idp: LocalIdP, mode: str) -> None:
    """The errors the providers raise (their text reaches logs, Conditions and the
    `mailwarden test` output) carry no secret, nor do their tracebacks."""
    account = replace(
        app_account(idp, USER),
        oauth2=replace(
            app_account(idp, USER).oauth2,
            client_id=TEST_CLIENT_ID,
            client_secret=Secret(TEST_CLIENT_SECRET),
            token_url=idp.token_url(TEST_TENANT),
            tenant_id=TEST_TENANT,
        ),
    )
    idp.set_failure(mode)
    with pytest.raises(Exception) as info:
        provider_for(account).fetch(USER)
    secrets_scan.record(f"{mode} token error", "".join(traceback.format_exception(info.value)))
    secrets_scan.record(f"{mode} token error repr", repr(info.value))
    if mode == "invalid_client":
        assert isinstance(info.value, PermanentTokenError)


ECHOES = {
    # an IdP (or a gateway in front of it) that quotes the request in its error
    "form": "AADSTS7000215: Invalid client secret provided. Request: "
    "grant_type=client_credentials&client_secret={secret}&scope=x",
    "json": 'AADSTS7000215: bad request {{"client_id": "c", "client_secret": "{secret}"}}',
    "bare": "AADSTS7000215: The secret {secret} is not valid for this application.",
}


@pytest.mark.parametrize("provider", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
@pytest.mark.parametrize("echo", sorted(ECHOES))
def test_idp_error_that_echoes_the_secret(
    scan: int,
    run_proxy: Any,
    idp: LocalIdP,
    submission_server: LocalSubmissionServer,
    monkeypatch: pytest.MonkeyPatch,
    echo: str,
    provider: ProviderKind,
) -> None:
    """Field values are scrubbed by name; a bare echo only the provider can recognise
    (it knows what it sent): `tokens.errors.without_credentials`."""
    account = app_account(idp, USER, provider=provider)
    secret = account.oauth2.client_secret
    assert secret is not None and SECRET_MARKER in secret.reveal()
    body = {
        "error": "invalid_client",
        "error_description": ECHOES[echo].format(secret=secret.reveal()),
        "error_codes": [7000215],
    }
    route = idp._route

    def echoing(method: str, path: str, form: dict[str, str], auth: str | None) -> Any:
        if method == "POST" and path.endswith("/token"):
            return 401, body
        return route(method, path, form, auth)  # discovery and the rest as usual

    monkeypatch.setattr(idp, "_route", echoing)
    proxy = _smtp_proxy(run_proxy, idp, submission_server, account=account)
    with pytest.raises(smtplib.SMTPException):
        _send(proxy.port("SMTP-scan"))
    assert proxy.metric("mailwarden_token_requests_total", account=USER, result="invalid_client")
    with pytest.raises(PermanentTokenError) as info:
        provider_for(account).fetch(USER)
    assert "AADSTS7000215" in str(info.value)
    secrets_scan.record("token error text", "".join(traceback.format_exception(info.value)))


def test_upstream_rejects_the_token(
    scan: int, run_proxy: Any, idp: LocalIdP, submission_server: LocalSubmissionServer
) -> None:
    proxy = _smtp_proxy(run_proxy, idp, submission_server)
    submission_server.reject_next_tokens(1)  # the retry with a fresh token succeeds
    _send(proxy.port("SMTP-scan"))
    submission_server.reject_next_tokens(100)  # now every token is refused
    with pytest.raises(smtplib.SMTPAuthenticationError):
        _send(proxy.port("SMTP-scan"))
    assert len(submission_server.messages) == 1
    assert submission_server.auth_attempts >= 3


def test_token_refresh_and_rotation(
    scan: int, run_proxy: Any, idp: LocalIdP, submission_server: LocalSubmissionServer
) -> None:
    idp.token_lifetime = 3  # the proxy refreshes ahead of expiry, rotating refresh tokens
    account = refresh_account(idp, USER)
    assert account.oauth2.flow is Flow.REFRESH_TOKEN
    proxy = _smtp_proxy(run_proxy, idp, submission_server, account=account)
    _send(proxy.port("SMTP-scan"))
    deadline = time.monotonic() + 20
    while idp.request_count("refresh_token") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert idp.request_count("refresh_token") >= 3
    _send(proxy.port("SMTP-scan"))
    # the IdP then refuses the (rotated) refresh token
    idp.set_failure("invalid_grant")
    idp.revoke_all_access_tokens()
    time.sleep(3.5)
    with pytest.raises(smtplib.SMTPException):
        _send(proxy.port("SMTP-scan"))
    assert len(submission_server.messages) == 2

"""Catalogue entries triggered for real: the local identity provider answering with Entra
ID's and Google's error bodies, the aiosmtpd submission server answering Microsoft's and
Gmail's refusals, an IMAP server throttling as Exchange Online does, Dovecot refusing a
token, and the operator. Each time the client gets the right reply, the proxy logs one
line with the reason, the hint and the provider's code (and no secret), the failure is
counted by reason, and for a MailAccount the condition and an Event carry the fix."""

from __future__ import annotations

import dataclasses
import imaplib
import json
import logging
import smtplib
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailwarden_proxy.catalogue import by_reason
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    MailProtocol,
    OAuth2,
    ProviderKind,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.logsetup import JsonFormatter
from mailwarden_proxy.secret import Secret
from tests.integration.proxyconf import (
    LOCAL_PASSWORD,
    app_account,
    config,
    listener,
    refresh_account,
)
from tests.integration.test_tokens_idp import service_account_key

pytestmark = pytest.mark.filterwarnings("ignore:This API has been deprecated:DeprecationWarning")

SMTP = "SMTP-cat"
IMAP = "IMAP-cat"


@pytest.fixture
def smtpd(idp: LocalIdP, local_ca: LocalCA) -> Iterator[LocalSubmissionServer]:
    with LocalSubmissionServer(idp.is_valid, tls="implicit", cert=local_ca.issue("smtpd")) as s:
        yield s


Failures = Callable[[int], list[logging.LogRecord]]


@pytest.fixture
def failures(caplog: pytest.LogCaptureFixture) -> Failures:
    """`failures(n)`: the login-failure lines so far, once there are `n` of them (the
    client may read its reply before the proxy's thread has logged)."""
    caplog.set_level(logging.INFO, logger="mailwarden.session")

    def found(count: int) -> list[logging.LogRecord]:
        deadline = time.monotonic() + 10
        while True:
            lines = [r for r in caplog.records if getattr(r, "event", None) == "login_failed"]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.01)

    return found


def _check_line(
    record: logging.LogRecord,
    reason: str,
    *,
    account: str,
    listener_name: str,
    code: str,
    secrets: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The record as the JSON log line shows it, checked field by field."""
    line = JsonFormatter().format(record)
    fields: dict[str, Any] = json.loads(line)
    assert fields["reason"] == reason
    assert fields["hint"] == by_reason(reason).fix
    assert fields["account"] == account and fields["listener"] == listener_name
    assert code in fields["provider_code"], fields["provider_code"]
    assert by_reason(reason).fix in fields["message"]
    for secret in filter(None, (LOCAL_PASSWORD, *secrets)):
        assert secret not in line
    assert "Bearer" not in line
    return fields


def _smtp_login(
    proxy: Any, user: str, password: str = LOCAL_PASSWORD
) -> smtplib.SMTPAuthenticationError:
    """One AUTH PLAIN (`login()` would try LOGIN after a refused PLAIN: two failures)."""
    with smtplib.SMTP("127.0.0.1", proxy.port(SMTP), timeout=30) as client:
        client.ehlo()
        client.user, client.password = user, password
        with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
            client.auth("PLAIN", client.auth_plain)
        return caught.value


def _failures_metric(proxy: Any, listener_name: str, reason: str) -> float:
    return float(
        proxy.metric("mailwarden_login_failures_total", listener=listener_name, reason=reason)
    )


def _client_secret(account: Account) -> str:
    secret = account.oauth2.client_secret
    return secret.reveal() if secret else ""


# -- the identity provider ----------------------------------------------------------------


def test_identity_provider_errors(
    run_proxy: Any,
    idp: LocalIdP,
    smtpd: LocalSubmissionServer,
    local_ca: LocalCA,
    tmp_path: Path,
    failures: Failures,
) -> None:
    cases = [  # (failure mode, reason, provider code)
        ("aadsts:7000215", "InvalidClientSecret", "AADSTS7000215"),
        ("aadsts:700016", "ApplicationNotFound", "AADSTS700016"),
        ("aadsts:65001", "ConsentMissing", "AADSTS65001"),
        ("aadsts:53003", "BlockedByConditionalAccess", "AADSTS53003"),
        ("aadsts:70043", "RefreshTokenExpired", "AADSTS70043"),
        ("503", "IdentityProviderUnavailable", "server_error"),
        ("google:unauthorized_client", "GoogleDelegationMissing", "unauthorized_client"),
    ]
    accounts = [app_account(idp, f"idp{i}@example.com") for i in range(len(cases) - 2)]
    accounts.append(refresh_account(idp, "idp-refresh@example.com"))
    key = service_account_key(idp, tmp_path, "mailer@project.iam.gserviceaccount.com")
    google = OAuth2(
        ProviderKind.GOOGLE,
        Flow.SERVICE_ACCOUNT,
        token_url=idp.token_url("google"),
        scopes=("https://mail.google.com/",),
        service_account_key=key,
        ca_file=str(idp.ca_path),
    )
    accounts.append(Account("dwd@example.org", google, local_password=Secret(LOCAL_PASSWORD)))
    # the refresh-token account for the AADSTS70043 case, in its place
    accounts[4], accounts[5] = accounts[5], accounts[4]
    lst = listener(SMTP, MailProtocol.SMTP, smtpd.port, UpstreamTLS.IMPLICIT, local_ca.ca_path)
    proxy = run_proxy(config([lst], accounts))
    secrets = (*(_client_secret(a) for a in accounts), key.reveal()[-60:])
    for i, ((mode, reason, code), account) in enumerate(zip(cases, accounts, strict=True)):
        idp.fail_next(mode)
        error = _smtp_login(proxy, account.username)
        temporary = by_reason(reason).temporary
        assert error.smtp_code == (454 if temporary else 535), (mode, error)
        record = failures(i + 1)[-1]
        _check_line(
            record,
            reason,
            account=account.username,
            listener_name=SMTP,
            code=code,
            secrets=secrets,
        )
        assert record.levelno == (logging.INFO if temporary else logging.WARNING)
        assert _failures_metric(proxy, SMTP, reason) == 1
    assert len(failures(len(cases))) == len(cases)  # one line per failed login
    assert smtpd.auth_attempts == 0  # no token, so nothing reached the mail server


# -- the submission server -----------------------------------------------------------------


def test_submission_server_refusals(
    run_proxy: Any,
    idp: LocalIdP,
    smtpd: LocalSubmissionServer,
    local_ca: LocalCA,
    failures: Failures,
) -> None:
    user = "sender@example.com"
    account = app_account(idp, user)
    lst = listener(SMTP, MailProtocol.SMTP, smtpd.port, UpstreamTLS.IMPLICIT, local_ca.ca_path)
    proxy = run_proxy(config([lst], [account]))
    cases = [  # (scripted reply, client's reply code, reason, provider code)
        (
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
            "the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
            535,
            "SmtpAuthDisabled",
            "535 5.7.139",
        ),
        (
            "430 4.2.0 STOREDRV; mailbox logon failure; Cannot open mailbox",
            454,
            "MailboxNotGrantedToApp",
            "430 4.2.0",
        ),
        ("555 5.5.2 Syntax error, command line too long", 535, "SmtpLineTooLong", "555 5.5.2"),
        ("535 5.7.3 Authentication unsuccessful", 535, "SmtpAuthUnsuccessful", "535 5.7.3"),
    ]
    for i, (reply, client_code, reason, code) in enumerate(cases):
        smtpd.script_reply("AUTH", reply)
        error = _smtp_login(proxy, user)
        assert error.smtp_code == client_code, (reply, error)
        if client_code == 454:  # a temporary refusal passes the server's words on
            assert b"STOREDRV" in error.smtp_error
        _check_line(
            failures(i + 1)[-1],
            reason,
            account=user,
            listener_name=SMTP,
            code=code,
            secrets=(_client_secret(account),),
        )
        assert _failures_metric(proxy, SMTP, reason) == 1
    # the error challenge (twice: the proxy retries once with a fresh token); its decoded
    # JSON reaches the diagnosis
    smtpd.reject_next_tokens(2)
    error = _smtp_login(proxy, user)
    assert error.smtp_code == 535
    fields = _check_line(
        failures(len(cases) + 1)[-1],
        "TokenRejected",
        account=user,
        listener_name=SMTP,
        code="535 5.7.8 (challenge status 401)",
    )
    assert '"status":"401"' in fields["message"]
    assert len(failures(len(cases) + 1)) == len(cases) + 1
    # a wrong local password is diagnosed too, and never reaches the server
    attempts = smtpd.auth_attempts
    _smtp_login(proxy, user, "not-the-password")
    assert failures(len(cases) + 2)[-1].reason == "LocalPasswordRejected"  # type: ignore[attr-defined]
    assert smtpd.auth_attempts == attempts


# -- IMAP throttling -----------------------------------------------------------------------


class _ThrottlingImap(socketserver.ThreadingTCPServer):
    """An IMAP server that refuses the next `throttle` logins as Exchange Online does
    when throttling ("BAD Request is throttled. Suggested Backoff Time: N milliseconds")
    and accepts any other."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, backoff_ms: int) -> None:
        super().__init__(("127.0.0.1", 0), _ImapHandler)
        self.backoff_ms = backoff_ms
        self.throttle = 0
        self.authenticates = 0
        self.lock = threading.Lock()


class _ImapHandler(socketserver.StreamRequestHandler):
    server: _ThrottlingImap

    def handle(self) -> None:
        caps = "IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER"
        self.wfile.write(f"* OK [CAPABILITY {caps}] Exchange-like ready\r\n".encode())
        for raw in self.rfile:
            tag, _, rest = raw.decode().strip().partition(" ")
            command = rest.split(" ", 1)[0].upper()
            if command == "AUTHENTICATE":
                with self.server.lock:
                    self.server.authenticates += 1
                    throttled = self.server.throttle > 0
                    self.server.throttle -= throttled
                if throttled:
                    ms = self.server.backoff_ms
                    reply = (
                        f"{tag} BAD Request is throttled. Suggested Backoff Time: {ms} milliseconds"
                    )
                else:
                    reply = f"{tag} OK AUTHENTICATE completed."
            elif command == "LOGOUT":
                reply = f"* BYE bye\r\n{tag} OK LOGOUT completed."
            else:
                reply = f"{tag} OK {command} completed."
            self.wfile.write(reply.encode() + b"\r\n")
            if command == "LOGOUT":
                return


def test_imap_throttling_is_honoured(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    failures: Failures,
) -> None:
    server = _ThrottlingImap(backoff_ms=1500)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    try:
        user = "busy@example.com"
        lst = listener(
            IMAP, MailProtocol.IMAP, server.server_address[1], UpstreamTLS.NONE, local_ca.ca_path
        )
        plain = Upstream(
            "127.0.0.1", server.server_address[1], UpstreamTLS.NONE, allow_insecure=True
        )
        proxy = run_proxy(
            config([dataclasses.replace(lst, upstream=plain)], [app_account(idp, user)])
        )
        port = proxy.port(IMAP)
        server.throttle = 1
        with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                client.login(user, LOCAL_PASSWORD)
            _check_line(
                failures(1)[-1],
                "Throttled",
                account=user,
                listener_name=IMAP,
                code="Request is throttled. Suggested Backoff Time: 1500 milliseconds",
            )
            held_at = time.monotonic()  # the backoff was recorded before that line
            assert server.authenticates == 1
            # within the backoff: refused by the proxy itself, the server is left alone
            with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                client.login(user, LOCAL_PASSWORD)
            assert server.authenticates == 1
            assert "backing off" in failures(2)[-1].provider_code  # type: ignore[attr-defined]
            assert _failures_metric(proxy, IMAP, "Throttled") == 2
            # after it, the login goes through
            time.sleep(max(0.0, 1.55 - (time.monotonic() - held_at)))
            assert client.login(user, LOCAL_PASSWORD)[0] == "OK"
        assert server.authenticates == 2
    finally:
        server.shutdown()
        server.server_close()


# -- Dovecot ------------------------------------------------------------------------------


@pytest.mark.dovecot
def test_dovecot_refuses_a_token_for_another_user(
    run_proxy: Any, idp: LocalIdP, dovecot: Any, failures: Failures
) -> None:
    user = "reader@example.com"
    # a delegated refresh token of another user: Dovecot's introspection says no
    account = refresh_account(idp, "someone-else@example.com")
    account = dataclasses.replace(account, username=user)
    lst = listener(
        IMAP,
        MailProtocol.IMAP,
        dovecot.imaps_port,
        UpstreamTLS.IMPLICIT,
        dovecot.ca_path,
        host=dovecot.host,
    )
    proxy = run_proxy(config([lst], [account]))
    with (
        imaplib.IMAP4("127.0.0.1", proxy.port(IMAP), timeout=10) as client,
        pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"),
    ):
        client.login(user, LOCAL_PASSWORD)
    fields = _check_line(
        failures(1)[-1],
        "TokenRejected",
        account=user,
        listener_name=IMAP,
        code="(challenge status 401)",
        secrets=(_client_secret(account),),
    )
    assert fields["provider_code"].startswith("NO [AUTHENTICATIONFAILED]")
    assert _failures_metric(proxy, IMAP, "TokenRejected") == 1


# -- the operator --------------------------------------------------------------------------


@pytest.fixture
def operator(mailaccount_crd: Any, kube_namespace: str, idp: LocalIdP) -> Iterator[Any]:
    from tests.fixtures.operator import OperatorRunner

    runner = OperatorRunner(mailaccount_crd, kube_namespace)
    runner.env["MAILWARDEN_TOKEN_CA_FILE"] = str(idp.ca_path)
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
        runner.http.close()


@pytest.mark.kube
def test_operator_condition_and_event_carry_reason_and_fix(operator: Any, idp: LocalIdP) -> None:
    from tests.fixtures.idp import TEST_CLIENT_SECRET
    from tests.integration.test_operator_consent import (
        condition,
        mailaccount,
        secret,
        wait_for,
    )

    idp.set_failure("aadsts:700016")  # every token request: the app is not in the tenant
    operator.apply(
        secret("app", **{"client-secret": TEST_CLIENT_SECRET}),
        mailaccount(idp, "app", "clientCredentials", clientSecretRef={"name": "app"}),
    )
    ma = operator.wait_for_condition("app", "Authorized", "False", reason="UnauthorizedClient")
    entry = by_reason("ApplicationNotFound")
    for kind in ("Authorized", "Ready"):
        message = condition(ma, kind)["message"]
        assert message.startswith(f"ApplicationNotFound: {entry.cause} Fix: {entry.fix}")
        assert "AADSTS700016" in message and "unauthorized_client" in message
    events = wait_for(
        "the Warning Event with the fix",
        lambda: [
            e
            for e in operator.events("app")
            if e["reason"] == "UnauthorizedClient" and "ApplicationNotFound" in e["message"]
        ],
    )
    assert events[0]["type"] == "Warning" and entry.fix in events[0]["message"]
    assert TEST_CLIENT_SECRET not in repr(operator.mailaccount("app")) + repr(events)

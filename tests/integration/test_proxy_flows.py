"""Every OAuth 2.0 flow end to end: an application's plain SMTP login through the proxy,
a token from the local identity provider, XOAUTH2 at a real submission server."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from mailwarden_proxy.config.model import (
    Account,
    Flow,
    MailProtocol,
    OAuth2,
    ProviderKind,
    UpstreamTLS,
)
from mailwarden_proxy.demo.idp import LocalIdP, rsa_credentials
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.secret import Secret
from tests.fixtures.idp import (
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_PUBLIC_CLIENT_ID,
    TEST_TENANT,
)
from tests.integration.proxyconf import LOCAL_PASSWORD, config, listener
from tests.integration.test_tokens_idp import service_account_key

pytestmark = pytest.mark.filterwarnings("ignore:This API has been deprecated:DeprecationWarning")

USER = "flow@example.org"
DELEGATED = ("https://outlook.office365.com/SMTP.Send", "offline_access")


@pytest.fixture
def smtpd(idp: LocalIdP, local_ca: LocalCA) -> Iterator[Any]:
    with LocalSubmissionServer(idp.is_valid, tls="implicit", cert=local_ca.issue("smtpd")) as s:
        yield s


def _account(idp: LocalIdP, provider: ProviderKind, flow: Flow, **oauth2: Any) -> Account:
    oauth2.setdefault("client_id", TEST_CLIENT_ID)
    if oauth2["client_id"] == TEST_CLIENT_ID:
        oauth2.setdefault("client_secret", Secret(TEST_CLIENT_SECRET))
    oauth2.setdefault("scopes", DELEGATED)
    oauth2.setdefault("token_url", idp.token_url(TEST_TENANT))
    return Account(
        oauth2.pop("username", USER),
        OAuth2(provider, flow, ca_file=str(idp.ca_path), **oauth2),
        local_password=Secret(LOCAL_PASSWORD),
    )


def _send(proxy: Any, user: str = USER) -> int:
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-flow"), timeout=30) as client:
        client.login(user, LOCAL_PASSWORD)
        client.sendmail(user, ["rcpt@example.org"], f"Subject: {user}\r\n\r\nhi\r\n")
    return 0


def _proxy(run_proxy: Any, smtpd: Any, local_ca: LocalCA, account: Account, **kw: Any) -> Any:
    lst = listener("SMTP-flow", MailProtocol.SMTP, smtpd.port, UpstreamTLS.IMPLICIT,
                   local_ca.ca_path)  # fmt: skip
    return run_proxy(config([lst], [account], **kw))


@pytest.mark.parametrize("provider", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_refresh_token_flow(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, provider: ProviderKind
) -> None:
    refresh = Secret(idp.issue_refresh_token(USER, TEST_CLIENT_ID))
    account = _account(idp, provider, Flow.REFRESH_TOKEN, refresh_token=refresh)
    _send(_proxy(run_proxy, smtpd, local_ca, account))
    assert len(smtpd.messages) == 1


def test_client_credentials_with_a_certificate(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, tmp_path: Path
) -> None:
    creds = rsa_credentials(tmp_path, "app-cert")
    idp.register_client("cert-app", certificate_pem=creds.cert_path.read_bytes())
    account = _account(
        idp,
        ProviderKind.MICROSOFT,
        Flow.CLIENT_CREDENTIALS,
        client_id="cert-app",
        scopes=("https://outlook.office365.com/.default",),
        client_certificate_path=str(creds.cert_path),
        client_key_path=str(creds.key_path),
    )
    _send(_proxy(run_proxy, smtpd, local_ca, account))
    assert len(smtpd.messages) == 1


@pytest.mark.parametrize("provider", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_password_flow(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, provider: ProviderKind
) -> None:
    idp.register_user(USER, "mailbox-password")
    account = _account(idp, provider, Flow.PASSWORD, client_id=TEST_PUBLIC_CLIENT_ID,
                       password=Secret("mailbox-password"))  # fmt: skip
    _send(_proxy(run_proxy, smtpd, local_ca, account))
    assert len(smtpd.messages) == 1


def test_google_service_account_catch_all_impersonates_each_mailbox(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, tmp_path: Path
) -> None:
    key = service_account_key(idp, tmp_path, "relay@project.iam.gserviceaccount.com")
    account = _account(
        idp,
        ProviderKind.GOOGLE,
        Flow.SERVICE_ACCOUNT,
        username="@example.org",
        client_id="",
        scopes=("https://mail.google.com/",),
        service_account_key=key,
    )
    proxy = _proxy(run_proxy, smtpd, local_ca, account, catch_all=True)
    _send(proxy, "one@example.org")
    _send(proxy, "two@example.org")
    assert [m.subject for m in smtpd.messages] == ["one@example.org", "two@example.org"]
    assert idp.request_count("urn:ietf:params:oauth:grant-type:jwt-bearer") == 2


def test_device_code_flow_waits_for_a_person(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    account = _account(
        idp, ProviderKind.MICROSOFT, Flow.DEVICE_CODE, client_id=TEST_PUBLIC_CLIENT_ID
    )
    proxy = _proxy(run_proxy, smtpd, local_ca, account)
    earlier = set(idp.pending_user_codes())  # the IdP is shared by the whole session
    # until someone signs in, logins fail temporarily (454), so the app retries later
    with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
        _send(proxy)
    assert excinfo.value.smtp_code == 454
    codes = [code for code in idp.pending_user_codes() if code not in earlier]
    assert len(codes) == 1
    idp.approve_device(codes[0], USER)
    deadline = time.monotonic() + 15
    while True:
        try:
            _send(proxy)
            break
        except smtplib.SMTPAuthenticationError as exc:
            assert exc.smtp_code == 454
            assert time.monotonic() < deadline, "device sign-in never completed"
            time.sleep(0.3)
    assert len(smtpd.messages) == 1


def test_upstream_username_override(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    refresh = Secret(idp.issue_refresh_token("shared@example.org", TEST_CLIENT_ID))
    account = replace(
        _account(idp, ProviderKind.GENERIC, Flow.REFRESH_TOKEN, refresh_token=refresh),
        upstream_username="shared@example.org",
    )
    _send(_proxy(run_proxy, smtpd, local_ca, account))
    assert smtpd.attempts[-1].username == "shared@example.org"

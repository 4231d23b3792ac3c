"""Token providers (msal, google-auth, generic) against a real LocalIdP over HTTPS."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.demo.idp import LocalIdP, rsa_credentials
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError, TemporaryTokenError, TokenProvider
from mailwarden_proxy.tokens.cache import TokenBroker
from mailwarden_proxy.tokens.factory import provider_for
from mailwarden_proxy.tokens.msal_provider import MsalProvider
from tests.fixtures.idp import (
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_PUBLIC_CLIENT_ID,
    TEST_TENANT,
)

# msal warns on every ROPC call by a public client; the password tests use one on purpose
pytestmark = pytest.mark.filterwarnings("ignore:This API has been deprecated:DeprecationWarning")

USER = "alice@example.org"
MS_SCOPES = ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access")
APP_SCOPES = ("https://outlook.office365.com/.default",)


def make_account(idp: LocalIdP, provider: ProviderKind, flow: Flow, **oauth2: Any) -> Account:
    oauth2.setdefault("client_id", TEST_CLIENT_ID)
    oauth2.setdefault("scopes", APP_SCOPES if flow is Flow.CLIENT_CREDENTIALS else MS_SCOPES)
    oauth2.setdefault("token_url", idp.token_url(TEST_TENANT))
    return Account(USER, OAuth2(provider, flow, ca_file=str(idp.ca_path), **oauth2))


def secret_account(idp: LocalIdP, provider: ProviderKind = ProviderKind.MICROSOFT) -> Account:
    return make_account(
        idp, provider, Flow.CLIENT_CREDENTIALS, client_secret=Secret(TEST_CLIENT_SECRET)
    )


def fetch_value(provider: TokenProvider, username: str = USER) -> str:
    return provider.fetch(username).value.reveal()


@pytest.mark.parametrize("kind", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_client_credentials_with_secret(idp: LocalIdP, kind: ProviderKind) -> None:
    provider = provider_for(secret_account(idp, kind))
    first = provider.fetch(USER)
    assert idp.is_valid(first.value.reveal(), "anyone@example.org")  # app-only token
    assert 3500 < first.expires_at - time.time() <= 3600
    # every fetch is a real round trip: the broker, not msal, decides when to refresh
    assert fetch_value(provider) != first.value.reveal()
    assert idp.request_count("client_credentials") == 2


def test_msal_client_credentials_with_certificate(idp: LocalIdP, tmp_path: Path) -> None:
    creds = rsa_credentials(tmp_path, "entra-app")
    idp.register_client("cert-client", certificate_pem=creds.cert_path.read_bytes())
    account = make_account(
        idp,
        ProviderKind.MICROSOFT,
        Flow.CLIENT_CREDENTIALS,
        client_id="cert-client",
        client_certificate_path=str(creds.cert_path),
        client_key_path=str(creds.key_path),
    )
    assert idp.is_valid(fetch_value(provider_for(account)), USER)


@pytest.mark.parametrize("kind", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_wrong_secret_is_permanent_and_not_echoed(idp: LocalIdP, kind: ProviderKind) -> None:
    account = make_account(
        idp, kind, Flow.CLIENT_CREDENTIALS, client_secret=Secret("wrong-secret-0123456789")
    )
    with pytest.raises(PermanentTokenError) as caught:
        provider_for(account).fetch(USER)
    assert caught.value.code == "invalid_client"
    assert "AADSTS7000215" in caught.value.description
    assert "wrong-secret-0123456789" not in str(caught.value)


@pytest.mark.parametrize("kind", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_refresh_token_rotation(idp: LocalIdP, kind: ProviderKind) -> None:
    stored: list[tuple[str, Secret]] = []
    initial = idp.issue_refresh_token(USER, TEST_PUBLIC_CLIENT_ID)
    account = make_account(
        idp,
        kind,
        Flow.REFRESH_TOKEN,
        client_id=TEST_PUBLIC_CLIENT_ID,
        refresh_token=Secret(initial),
    )
    provider = provider_for(account, on_refresh_token=lambda a, rt: stored.append((a, rt)))
    for _ in range(3):  # the IdP refuses a used refresh token: only the newest works
        assert idp.is_valid(fetch_value(provider), USER)
    assert [a for a, _ in stored] == [USER] * 3
    assert len({rt.reveal() for _, rt in stored} | {initial}) == 4


def test_msal_device_code(idp: LocalIdP, caplog: pytest.LogCaptureFixture) -> None:
    account = make_account(
        idp, ProviderKind.MICROSOFT, Flow.DEVICE_CODE, client_id=TEST_PUBLIC_CLIENT_ID
    )
    provider = provider_for(account)
    assert isinstance(provider, MsalProvider)
    with pytest.raises(TemporaryTokenError) as caught:
        provider.fetch(USER)
    assert caught.value.code == "authorization_pending"
    prompt = provider.pending_device_code
    assert prompt is not None and prompt.user_code in caplog.text
    assert prompt.verification_uri.startswith(idp.base_url)
    with pytest.raises(TemporaryTokenError):
        provider.fetch(USER)  # still waiting for the person
    idp.approve_device(prompt.user_code, USER)
    deadline = time.monotonic() + 10
    while True:
        try:
            token = fetch_value(provider)
            break
        except TemporaryTokenError:
            assert time.monotonic() < deadline, "device code sign-in never completed"
            time.sleep(0.2)
    assert idp.is_valid(token, USER)
    assert idp.is_valid(fetch_value(provider), USER)  # later tokens come from the refresh token
    assert idp.request_count("refresh_token") == 1
    provider.close()


@pytest.mark.parametrize("kind", [ProviderKind.MICROSOFT, ProviderKind.GENERIC])
def test_password_flow(idp: LocalIdP, kind: ProviderKind) -> None:
    idp.register_user(USER, "upstream-pass-4711")
    good = make_account(
        idp,
        kind,
        Flow.PASSWORD,
        client_id=TEST_PUBLIC_CLIENT_ID,
        password=Secret("upstream-pass-4711"),
    )
    assert idp.is_valid(fetch_value(provider_for(good)), USER)
    bad = make_account(
        idp, kind, Flow.PASSWORD, client_id=TEST_PUBLIC_CLIENT_ID, password=Secret("nope-4711")
    )
    with pytest.raises(PermanentTokenError) as caught:
        provider_for(bad).fetch(USER)
    assert caught.value.code == "invalid_grant" and "AADSTS50126" in caught.value.description
    assert "nope-4711" not in str(caught.value)


def service_account_key(idp: LocalIdP, tmp_path: Path, email: str) -> Secret:
    creds = rsa_credentials(tmp_path, "google-sa")
    idp.register_service_account(email, creds.cert_path.read_bytes())
    info = {
        "type": "service_account",
        "project_id": "mailwarden-test",
        "private_key_id": "k1",
        "private_key": creds.key_path.read_text(),
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": "https://oauth2.googleapis.com/token",  # the configured token_url wins
    }
    return Secret(json.dumps(info))


@pytest.mark.parametrize("subject", [None, "robot@example.org"])
def test_google_service_account_delegation(
    idp: LocalIdP, tmp_path: Path, subject: str | None
) -> None:
    key = service_account_key(idp, tmp_path, "mailer@project.iam.gserviceaccount.com")
    account = make_account(
        idp,
        ProviderKind.GOOGLE,
        Flow.SERVICE_ACCOUNT,
        client_id="",
        scopes=("https://mail.google.com/",),
        service_account_key=key,
        subject=subject,
    )
    token = fetch_value(provider_for(account))
    impersonated = subject or USER
    assert idp.is_valid(token, impersonated)
    assert not idp.is_valid(token, "mallory@example.org")
    assert idp.request_count("urn:ietf:params:oauth:grant-type:jwt-bearer") == 1


def test_google_authorized_user_refresh_token(idp: LocalIdP) -> None:
    stored: list[Secret] = []
    initial = idp.issue_refresh_token(USER, TEST_CLIENT_ID)
    account = make_account(
        idp,
        ProviderKind.GOOGLE,
        Flow.REFRESH_TOKEN,
        client_secret=Secret(TEST_CLIENT_SECRET),
        scopes=("https://mail.google.com/",),
        refresh_token=Secret(initial),
    )
    provider = provider_for(account, on_refresh_token=lambda _a, rt: stored.append(rt))
    assert idp.is_valid(fetch_value(provider), USER)
    assert idp.is_valid(fetch_value(provider), USER)  # used the rotated token
    assert len(stored) == 2


FAILING = [
    ("msal", ProviderKind.MICROSOFT),
    ("generic", ProviderKind.GENERIC),
]


@pytest.mark.parametrize(("name", "kind"), FAILING)
def test_server_error_is_temporary(idp: LocalIdP, name: str, kind: ProviderKind) -> None:
    provider = provider_for(secret_account(idp, kind))
    idp.fail_next("500")
    with pytest.raises(TemporaryTokenError) as caught:
        provider.fetch(USER)
    assert caught.value.code == "server_error"
    assert idp.is_valid(fetch_value(provider), USER)  # and back at once: nothing replayed


@pytest.mark.parametrize(("name", "kind"), FAILING)
def test_invalid_grant_is_permanent(idp: LocalIdP, name: str, kind: ProviderKind) -> None:
    idp.fail_next("invalid_grant")
    with pytest.raises(PermanentTokenError) as caught:
        provider_for(secret_account(idp, kind)).fetch(USER)
    assert caught.value.code == "invalid_grant"
    assert "AADSTS70000" in caught.value.description


@pytest.mark.parametrize(("name", "kind"), FAILING)
def test_timeout_is_temporary(idp: LocalIdP, name: str, kind: ProviderKind) -> None:
    provider = provider_for(secret_account(idp, kind), timeout=0.5)
    provider.fetch(USER)  # discovery done, so the hang hits the token request
    idp.fail_next("timeout")
    started = time.monotonic()
    with pytest.raises(TemporaryTokenError) as caught:
        provider.fetch(USER)
    assert caught.value.code == "timeout"
    assert time.monotonic() - started < 5


def test_google_errors(idp: LocalIdP, tmp_path: Path) -> None:
    key = service_account_key(idp, tmp_path, "errors@project.iam.gserviceaccount.com")
    account = make_account(
        idp, ProviderKind.GOOGLE, Flow.SERVICE_ACCOUNT, client_id="", service_account_key=key
    )
    provider = provider_for(account, timeout=0.5)
    idp.fail_next("invalid_grant")
    with pytest.raises(PermanentTokenError) as caught:
        provider.fetch(USER)
    assert caught.value.code == "invalid_grant"
    idp.fail_next("timeout")
    with pytest.raises(TemporaryTokenError) as temporary:
        provider.fetch(USER)
    assert temporary.value.code == "timeout"


def test_wrong_requests_ca_bundle_in_env_is_ignored(
    idp: LocalIdP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_ca = LocalCA(tmp_path / "other")  # a valid bundle that doesn't trust the IdP
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_ca.ca_path))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(other_ca.ca_path))
    for kind in (ProviderKind.MICROSOFT, ProviderKind.GENERIC):
        assert idp.is_valid(fetch_value(provider_for(secret_account(idp, kind))), USER)
    # the variable really would have broken a default session
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(idp.token_url(TEST_TENANT), timeout=5)


def test_broker_burst_against_real_idp(idp: LocalIdP) -> None:
    idp.set_failure("slow:0.3")  # keep the first request open while the burst arrives

    async def scenario() -> set[str]:
        broker = TokenBroker()
        try:
            tokens = await asyncio.gather(
                *(broker.get(secret_account(idp), USER) for _ in range(100))
            )
            return {t.value.reveal() for t in tokens}
        finally:
            await broker.close()

    assert len(asyncio.run(scenario())) == 1
    assert idp.request_count("client_credentials") == 1


def test_introspection(idp: LocalIdP) -> None:
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment replaces verify
    session.verify = str(idp.ca_path)
    user_token = idp.issue_token(USER)
    app_token = idp.issue_token(None)
    expired = idp.issue_token(USER, lifetime=-1)

    def introspect(token: str, path: str = "") -> dict[str, Any]:
        reply = session.post(idp.introspection_url + path, data={"token": token}, timeout=5)
        assert reply.status_code == 200
        return dict(reply.json())

    assert introspect(user_token) == introspect(user_token, f"/{USER}")
    assert introspect(user_token)["username"] == USER
    assert introspect(user_token, "/bob@example.org") == {"active": False}
    assert introspect(app_token, "/bob@example.org")["username"] == "bob@example.org"
    assert introspect(expired) == {"active": False}
    assert introspect("unknown-token") == {"active": False}
    assert idp.introspections == 7
    idp.revoke_all_access_tokens()
    assert not idp.is_valid(user_token, USER)

"""The Authorized condition on the real apiserver, against the local HTTPS identity provider:
credential checks, the device code flow, the authorization-code flow clicked through in
headless Chromium, the consent server's refusals, and the refresh-token keep-alive."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from mailwarden_proxy.demo.idp import LocalIdP
from tests.fixtures.idp import (
    TEST_CLIENT_ID,
    TEST_CLIENT_SECRET,
    TEST_PUBLIC_CLIENT_ID,
    TEST_TENANT,
)
from tests.fixtures.kube import KubeCluster
from tests.fixtures.operator import OperatorRunner
from tests.integration import chromium

pytestmark = pytest.mark.kube

USER = "alice@contoso.example"
WRONG_SECRET = "wrong-secret-5b1e0c9d7a"


@pytest.fixture
def start_operator(
    mailaccount_crd: KubeCluster, kube_namespace: str, idp: LocalIdP
) -> Iterator[Callable[..., OperatorRunner]]:
    """Starts the operator with the consent server on loopback (plain http, under an
    application path) and the test IdP's CA trusted for token requests."""
    runners: list[OperatorRunner] = []

    def start(refresh_interval: str | None = None) -> OperatorRunner:
        runner = OperatorRunner(mailaccount_crd, kube_namespace)
        port = runner.env["MAILWARDEN_CONSENT_PORT"]
        runner.env["MAILWARDEN_EXTERNAL_BASE_URL"] = f"http://127.0.0.1:{port}/mailwarden"
        runner.env["MAILWARDEN_TOKEN_CA_FILE"] = str(idp.ca_path)
        if refresh_interval is not None:
            runner.env["MAILWARDEN_REFRESH_INTERVAL"] = refresh_interval
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()
        runner.http.close()


def base_url(runner: OperatorRunner) -> str:
    return runner.env["MAILWARDEN_EXTERNAL_BASE_URL"]


def mailaccount(idp: LocalIdP, name: str, flow: str, **oauth2: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "metadata": {"name": name},
        "spec": {
            "provider": "microsoft",
            "username": USER,
            "oauth2": {
                "flow": flow,
                "clientId": TEST_CLIENT_ID,
                "tenantId": TEST_TENANT,
                "tokenUrl": idp.token_url(TEST_TENANT),
                **oauth2,
            },
            "imap": {"host": "127.0.0.1", "port": 993},
        },
    }


def secret(name: str, **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def secret_value(runner: OperatorRunner, name: str, key: str) -> str | None:
    found = runner.secret(name)
    if found is None or key not in (found.get("data") or {}):
        return None
    return base64.b64decode(found["data"][key]).decode()


def condition(ma: dict[str, Any], type: str) -> dict[str, Any]:
    return next(c for c in ma["status"]["conditions"] if c["type"] == type)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- credential check


def test_client_credentials_check_succeeds(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator()
    op.apply(
        secret("app", **{"client-secret": TEST_CLIENT_SECRET}),
        mailaccount(idp, "app", "clientCredentials", clientSecretRef={"name": "app"}),
    )
    ma = op.wait_for_condition("app", "Authorized", "True", reason="TokenAcquired")
    assert ma["status"]["tokenExpiresAt"].endswith("Z")
    op.wait_for_condition("app", "Ready", "True")
    assert idp.request_count("client_credentials") >= 1

    # asked for a check: the operator acquires a token again
    before = idp.request_count("client_credentials")
    op.kube.kubectl("annotate", "-n", op.namespace, "ma", "app",
                    "mailwarden.io/check-credentials=1", "--overwrite")  # fmt: skip
    wait_for("a new credential check", lambda: idp.request_count("client_credentials") > before)


def test_wrong_client_secret_names_the_idp_error_never_the_secret(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator()
    op.apply(
        secret("app", **{"client-secret": WRONG_SECRET}),
        mailaccount(idp, "app", "clientCredentials", clientSecretRef={"name": "app"}),
    )
    ma = op.wait_for_condition("app", "Authorized", "False", reason="InvalidClient")
    message = condition(ma, "Authorized")["message"]
    assert "AADSTS7000215" in message and "invalid_client" in message
    ready = op.wait_for_condition("app", "Ready", "False")
    assert condition(ready, "ConfigRendered")["status"] == "True"
    events = wait_for(
        "the InvalidClient event",
        lambda: [e for e in op.events("app") if e["reason"] == "InvalidClient"],
    )
    everything = repr(op.mailaccount("app")) + repr(events) + op.logs(10_000)
    assert WRONG_SECRET not in everything
    # the secret fixed -> re-checked without touching the MailAccount
    op.apply(secret("app", **{"client-secret": TEST_CLIENT_SECRET}))
    op.wait_for_condition("app", "Authorized", "True", reason="TokenAcquired")
    op.wait_for_condition("app", "Ready", "True")


def test_idp_unavailable_is_retried(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator()
    idp.fail_next("503", count=2)
    op.apply(
        secret("app", **{"client-secret": TEST_CLIENT_SECRET}),
        mailaccount(idp, "app", "clientCredentials", clientSecretRef={"name": "app"}),
    )
    op.wait_for_condition("app", "Authorized", "False", reason="IdentityProviderUnavailable")
    op.wait_for_condition("app", "Authorized", "True", reason="TokenAcquired", timeout=30)


# --------------------------------------------------------------------------- device code


def test_device_code_flow(start_operator: Callable[..., OperatorRunner], idp: LocalIdP) -> None:
    op = start_operator()
    op.apply(
        mailaccount(
            idp,
            "dev",
            "deviceCode",
            clientId=TEST_PUBLIC_CLIENT_ID,
            deviceAuthorizationUrl=idp.device_url(TEST_TENANT),
        )
    )
    ma = op.wait_for_condition("dev", "Authorized", "False", reason="AwaitingConsent")
    authorization = wait_for(
        "the user code",
        lambda: ((op.mailaccount("dev") or {}).get("status") or {}).get("authorization"),
    )
    code = authorization["userCode"]
    assert authorization["verificationUri"].startswith(idp.base_url)
    assert code in authorization["message"] and authorization["expiresAt"].endswith("Z")
    assert code in condition(op.mailaccount("dev") or ma, "Authorized")["message"]
    assert op.secret("dev-oauth2-token") is None

    idp.approve_device(code, USER)
    ma = op.wait_for_condition("dev", "Authorized", "True", reason="TokenAcquired")
    assert "authorization" not in ma["status"]
    token = op.secret("dev-oauth2-token")
    assert token is not None
    assert token["metadata"]["ownerReferences"][0]["uid"] == ma["metadata"]["uid"]
    stored = secret_value(op, "dev-oauth2-token", "refresh-token")
    assert stored
    op.wait_for_condition("dev", "ConfigRendered", "True")
    op.wait_for_condition("dev", "Ready", "True")
    # the rendered proxy config carries the newest stored refresh token
    wait_for(
        "the rendered config to carry the stored token",
        lambda: (
            (secret_value(op, "dev-oauth2-token", "refresh-token") or "-")
            in (secret_value(op, "dev-proxy", "proxy.yaml") or "")
        ),
    )


def test_declined_device_code_gets_a_new_code(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator()
    op.apply(mailaccount(idp, "dev", "deviceCode", clientId=TEST_PUBLIC_CLIENT_ID))
    first = wait_for(
        "a user code",
        lambda: (
            ((op.mailaccount("dev") or {}).get("status") or {}).get("authorization") or {}
        ).get("userCode"),
    )
    idp.deny_device(first)
    second = wait_for(
        "a new user code",
        lambda: (
            code
            if (
                code := (
                    ((op.mailaccount("dev") or {}).get("status") or {}).get("authorization") or {}
                ).get("userCode")
            )
            and code != first
            else None
        ),
    )
    assert wait_for(
        "the DeviceCodeRenewed event",
        lambda: [e for e in op.events("dev") if e["reason"] == "DeviceCodeRenewed"],
    )
    idp.approve_device(second, USER)
    op.wait_for_condition("dev", "Authorized", "True", reason="TokenAcquired")


# --------------------------------------------------------------------------- authorization code


def auth_code_account(idp: LocalIdP, name: str = "web") -> dict[str, Any]:
    return mailaccount(
        idp,
        name,
        "authorizationCode",
        authorizeUrl=idp.authorize_url(TEST_TENANT),
        clientSecretRef={"name": "web-client"},
    )


def test_authorization_code_in_headless_chromium(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    binary = chromium.find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    op = start_operator()
    op.apply(secret("web-client", **{"client-secret": TEST_CLIENT_SECRET}), auth_code_account(idp))
    ma = op.wait_for_condition("web", "Authorized", "False", reason="AwaitingConsent")
    consent_url = ma["status"]["authorization"]["consentUrl"]
    assert consent_url == f"{base_url(op)}/consent/{op.namespace}/web"

    host, port = urlsplit(idp.base_url).hostname, urlsplit(idp.base_url).port
    assert host is not None and port is not None
    with chromium.Chromium(binary, trusted_spki=(chromium.spki_hash(host, port),)) as browser:
        link = "document.querySelector({})".format(json.dumps(f'a.sign-in[href="{consent_url}"]'))

        async def sign_in() -> str:
            session, page = await chromium.open_page(browser.browser_ws)
            try:
                await page.goto(base_url(op) + "/")
                await page.wait_for(f"!!{link}")
                await page.evaluate(f"{link}.click()")
                await page.wait_for("location.pathname.endsWith('/oauth2/callback')")
                await page.wait_for("document.readyState === 'complete'")
                return str(await page.evaluate("document.body.innerText"))
            finally:
                await session.close()

        text = asyncio.run(sign_in())
    assert "Authorized" in text and "close this window" in text
    ma = op.wait_for_condition("web", "Authorized", "True", reason="TokenAcquired")
    assert "authorization" not in ma["status"]
    assert secret_value(op, "web-oauth2-token", "refresh-token")
    op.wait_for_condition("web", "Ready", "True")
    # no longer listed as awaiting consent
    assert "Sign in" not in requests.get(base_url(op) + "/", timeout=10).text


def start_flow(op: OperatorRunner, name: str = "web") -> dict[str, str]:
    """GET the sign-in link without following the IdP redirect; the authorize query."""
    resp = requests.get(
        f"{base_url(op)}/consent/{op.namespace}/{name}", allow_redirects=False, timeout=10
    )
    assert resp.status_code == 302, resp.text
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    query = {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["Location"]).query).items()}
    assert query["code_challenge_method"] == "S256" and query["login_hint"] == USER
    assert query["redirect_uri"] == base_url(op) + "/oauth2/callback"
    return query


def test_callback_refuses_unknown_replayed_state_and_shows_idp_errors(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator()
    op.apply(secret("web-client", **{"client-secret": TEST_CLIENT_SECRET}), auth_code_account(idp))
    op.wait_for_condition("web", "Authorized", "False", reason="AwaitingConsent")
    callback = base_url(op) + "/oauth2/callback"

    unknown = requests.get(callback, params={"state": "forged", "code": "x"}, timeout=10)
    assert unknown.status_code == 400 and "unknown" in unknown.text

    # the IdP's error, escaped
    query = start_flow(op)
    denied = requests.get(
        callback,
        params={
            "state": query["state"],
            "error": "access_denied",
            "error_description": "<script>alert(1)</script> user said no",
        },
        timeout=10,
    )
    assert denied.status_code == 400
    assert "access_denied" in denied.text and "user said no" in denied.text
    assert "<script>" not in denied.text and "&lt;script&gt;" in denied.text
    # that state is spent
    replay = requests.get(callback, params={"state": query["state"], "code": "x"}, timeout=10)
    assert replay.status_code == 400 and "already" in replay.text

    # a real code, with the PKCE challenge of the flow, completes it once
    query = start_flow(op)
    code = idp.issue_authorization_code(
        USER, TEST_CLIENT_ID, query["redirect_uri"], query["code_challenge"]
    )
    ok = requests.get(callback, params={"state": query["state"], "code": code}, timeout=10)
    assert ok.status_code == 200 and "Authorized" in ok.text, ok.text
    assert code not in ok.text
    again = requests.get(callback, params={"state": query["state"], "code": code}, timeout=10)
    assert again.status_code == 400
    op.wait_for_condition("web", "Authorized", "True", reason="TokenAcquired")

    # a code whose PKCE challenge belongs to another flow is refused by the IdP
    query = start_flow(op)
    code = idp.issue_authorization_code(USER, TEST_CLIENT_ID, query["redirect_uri"], "A" * 43)
    bad = requests.get(callback, params={"state": query["state"], "code": code}, timeout=10)
    assert bad.status_code == 400 and "invalid_grant" in bad.text


# --------------------------------------------------------------------------- keep-alive


def test_keep_alive_rotates_the_refresh_token_then_consent_is_required(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator(refresh_interval="2")
    seed = idp.issue_refresh_token(USER, TEST_CLIENT_ID)
    op.apply(
        secret("rt", **{"client-secret": TEST_CLIENT_SECRET, "refresh-token": seed}),
        mailaccount(
            idp,
            "rt",
            "refreshToken",
            clientSecretRef={"name": "rt"},
            refreshTokenRef={"name": "rt"},
        ),
    )
    ma = op.wait_for_condition("rt", "Authorized", "True", reason="TokenAcquired")
    first_refresh = ma["status"]["lastRefreshTime"]
    first_token = wait_for(
        "a stored token", lambda: secret_value(op, "rt-oauth2-token", "refresh-token")
    )
    assert first_token != seed

    def advanced() -> bool:
        status = (op.mailaccount("rt") or {}).get("status") or {}
        token = secret_value(op, "rt-oauth2-token", "refresh-token")
        return status.get("lastRefreshTime", "") > first_refresh and token not in (
            None,
            first_token,
        )

    wait_for("a keep-alive refresh", advanced, timeout=20)

    idp.set_failure("invalid_grant")
    try:
        ma = op.wait_for_condition(
            "rt", "Authorized", "False", reason="ConsentRequired", timeout=20
        )
    finally:
        idp.set_failure(None)
    assert "AADSTS70000" in condition(ma, "Authorized")["message"]
    op.wait_for_condition("rt", "Ready", "False")
    assert op.secret("rt-oauth2-token") is None  # the refused token is not kept


def test_invalid_grant_restarts_the_device_code_consent(
    start_operator: Callable[..., OperatorRunner], idp: LocalIdP
) -> None:
    op = start_operator(refresh_interval="2")
    op.apply(mailaccount(idp, "dev", "deviceCode", clientId=TEST_PUBLIC_CLIENT_ID))
    code = wait_for(
        "a user code",
        lambda: (
            ((op.mailaccount("dev") or {}).get("status") or {}).get("authorization") or {}
        ).get("userCode"),
    )
    idp.approve_device(code, USER)
    op.wait_for_condition("dev", "Authorized", "True", reason="TokenAcquired")
    idp.fail_next("invalid_grant")
    op.wait_for_condition("dev", "Authorized", "False", reason="ConsentRequired", timeout=20)
    renewed = wait_for(
        "a new user code",
        lambda: re.search(
            r"enter the code (\w+)",
            condition(op.mailaccount("dev") or {}, "Authorized")["message"],
        ),
    )
    assert renewed.group(1) != code

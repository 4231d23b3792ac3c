"""The operator's reconcile on the real apiserver: MailAccount -> `<ma>-proxy` Secret.

Ready also depends on the Authorized condition (handlers/authorization.py); these tests
are about ConfigRendered and only check that Ready is derived and present.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from typing import Any

import kopf
import pytest
import requests

from mailwarden_operator.kube import (
    Conflict,
    Invalid,
    KubeClient,
    KubeError,
    NotFound,
    decode_data,
    encode_data,
    login,
)
from mailwarden_proxy.config import load
from tests.fixtures.kube import KubeCluster
from tests.fixtures.operator import OperatorRunner

pytestmark = pytest.mark.kube

MA = "vault"
APP_SECRET = "vault-app"
TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "00000000-0000-0000-0000-000000000001"


def mailaccount(name: str = MA, secret: str = APP_SECRET) -> dict[str, Any]:
    return {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "metadata": {"name": name},
        "spec": {
            "provider": "microsoft",
            "username": "vault@contoso.com",
            "oauth2": {
                "flow": "clientCredentials",
                "clientId": CLIENT_ID,
                "tenantId": TENANT,
                "clientSecretRef": {"name": secret, "key": "client-secret"},
            },
            "imap": {},
            "smtp": {},
        },
    }


def client_secret(value: str, name: str = APP_SECRET) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"client-secret": value},
    }


def data(secret: dict[str, Any] | None, key: str) -> str:
    assert secret is not None
    return base64.b64decode(secret["data"][key]).decode()


def rendered(op: OperatorRunner, name: str = MA) -> dict[str, Any]:
    secret = op.secret(f"{name}-proxy")
    assert secret is not None, f"{name}-proxy not rendered\n{op.logs()}"
    return secret


def wait_rendered_with(op: OperatorRunner, needle: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op.check_alive()
        secret = op.secret(f"{MA}-proxy")
        if secret is not None and needle in data(secret, "proxy.yaml"):
            return secret
        time.sleep(0.2)
    pytest.fail(f"{MA}-proxy never contained the expected value\n{op.logs()}")


def condition(obj: dict[str, Any], type: str) -> dict[str, Any]:
    found = [c for c in obj["status"]["conditions"] if c["type"] == type]
    assert found, obj["status"]
    return found[0]


def test_renders_the_proxy_secret(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(client_secret("s3cret-one"), mailaccount())
    ma = op.wait_for_condition(MA, "ConfigRendered", "True", reason="Rendered")

    assert ma["status"]["configSecretName"] == f"{MA}-proxy"
    assert ma["status"]["observedGeneration"] == ma["metadata"]["generation"]
    assert condition(ma, "Ready")["status"] in ("True", "False", "Unknown")

    secret = rendered(op)
    (owner,) = secret["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "MailAccount",
        MA,
        ma["metadata"]["uid"],
    )
    assert secret["metadata"]["annotations"]["mailwarden.io/config-hash"]
    config = load.loads(data(secret, "proxy.yaml"), source="proxy.yaml")
    assert "s3cret-one" in data(secret, "proxy.yaml")
    assert config.accounts  # one account, for the mailbox
    assert data(secret, "username") == "vault@contoso.com"
    password = data(secret, "local-password")
    assert len(password) >= 24

    reasons = {e["reason"] for e in op.events(MA)}
    assert "Rendered" in reasons, reasons

    # A spec change re-renders for the new generation and keeps the local password.
    changed = mailaccount()
    changed["spec"]["local"] = {"smtpPort": 2525}
    op.apply(changed)
    ma = op.wait_for_condition(MA, "ConfigRendered", "True", generation=2)
    assert ma["status"]["observedGeneration"] == 2
    secret = wait_rendered_with(op, "2525")
    assert data(secret, "local-password") == password


def test_missing_secret_then_created(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(mailaccount())
    ma = op.wait_for_condition(MA, "ConfigRendered", "False", reason="SecretNotFound")
    assert APP_SECRET in condition(ma, "ConfigRendered")["message"]
    assert condition(ma, "Ready")["status"] == "False"
    assert op.secret(f"{MA}-proxy") is None
    warnings = [e for e in op.events(MA) if e["reason"] == "SecretNotFound"]
    assert warnings and warnings[0]["type"] == "Warning"

    # Creating the Secret is enough: the Secret watcher reconciles the MailAccount.
    op.apply(client_secret("late-but-here"))
    op.wait_for_condition(MA, "ConfigRendered", "True")
    assert "late-but-here" in data(rendered(op), "proxy.yaml")


def test_rotating_the_client_secret_re_renders(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(client_secret("before-rotation"), mailaccount())
    op.wait_for_condition(MA, "ConfigRendered", "True")
    first = rendered(op)

    op.apply(client_secret("after-rotation"))
    second = wait_rendered_with(op, "after-rotation")
    assert "before-rotation" not in data(second, "proxy.yaml")
    assert data(second, "local-password") == data(first, "local-password")
    assert (
        second["metadata"]["annotations"]["mailwarden.io/config-hash"]
        != first["metadata"]["annotations"]["mailwarden.io/config-hash"]
    )


def test_reconcile_is_idempotent_across_restarts(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(client_secret("steady"), mailaccount())
    op.wait_for_condition(MA, "ConfigRendered", "True")
    time.sleep(2)  # let kopf finish its own bookkeeping patches of this generation
    ma, secret, app = op.mailaccount(MA), rendered(op), op.secret(APP_SECRET)
    assert ma is not None and app is not None
    events = len(op.events(MA))

    op.restart()
    # The resume handler reconciled (counted as a success) and wrote nothing.
    deadline = time.monotonic() + 30
    while op.metric("mailwarden_operator_reconciles_total", result="success") < 1:
        assert time.monotonic() < deadline, op.logs()
        time.sleep(0.2)
    time.sleep(1)
    after = op.mailaccount(MA)
    assert after is not None
    assert after["metadata"]["resourceVersion"] == ma["metadata"]["resourceVersion"]
    assert rendered(op)["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    app_after = op.secret(APP_SECRET)
    assert app_after is not None
    assert app_after["metadata"]["resourceVersion"] == app["metadata"]["resourceVersion"]
    assert len(op.events(MA)) == events
    assert (
        op.metric("mailwarden_operator_mailaccounts", ready=condition(after, "Ready")["status"])
        == 1
    )


def test_operator_restart_mid_way_converges(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(client_secret("mid-way"), mailaccount())
    op.stop()  # probably mid-reconcile; at the latest before the Secret watcher saw it
    op.apply(client_secret("changed-while-down"))
    op.start()
    op.wait_for_condition(MA, "ConfigRendered", "True")
    secret = wait_rendered_with(op, "changed-while-down")
    password = data(secret, "local-password")

    op.restart()
    op.wait_for_condition(MA, "ConfigRendered", "True")
    assert data(rendered(op), "local-password") == password


def test_deletion_removes_owned_secrets_only(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    op.apply(client_secret("keep-me"), mailaccount())
    ma = op.wait_for_condition(MA, "ConfigRendered", "True")
    assert "mailwarden.io/finalizer" in ma["metadata"]["finalizers"]
    owner = {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "name": MA,
        "uid": ma["metadata"]["uid"],
    }
    token = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{MA}-oauth2-token", "ownerReferences": [owner]},
        "stringData": {"refresh-token": "unused-by-client-credentials"},
    }
    op.apply(token)
    app_before = op.secret(APP_SECRET)
    assert app_before is not None
    # The user's Secret carries nothing of the operator's.
    assert not app_before["metadata"].get("finalizers")
    assert not app_before["metadata"].get("ownerReferences")

    op.kube.kubectl("delete", "-n", op.namespace, "mailaccount", MA, "--wait=false")
    deadline = time.monotonic() + 30
    while op.mailaccount(MA) is not None:
        assert time.monotonic() < deadline, f"MailAccount not finalized\n{op.logs()}"
        op.check_alive()
        time.sleep(0.2)
    assert op.secret(f"{MA}-proxy") is None
    assert op.secret(f"{MA}-oauth2-token") is None
    app_after = op.secret(APP_SECRET)
    assert app_after is not None
    assert app_after["metadata"]["resourceVersion"] == app_before["metadata"]["resourceVersion"]


def test_a_foreign_secret_in_the_way_is_not_overwritten(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    foreign = copy.deepcopy(client_secret("mine", name=f"{MA}-proxy"))
    op.apply(foreign, client_secret("app"), mailaccount())
    ma = op.wait_for_condition(MA, "ConfigRendered", "False", reason="SecretConflict")
    assert f"{MA}-proxy" in condition(ma, "ConfigRendered")["message"]
    assert data(op.secret(f"{MA}-proxy"), "client-secret") == "mine"


def test_invalid_spec_is_reported_then_fixed(operator_runner: OperatorRunner) -> None:
    # The schema refuses most mistakes; this one (no scopes for a generic provider) only
    # the operator's parser catches.
    op = operator_runner
    bad = mailaccount()
    bad["spec"]["provider"] = "generic"
    bad["spec"]["oauth2"]["tokenUrl"] = "https://login.example.com/token"
    bad["spec"]["imap"] = {"host": "imap.example.com"}
    bad["spec"]["smtp"] = {"host": "smtp.example.com"}
    op.apply(client_secret("x"), bad)
    ma = op.wait_for_condition(MA, "ConfigRendered", "False", reason="InvalidSpec")
    assert "spec.oauth2.scopes" in condition(ma, "ConfigRendered")["message"]
    assert op.secret(f"{MA}-proxy") is None

    bad["spec"]["oauth2"]["scopes"] = ["https://mail.example.com/.default"]
    op.apply(bad)
    ma = op.wait_for_condition(MA, "ConfigRendered", "True", generation=2)
    assert "imap.example.com" in data(rendered(op), "proxy.yaml")


def test_health_and_metrics_endpoints(operator_runner: OperatorRunner) -> None:
    op = operator_runner
    base = f"http://127.0.0.1:{op.metrics_port}"
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
    op.apply(mailaccount())  # no Secret: a failure, counted as such
    op.wait_for_condition(MA, "ConfigRendered", "False", reason="SecretNotFound")
    text = requests.get(f"{base}/metrics", timeout=5).text
    assert "mailwarden_operator_reconcile_duration_seconds_bucket" in text
    assert op.metric("mailwarden_operator_reconciles_total", result="failure") >= 1
    assert op.metric("mailwarden_operator_mailaccounts", ready="False") == 1


# --------------------------------------------------------------------------- kube.py


def test_kube_client_against_the_apiserver(
    mailaccount_crd: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace

    async def scenario() -> None:
        async with KubeClient(login(), relogin=None) as client:
            with pytest.raises(NotFound):
                await client.get_secret(ns, "absent")
            body = client_secret("v1") | {"data": encode_data({"k": "v"})}
            del body["stringData"]
            created = await client.create_secret(ns, body)
            with pytest.raises(Conflict):  # AlreadyExists
                await client.create_secret(ns, body)
            patched = await client.patch_secret(ns, APP_SECRET, {"data": encode_data({"k": "w"})})
            assert decode_data(patched) == {"k": b"w"}
            stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}}
            with pytest.raises(Conflict):  # optimistic concurrency really applies
                await client.patch_secret(ns, APP_SECRET, stale | {"data": {}})
            replaced = await client.replace_secret(ns, APP_SECRET, patched | {"data": {}})
            assert not replaced.get("data")

            bad = mailaccount()
            bad["spec"]["username"] = "x" * 300  # maxLength 254 and the pattern
            with pytest.raises(Invalid) as invalid:
                await client.request(
                    "POST", f"/apis/mailwarden.io/v1alpha1/namespaces/{ns}/mailaccounts", body=bad
                )
            assert len(invalid.value.message) <= 301  # truncated
            assert "x" * 300 not in str(invalid.value)

            ma = await client.request(
                "POST",
                f"/apis/mailwarden.io/v1alpha1/namespaces/{ns}/mailaccounts",
                body=mailaccount(),
            )
            assert [m["metadata"]["name"] for m in await client.list_mailaccounts(ns)] == [MA]
            rv = ma["metadata"]["resourceVersion"]
            done = await client.patch_mailaccount_status(
                ns, MA, {"observedGeneration": 1}, resource_version=rv
            )
            assert done["status"]["observedGeneration"] == 1
            with pytest.raises(Conflict):
                await client.patch_mailaccount_status(
                    ns, MA, {"observedGeneration": 2}, resource_version=rv
                )
            event = await client.create_event(ma, reason="Testing", message="m" * 5000)
            assert event["involvedObject"]["uid"] == ma["metadata"]["uid"]
            assert len(event["message"]) <= 1025
            assert await client.list_pods(ns, label_selector="app=none") == []
            await client.delete_secret(ns, APP_SECRET, uid=created["metadata"]["uid"])
            with pytest.raises(NotFound):
                await client.delete_secret(ns, APP_SECRET)

        # A rejected token (e.g. a rotated ServiceAccount token) leads to one new login.
        bogus = kopf.ConnectionInfo(
            server=mailaccount_crd.server, ca_path=str(mailaccount_crd.ca_path), token="bogus"
        )
        async with KubeClient(bogus, relogin=login) as client:
            assert [m["metadata"]["name"] for m in await client.list_mailaccounts(ns)] == [MA]
        async with KubeClient(bogus, relogin=None) as client:
            with pytest.raises(KubeError) as unauthorized:
                await client.list_mailaccounts(ns)
            assert unauthorized.value.status == 401

    env = {"KUBECONFIG": str(mailaccount_crd.kubeconfig)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        asyncio.run(scenario())


def test_kube_client_errors_without_an_answer() -> None:
    info = kopf.ConnectionInfo(server="https://127.0.0.1:1", insecure=True)

    async def scenario() -> None:
        async with KubeClient(info, relogin=None) as client:
            with pytest.raises(KubeError) as err:
                await client.get_secret("ns", "name")
            assert err.value.status == 0
        with pytest.raises(KubeError, match="shutting down"):  # closed: a KubeError too
            await client.get_secret("ns", "name")

    asyncio.run(scenario())

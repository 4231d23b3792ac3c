"""The MailAccount CRD on a real apiserver: its schema, defaults and CEL rules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.kube import KubeCluster

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "deploy" / "crds" / "mailaccounts.mailwarden.io.yaml"

GOOD: dict[str, Any] = {
    "apiVersion": "mailwarden.io/v1alpha1",
    "kind": "MailAccount",
    "metadata": {"name": "vault"},
    "spec": {
        "provider": "microsoft",
        "username": "vault@contoso.com",
        "oauth2": {
            "flow": "clientCredentials",
            "clientId": "00000000-0000-0000-0000-000000000001",
            "tenantId": "contoso.onmicrosoft.com",
            "clientSecretRef": {"name": "vault-app", "key": "client-secret"},
        },
        "imap": {},
        "smtp": {},
    },
}


@pytest.fixture(scope="module")
def crd(kube: KubeCluster) -> KubeCluster:
    kube.kubectl("apply", "-f", str(CRD))
    kube.kubectl("wait", "--for=condition=Established", "crd/mailaccounts.mailwarden.io",
                 "--timeout=30s")  # fmt: skip
    return kube


def _apply(
    kube: KubeCluster, namespace: str, body: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    return kube.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body), check=False
    )


def _with(path: str, value: Any) -> dict[str, Any]:
    body = yaml.safe_load(yaml.safe_dump(GOOD))
    *parents, last = path.split(".")
    node = body
    for key in parents:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return body


def test_a_valid_mailaccount_is_stored_with_defaults(crd: KubeCluster, kube_namespace: str) -> None:
    result = _apply(crd, kube_namespace, GOOD)
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load(
        crd.kubectl("get", "ma", "vault", "-n", kube_namespace, "-o", "yaml").stdout
    )
    assert stored["spec"]["mechanism"] == "xoauth2"
    assert stored["spec"]["oauth2"]["usePkce"] is True
    columns = crd.kubectl("get", "mailaccounts", "-n", kube_namespace, "-o", "wide").stdout
    assert columns.split("\n")[0].split() == [
        "NAME",
        "READY",
        "PROVIDER",
        "USERNAME",
        "FLOW",
        "STATUS",
        "AGE",
    ]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.provider", "yahoo", 'spec.provider: Unsupported value: "yahoo"'),
        ("spec.username", "not-an-address", "spec.username"),
        ("spec.oauth2.tokenUrl", "[https://x](https://x)", "spec.oauth2.tokenUrl"),
        ("spec.oauth2.clientSecretRef", None, "needs clientSecretRef or clientCertificateRef"),
        ("spec.oauth2.tenantId", "common", "spec.oauth2.tenantId: Invalid value"),
        ("spec.oauth2.flow", "serviceAccount", "only for provider google"),
        ("spec.imap", {"tls": "none"}, "set allowInsecure true"),
        ("spec.imap", {"port": 70000}, "spec.imap.port"),
        ("spec.local", {"imapPort": 1025}, "local ports must differ"),
        ("spec.provider", "generic", "needs spec.oauth2.tokenUrl"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(
    crd: KubeCluster, kube_namespace: str, path: str, value: Any, message: str
) -> None:
    result = _apply(crd, kube_namespace, _with(path, value))
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_no_protocol_at_all_is_refused(crd: KubeCluster, kube_namespace: str) -> None:
    body = _with("spec.imap", None)
    del body["spec"]["smtp"]
    result = _apply(crd, kube_namespace, body)
    assert "at least one of spec.imap, spec.pop3, spec.smtp" in result.stderr

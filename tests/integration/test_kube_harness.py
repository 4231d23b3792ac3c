"""Smoke tests proving the real kube-apiserver harness (tests/fixtures/kube.py) does what
the operator, webhook and chart tests rely on."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from tests.fixtures.kube import KubeCluster, service_account_user

pytestmark = pytest.mark.kube

GROUP = "harness.mailwarden.io"

# A CRD whose CEL rule can only be enforced by a real apiserver (structural schema +
# x-kubernetes-validations), like the rules on our own CRDs.
CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{GROUP}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {{status: {{}}}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              x-kubernetes-validations:
                - rule: "self.minReplicas <= self.maxReplicas"
                  message: "minReplicas must not exceed maxReplicas"
              properties:
                minReplicas: {{type: integer, default: 1}}
                maxReplicas: {{type: integer}}
              required: [maxReplicas]
"""


def _widget(namespace: str, name: str, min_replicas: int | None, max_replicas: int) -> str:
    spec = {"maxReplicas": max_replicas}
    if min_replicas is not None:
        spec["minReplicas"] = min_replicas
    return yaml.safe_dump(
        {
            "apiVersion": f"{GROUP}/v1",
            "kind": "Widget",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def test_namespace_created(kube: KubeCluster) -> None:
    ns = kube.create_namespace()
    out = kube.kubectl("get", "namespace", ns, "-o", "json").stdout
    assert json.loads(out)["status"]["phase"] == "Active"
    # kopf discovers namespaces through the core API group.
    resources = json.loads(kube.kubectl("get", "--raw", "/api/v1").stdout)["resources"]
    assert any(r["name"] == "namespaces" and "watch" in r["verbs"] for r in resources)
    kube.kubectl("get", "serviceaccount", "default", "-n", ns)


def test_crd_cel_rule_rejects_bad_object(kube: KubeCluster, kube_namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=CRD)
    kube.kubectl("wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=30s")

    bad = kube.kubectl("apply", "-f", "-", input=_widget(kube_namespace, "bad", 5, 2), check=False)
    assert bad.returncode != 0
    assert "minReplicas must not exceed maxReplicas" in bad.stderr

    kube.kubectl("apply", "-f", "-", input=_widget(kube_namespace, "good", 1, 2))
    # Schema defaults are applied by the server too.
    kube.kubectl("apply", "-f", "-", input=_widget(kube_namespace, "defaulted", None, 3))
    obj = json.loads(
        kube.kubectl("get", "widget", "defaulted", "-n", kube_namespace, "-o", "json").stdout
    )
    assert obj["spec"]["minReplicas"] == 1


def test_secret_watch_and_conflict(kube: KubeCluster, kube_namespace: str) -> None:
    api = kube.session()
    base = kube.url(f"/api/v1/namespaces/{kube_namespace}/secrets")
    start_rv = api.get(base, timeout=10).json()["metadata"]["resourceVersion"]

    created = api.post(
        base,
        json={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"password": "s3cret"},
        },
        timeout=10,
    )
    assert created.status_code == 201, created.text
    stale = created.json()

    patched = api.patch(
        f"{base}/creds",
        data=json.dumps({"metadata": {"labels": {"rotated": "yes"}}}),
        headers={"Content-Type": "application/merge-patch+json"},
        timeout=10,
    )
    assert patched.status_code == 200, patched.text

    # A watch from before the creation replays both events, in order, with their objects.
    events: list[tuple[str, str]] = []
    with api.get(
        base,
        params={"watch": "true", "resourceVersion": start_rv, "timeoutSeconds": "10"},
        stream=True,
        timeout=15,
    ) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            event = json.loads(line)
            obj = event["object"]
            events.append((event["type"], obj["metadata"].get("labels", {}).get("rotated", "")))
            if len(events) == 2:
                break
    assert events == [("ADDED", ""), ("MODIFIED", "yes")]

    # Updating with the resourceVersion we read before the patch must be refused.
    stale["metadata"]["labels"] = {"rotated": "stale-writer"}
    conflict = api.put(f"{base}/creds", json=stale, timeout=10)
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["reason"] == "Conflict"


def test_kubectl_watch(kube: KubeCluster, kube_namespace: str) -> None:
    # The real kubectl's watch (what users and docs run) sees a change made after it
    # started. kubectl lists, then watches from the list's resourceVersion, so once the
    # pre-existing secret is printed, a later creation must arrive as a watch event.
    kube.kubectl("create", "secret", "generic", "before", "-n", kube_namespace)
    lines: queue.Queue[str] = queue.Queue()
    watcher = subprocess.Popen(
        [
            str(kube.kubectl_path),
            f"--kubeconfig={kube.kubeconfig}",
            *("get", "secrets", "-n", kube_namespace, "--watch", "-o", "name"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=kube.env,
    )

    def pump() -> None:
        for line in watcher.stdout or ():
            lines.put(line.strip())

    threading.Thread(target=pump, daemon=True).start()

    def wait_for(name: str) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 15
        while name not in seen and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
        return seen

    try:
        assert "secret/before" in wait_for("secret/before")
        kube.kubectl("create", "secret", "generic", "after", "-n", kube_namespace)
        seen = wait_for("secret/after")
        assert "secret/after" in seen, seen
    finally:
        watcher.terminate()
        watcher.wait(10)


def test_rbac_for_impersonated_service_account(kube: KubeCluster, kube_namespace: str) -> None:
    ns = kube_namespace
    kube.kubectl("create", "serviceaccount", "reader", "-n", ns)
    kube.kubectl("create", "secret", "generic", "s", "-n", ns, "--from-literal=k=v")
    user, _ = service_account_user(ns, "reader")

    denied = kube.kubectl("get", "secrets", "-n", ns, f"--as={user}", check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    raw = kube.session(user).get(kube.url(f"/api/v1/namespaces/{ns}/secrets"), timeout=10)
    assert raw.status_code == 403

    kube.kubectl(
        "create", "role", "read-secrets", "-n", ns, "--verb=get,list", "--resource=secrets"
    )
    kube.kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        ns,
        "--role=read-secrets",
        f"--serviceaccount={ns}:reader",
    )
    # RBAC is served from an informer cache: the grant shows up within moments.
    allowed = kube.kubectl(
        "wait",
        "--for=create",
        "secret/s",
        "-n",
        ns,
        f"--as={user}",
        "--timeout=10s",
        check=False,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert (
        kube.kubectl("auth", "can-i", "list", "secrets", "-n", ns, f"--as={user}").stdout.strip()
        == "yes"
    )
    assert (
        kube.kubectl(
            "auth", "can-i", "delete", "secrets", "-n", ns, f"--as={user}", check=False
        ).stdout.strip()
        == "no"
    )

    # The same identity via a client certificate (how an operator under kopf logs in) and
    # via a kubeconfig with impersonation.
    for kubeconfig in (
        kube.kubeconfig_for_service_account(ns, "reader"),
        kube.kubeconfig_for_service_account(ns, "reader", impersonate=True),
    ):
        names = kube.kubectl("get", "secrets", "-n", ns, "-o", "name", kubeconfig=kubeconfig)
        assert "secret/s" in names.stdout.split()
        assert (
            kube.kubectl(
                "get", "configmaps", "-n", ns, kubeconfig=kubeconfig, check=False
            ).returncode
            != 0
        )


def test_service_account_token(kube: KubeCluster, kube_namespace: str) -> None:
    # TokenRequest is served by the apiserver itself, so real bound tokens work without a
    # controller-manager.
    token = kube.kubectl("create", "token", "default", "-n", kube_namespace).stdout.strip()
    s = requests.Session()
    s.trust_env = False
    review = s.post(
        kube.url("/apis/authentication.k8s.io/v1/selfsubjectreviews"),
        json={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        headers={"Authorization": f"Bearer {token}"},
        verify=str(kube.ca_path),
        timeout=10,
    )
    assert review.status_code == 201, review.text
    assert review.json()["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{kube_namespace}:default"
    )


def test_helm(kube: KubeCluster, kube_namespace: str, tmp_path: Path) -> None:
    version = kube.helm("version", "--short").stdout
    assert version.startswith(("v3.", "v4.")), version

    chart = tmp_path / "smoke"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: smoke\nversion: 0.1.0\nkubeVersion: '>=1.31.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        textwrap.dedent(
            """\
            apiVersion: v1
            kind: ConfigMap
            metadata:
              name: {{ .Release.Name }}-cm
            data:
              kube: {{ .Capabilities.KubeVersion.Version | quote }}
            """
        )
    )
    release = f"r{uuid.uuid4().hex[:6]}"
    kube.helm("install", release, str(chart), "-n", kube_namespace)
    cm = json.loads(
        kube.kubectl("get", "configmap", f"{release}-cm", "-n", kube_namespace, "-o", "json").stdout
    )
    assert cm["data"]["kube"].startswith("v1.")

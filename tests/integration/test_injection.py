"""Sidecar injection on the real apiserver: it calls the operator's webhook (kopf's server
on loopback, TLS from a test CA) through a MutatingWebhookConfiguration made here, the
way the chart makes it. Pods are created with the real kubectl and read back as stored
(no kubelet: they never run, which is all injection needs)."""

from __future__ import annotations

import base64
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from mailwarden_operator.injection import INJECT_ANNOTATION, STATUS_ANNOTATION
from tests.fixtures.kube import CertificateAuthority, KubeCluster, _write_cert, _write_key
from tests.fixtures.operator import OperatorRunner, _free_port

pytestmark = pytest.mark.kube

MA = "billing"
TEST_LABEL = "mailwarden.io/injection-test"


@pytest.fixture(scope="module")
def webhook_tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA and a serving certificate for 127.0.0.1, as cert-manager would issue."""
    directory = tmp_path_factory.mktemp("webhook-tls")
    ca = CertificateAuthority.create("mailwarden-webhook-test-ca")
    key, cert = ca.issue("mailwarden-webhook", ips=["127.0.0.1"], server=True)
    _write_cert(directory / "tls.crt", cert)
    _write_key(directory / "tls.key", key)
    _write_cert(directory / "ca.crt", ca.cert)
    return {
        "cert": str(directory / "tls.crt"),
        "key": str(directory / "tls.key"),
        "ca_bundle": base64.b64encode((directory / "ca.crt").read_bytes()).decode(),
    }


class Injector:
    """The operator with its webhook server, and the webhook configurations of a test."""

    def __init__(self, kube: KubeCluster, namespace: str, tls: dict[str, str]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.tls = tls
        self.port = _free_port()
        self.op = OperatorRunner(kube, namespace)
        self.op.env.update(
            {
                "MAILWARDEN_WEBHOOK_HOST": "127.0.0.1",
                "MAILWARDEN_WEBHOOK_PORT": str(self.port),
                "MAILWARDEN_WEBHOOK_CERT_FILE": tls["cert"],
                "MAILWARDEN_WEBHOOK_KEY_FILE": tls["key"],
                "MAILWARDEN_CHECK_CREDENTIALS": "false",  # no identity provider here
                "MAILWARDEN_INJECTION_CHECK_INTERVAL": "1",
                "MAILWARDEN_PROXY_IMAGE": "registry.test/mailwarden/proxy:test",
            }
        )
        self.configs: list[str] = []

    def start(self, policy: str = "Fail", *, tls: bool = True) -> None:
        self.op.env["MAILWARDEN_WEBHOOK_FAILURE_POLICY"] = policy
        if not tls:
            for key in ("MAILWARDEN_WEBHOOK_CERT_FILE", "MAILWARDEN_WEBHOOK_KEY_FILE"):
                del self.op.env[key]
        self.op.start()
        if tls:
            self._wait_listening()

    def _wait_listening(self, timeout: float = 30) -> None:
        # kopf starts its webhook server once the resources are scanned, after start-up.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.op.check_alive()
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.1)
        pytest.fail(f"webhook server not listening on {self.port}\n{self.op.logs()}")

    def configure(self, policy: str, *, port: int | None = None, extra_ns: str = "") -> None:
        """A MutatingWebhookConfiguration like the chart's, scoped to this test's pods."""
        name = f"mailwarden-test-{self.namespace}"
        names = [self.namespace, *([extra_ns] if extra_ns else [])]
        config = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "inject-proxy.mailwarden.io",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{port or self.port}/inject-proxy",
                        "caBundle": self.tls["ca_bundle"],
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["pods"],
                        }
                    ],
                    "namespaceSelector": {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "In",
                                "values": names,
                            }
                        ]
                    },
                    "objectSelector": {"matchLabels": {TEST_LABEL: self.namespace}},
                    "failurePolicy": policy,
                    # Events on refusal are side effects; none on dry runs.
                    "sideEffects": "NoneOnDryRun",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 10,
                    "reinvocationPolicy": "IfNeeded",
                }
            ],
        }
        self.kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(config))
        self.configs.append(name)
        if port is None:
            self._wait_effective()

    def _wait_effective(self, timeout: float = 30) -> None:
        # The apiserver picks new webhook configurations up asynchronously: a server-side
        # dry run shows when the webhook is really called.
        deadline = time.monotonic() + timeout
        probe = pod("probe", MA)
        while time.monotonic() < deadline:
            proc = self.create(probe, "--dry-run=server", "-o", "yaml", check=False)
            answered = STATUS_ANNOTATION in proc.stdout or "mail proxy" in proc.stderr
            if proc.returncode != 0 or answered:
                return  # injected, or refused/admitted with a warning: the webhook answered
            time.sleep(0.2)
        pytest.fail(f"webhook configuration not in effect after {timeout}s")

    def create(
        self, manifest: dict[str, Any], *args: str, namespace: str | None = None, check: bool = True
    ) -> Any:
        manifest["metadata"].setdefault("labels", {})[TEST_LABEL] = self.namespace
        return self.kube.kubectl(
            "create",
            "-n",
            namespace or self.namespace,
            "-f",
            "-",
            *args,
            input=yaml.safe_dump(manifest),
            check=check,
        )

    def pod(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        stored = self.op.get(f"/api/v1/namespaces/{namespace or self.namespace}/pods/{name}")
        assert stored is not None, f"pod {name} not stored"
        return stored

    def add_mailaccount(self, name: str = MA) -> None:
        self.op.apply(mailaccount(name), client_secret())
        self.op.wait_for_condition(name, "ConfigRendered", "True")

    def close(self) -> None:
        self.op.stop()
        self.op.http.close()
        for name in self.configs:  # cluster-wide: never leave one for later tests
            self.kube.kubectl("delete", "mutatingwebhookconfiguration", name, "--ignore-not-found")


@pytest.fixture
def injector(
    mailaccount_crd: KubeCluster, kube_namespace: str, webhook_tls: dict[str, str]
) -> Iterator[Injector]:
    inj = Injector(mailaccount_crd, kube_namespace, webhook_tls)
    try:
        yield inj
    finally:
        inj.close()


def mailaccount(name: str = MA) -> dict[str, Any]:
    return {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "metadata": {"name": name},
        "spec": {
            "provider": "microsoft",
            "username": f"{name}@contoso.com",
            "oauth2": {
                "flow": "clientCredentials",
                "clientId": "00000000-0000-0000-0000-000000000001",
                "tenantId": "contoso.onmicrosoft.com",
                "clientSecretRef": {"name": "app", "key": "client-secret"},
            },
            "imap": {},
            "smtp": {},
        },
    }


def client_secret() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "app"},
        "stringData": {"client-secret": "s3cret"},
    }


def pod(name: str, inject: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {INJECT_ANNOTATION: inject}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.test/app:1",
                    "env": [{"name": "MAIL_SMTP_HOST", "value": "explicit.example"}],
                }
            ],
            **spec,
        },
    }


def events(inj: Injector, name: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in inj.op.events(name) if e.get("reason") == reason]


def wait_for(what: str, check: Any, inj: Injector, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inj.op.check_alive()
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout}s\n{inj.op.logs()}")


# --------------------------------------------------------------------------- tests


def test_pod_gets_the_native_sidecar_once(injector: Injector) -> None:
    injector.start("Fail")
    injector.add_mailaccount()
    injector.configure("Fail")
    proc = injector.create(pod("job-like", MA, restartPolicy="Never"))
    assert "Warning" not in proc.stderr, proc.stderr

    stored = injector.pod("job-like")
    assert stored["metadata"]["annotations"][STATUS_ANNOTATION] == "injected"
    (sidecar,) = stored["spec"]["initContainers"]
    assert sidecar["name"] == f"mailwarden-proxy-{MA}"
    assert sidecar["restartPolicy"] == "Always"  # the apiserver kept it: native sidecars on
    assert sidecar["image"] == "registry.test/mailwarden/proxy:test"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    volume = next(v for v in stored["spec"]["volumes"] if v["name"] == f"mailwarden-{MA}")
    assert volume["secret"]["secretName"] == f"{MA}-proxy"
    env = {e["name"]: e for e in stored["spec"]["containers"][0]["env"]}
    assert env["MAIL_SMTP_HOST"]["value"] == "explicit.example"  # explicit beats injected
    assert env["MAIL_SMTP_PORT"]["value"] == "1025"
    assert env["MAIL_IMAP_PORT"]["value"] == "1143"
    assert "MAIL_POP3_PORT" not in env
    assert env["MAIL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{MA}-proxy",
        "key": "local-password",
    }
    assert injector.op.metric("mailwarden_operator_injections_total", result="injected") >= 1

    # The same, already injected pod created again (a dump re-applied): unchanged.
    again = {"apiVersion": "v1", "kind": "Pod", "spec": stored["spec"]}
    again["metadata"] = {
        "name": "job-like-copy",
        "annotations": stored["metadata"]["annotations"],
        "labels": stored["metadata"]["labels"],
    }
    injector.create(again)
    copy = injector.pod("job-like-copy")
    assert copy["spec"]["initContainers"] == stored["spec"]["initContainers"]
    assert copy["spec"]["volumes"] == stored["spec"]["volumes"]
    assert copy["spec"]["containers"] == stored["spec"]["containers"]
    assert injector.op.metric("mailwarden_operator_injections_total", result="unchanged") >= 1

    # Classic mode, chosen per pod, passes the apiserver's validation too.
    classic = pod("classic", MA)
    classic["metadata"]["annotations"]["mailwarden.io/sidecar-mode"] = "classic"
    injector.create(classic)
    stored = injector.pod("classic")
    assert [c["name"] for c in stored["spec"]["containers"]] == [f"mailwarden-proxy-{MA}", "app"]
    assert "postStart" in stored["spec"]["containers"][0]["lifecycle"]
    assert stored["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"

    # Nothing was left behind uninjected.
    time.sleep(1.5)
    assert (
        injector.op.metric("mailwarden_operator_pods_not_injected", namespace=injector.namespace)
        == 0
    )


def test_refusals_under_fail(injector: Injector) -> None:
    injector.start("Fail")
    injector.configure("Fail", extra_ns="kube-system")

    proc = injector.create(pod("orphan", "nope"), check=False)
    assert proc.returncode != 0
    assert f"MailAccount 'nope' not found in namespace '{injector.namespace}'" in proc.stderr
    assert injector.op.get(f"/api/v1/namespaces/{injector.namespace}/pods/orphan") is None
    (event,) = wait_for(
        "InjectionRefused Event", lambda: events(injector, "orphan", "InjectionRefused"), injector
    )
    assert event["type"] == "Warning" and "'nope'" in event["message"]

    # kube-system: the ServiceAccount admission plugin wants its default ServiceAccount.
    injector.kube.kubectl("create", "serviceaccount", "default", "-n", "kube-system", check=False)
    proc = injector.create(pod("system", "nope"), namespace="kube-system", check=False)
    assert proc.returncode != 0
    assert "no mail proxy injection in namespace kube-system" in proc.stderr


def test_ignore_policy_admits_reports_and_counts(injector: Injector) -> None:
    injector.start("Ignore")
    injector.configure("Ignore")
    proc = injector.create(pod("unlucky", "nope"))
    assert "Warning: mail proxy NOT injected" in proc.stderr
    stored = injector.pod("unlucky")
    assert "initContainers" not in stored["spec"]
    assert STATUS_ANNOTATION not in stored["metadata"]["annotations"]

    def counted() -> bool:
        metric = "mailwarden_operator_pods_not_injected"
        return injector.op.metric(metric, namespace=injector.namespace) == 1

    wait_for("pods_not_injected == 1", counted, injector)
    found = wait_for(
        "NotInjected Events", lambda: events(injector, "unlucky", "NotInjected"), injector
    )
    messages = " ".join(e["message"] for e in found)
    assert "admitted WITHOUT the mail proxy" in messages  # the webhook's
    wait_for(
        "the periodic check's Event",
        lambda: any(
            "runs WITHOUT" in e["message"] for e in events(injector, "unlucky", "NotInjected")
        ),
        injector,
    )


def test_unreachable_webhook_is_noticed(injector: Injector) -> None:
    # The operator without TLS files serves no webhook; the configuration points at a
    # port nobody listens on, so failurePolicy Ignore lets the pod in unchanged.
    injector.start("Ignore", tls=False)
    injector.configure("Ignore", port=_free_port())
    proc = injector.create(pod("slipped", MA))
    assert proc.returncode == 0
    assert "initContainers" not in injector.pod("slipped")["spec"]
    wait_for(
        "NotInjected Event from the periodic check",
        lambda: events(injector, "slipped", "NotInjected"),
        injector,
    )
    metric = "mailwarden_operator_pods_not_injected"
    assert injector.op.metric(metric, namespace=injector.namespace) == 1
    assert "sidecar injection is off" in injector.op.logs(last=1000)


def test_managed_configuration_for_development(injector: Injector) -> None:
    # Without the chart: kopf writes the configuration itself (every pod, Ignore).
    name = f"{injector.namespace}.mailwarden.io"  # kopf adds "inject-proxy." for the hook
    injector.op.env["MAILWARDEN_WEBHOOK_MANAGED"] = name
    injector.configs.append(name)  # deleted at the end like ours
    injector.start("Fail")
    injector.add_mailaccount()

    def config() -> dict[str, Any] | None:
        path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
        return injector.op.get(path)

    made = wait_for("kopf's MutatingWebhookConfiguration", config, injector)
    (hook,) = made["webhooks"]
    assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{injector.port}/inject-proxy"
    assert hook["failurePolicy"] == "Ignore"

    def injected() -> bool:
        probe = pod("dev-probe", MA)
        proc = injector.create(probe, "--dry-run=server", "-o", "yaml", check=False)
        return STATUS_ANNOTATION in proc.stdout

    wait_for("injection through kopf's configuration", injected, injector)

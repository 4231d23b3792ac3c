"""The Helm chart `charts/mailwarden`: lint, render, snapshot, schema, and a real install.

Rendering runs the real helm (v4, from the kube harness binaries). The install goes into
the harness's kube-apiserver, and then the operator runs in-process authenticated as the
chart's ServiceAccount: whatever the operator needs and the chart's RBAC doesn't grant
fails the scenario, which is how the RBAC is shown to suffice. `kubectl auth can-i`
shows it grants no more than intended.

The snapshot `tests/snapshots/chart-default.yaml` is the default render with the
generated certificates masked; `UPDATE_SNAPSHOTS=1 pytest tests/integration/test_chart.py`
rewrites it after an intended change (review the diff).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from mailwarden_proxy.demo.idp import LocalIdP
from tests.fixtures.idp import TEST_CLIENT_ID, TEST_CLIENT_SECRET, TEST_TENANT
from tests.fixtures.kube import KubeCluster, find_binaries
from tests.fixtures.operator import OperatorRunner

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "mailwarden"
CRD_SOURCE = ROOT / "deploy" / "crds" / "mailaccounts.mailwarden.io.yaml"
CRD_COPY = CHART / "files" / "crds" / "mailaccounts.mailwarden.io.yaml"
SETTINGS = ROOT / "operator" / "mailwarden_operator" / "settings.py"
SNAPSHOT = ROOT / "tests" / "snapshots" / "chart-default.yaml"
RELEASE = "mailwarden"
RELEASE_NS = "mailwarden-system"
SA = f"system:serviceaccount:{RELEASE_NS}:{RELEASE}"
MONITORING = "monitoring.coreos.com/v1"

DEFAULT_KINDS = {
    "ServiceAccount",
    "Secret",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "Service",
    "Deployment",
    "MutatingWebhookConfiguration",
}
SECRET_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
# Base64 of generated key material: a fresh CA and key pair on every `helm template`.
GENERATED = re.compile(r"^(\s*(?:ca\.crt|tls\.crt|tls\.key|caBundle): ).+$", re.MULTILINE)


# --------------------------------------------------------------------------- helpers

Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The harness's helm binary, for commands that need no cluster (lint, template)."""
    bin_dir = find_binaries()
    if bin_dir is None or not os.access(bin_dir / "helm", os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("helm not found: run tests/k8s/build.sh", pytrace=False)
        pytest.skip("helm not found: run tests/k8s/build.sh or set MAILWARDEN_K8S_BIN")
    home = tmp_path_factory.mktemp("helm")
    env = dict(os.environ)
    env.update(
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-cluster"),
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(bin_dir / "helm"), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc

    return run


def render_text(helm: Helm, *args: str) -> str:
    return helm("template", RELEASE, str(CHART), "--namespace", RELEASE_NS, *args).stdout


def render(helm: Helm, *args: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(helm, *args)) if doc]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def only(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in {sorted(kinds(objects))}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(c)


def env_of(objects: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objects)["env"]}


def rules(role: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def mask(text: str) -> str:
    return GENERATED.sub(r"\1<generated: differs per render>", text)


def b64(text: str) -> bytes:
    return base64.b64decode(text)


def verify_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    key = ca.public_key()
    assert cert.signature_hash_algorithm is not None
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(
            cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
        )


def sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(ext.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return dns, ips


# --------------------------------------------------------------------------- lint, render


def test_lint_strict(helm: Helm) -> None:
    helm("lint", "--strict", str(CHART))
    helm(
        "lint",
        "--strict",
        str(CHART),
        "--set",
        "certManager.enabled=true,networkPolicy.enabled=true,podDisruptionBudget.enabled=true",
        "--set",
        "ingress.enabled=true,consent.externalBaseUrl=https://mail.example.com/mailwarden",
        "--set",
        "watchNamespaces={apps,billing}",
    )


def test_defaults_render_the_expected_objects(helm: Helm) -> None:
    objects = render(helm)
    assert kinds(objects) == DEFAULT_KINDS
    for obj in objects:
        namespaced = obj["kind"] not in (
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "MutatingWebhookConfiguration",
        )
        assert obj["metadata"].get("namespace") == (RELEASE_NS if namespaced else None), obj

    deployment = only(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == RELEASE
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(objects)
    assert c["command"][:3] == ["kopf", "run", "--standalone"]
    assert c["command"][-3:] == ["-m", "mailwarden_operator.main", "--all-namespaces"]
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"webhook": 9443, "consent": 8080, "metrics": 8081}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]

    env = env_of(objects)
    assert env["MAILWARDEN_NAMESPACES"] == "*"
    assert env["MAILWARDEN_PROXY_IMAGE"].endswith(":0.1.0")
    assert env["MAILWARDEN_WEBHOOK_PORT"] == "9443"
    assert env["MAILWARDEN_METRICS_PORT"] == "8081"

    service = only(objects, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("webhook", 443, "webhook"),
        ("consent", 80, "consent"),
        ("metrics", 8081, "metrics"),
    }

    (hook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": RELEASE,
        "namespace": RELEASE_NS,
        "port": 443,
        "path": "/inject-proxy",
    }
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "NoneOnDryRun"  # Events for refusals, not on dry runs
    assert env["MAILWARDEN_WEBHOOK_FAILURE_POLICY"] == hook["failurePolicy"]
    assert hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    (excluded,) = hook["namespaceSelector"]["matchExpressions"]
    assert excluded["operator"] == "NotIn"
    assert set(excluded["values"]) == {RELEASE_NS, "kube-system", "kube-public"}

    # Watching all namespaces: one ClusterRole, nothing namespaced, no namespace watch.
    granted = rules(only(objects, "ClusterRole"))
    assert granted[("", "secrets")] == SECRET_VERBS
    assert ("", "namespaces") not in granted


def test_every_operator_setting_is_set_by_the_chart(helm: Helm) -> None:
    # Every MAILWARDEN_* variable settings.py reads; TOKEN_CA_FILE only with a CA bundle;
    # WEBHOOK_MANAGED never (kopf would manage a webhook configuration next to the chart's).
    wanted = set(re.findall(r"``(MAILWARDEN_[A-Z0-9_]+)``", SETTINGS.read_text()))
    assert "MAILWARDEN_NAMESPACES" in wanted
    wanted -= {"MAILWARDEN_WEBHOOK_MANAGED"}
    env = env_of(render(helm, "--set", "operator.tokenCA.configMap=idp-ca"))
    assert wanted <= set(env), f"not set by the chart: {sorted(wanted - set(env))}"
    assert "MAILWARDEN_WEBHOOK_MANAGED" not in env
    assert env["MAILWARDEN_TOKEN_CA_FILE"] == "/etc/mailwarden/token-ca/ca.crt"
    assert "MAILWARDEN_TOKEN_CA_FILE" not in env_of(render(helm))


def test_the_webhook_path_is_the_handler_id(helm: Helm) -> None:
    # kopf serves an admission handler at /<handler id>; the chart's configuration must
    # name that path, or the API server gets 404s (ignored under failurePolicy Ignore!).
    import kopf

    import mailwarden_operator.main  # noqa: F401  (registers the handlers)

    webhooks = kopf.get_default_registry()._webhooks.get_all_handlers()
    paths = {f"/{handler.id}" for handler in webhooks}
    (hook,) = only(render(helm), "MutatingWebhookConfiguration")["webhooks"]
    assert paths == {hook["clientConfig"]["service"]["path"]}


def test_failure_policy_reaches_webhook_and_operator(helm: Helm) -> None:
    objects = render(helm, "--set", "webhook.failurePolicy=Fail")
    (hook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Fail"
    assert env_of(objects)["MAILWARDEN_WEBHOOK_FAILURE_POLICY"] == "Fail"


def test_watch_namespaces_gives_roles_only_there(helm: Helm) -> None:
    objects = render(helm, "--set", "watchNamespaces={apps,billing}")
    assert kinds(objects) == DEFAULT_KINDS | {"Role", "RoleBinding"}
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["apps", "billing"]
    for role in roles:
        assert rules(role) == {
            ("mailwarden.io", "mailaccounts"): {"get", "list", "watch", "patch"},
            ("mailwarden.io", "mailaccounts/status"): {"patch"},
            ("mailwarden.io", "mailaccounts/finalizers"): {"update"},
            ("", "secrets"): SECRET_VERBS,
            ("", "events"): {"create"},
            ("", "pods"): {"list"},
        }
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": RELEASE, "namespace": RELEASE_NS}
        ]
    # Cluster-wide only what can't be namespaced.
    assert rules(only(objects, "ClusterRole")) == {
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
        ("", "namespaces"): {"list", "watch"},
    }
    c = container(objects)
    assert c["command"][-2:] == ["--namespace=apps", "--namespace=billing"]
    assert env_of(objects)["MAILWARDEN_NAMESPACES"] == "apps,billing"
    (hook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    expressions = hook["namespaceSelector"]["matchExpressions"]
    assert {"key": "kubernetes.io/metadata.name", "operator": "In",
            "values": ["apps", "billing"]} in expressions  # fmt: skip


def test_cert_manager_replaces_the_generated_certificate(helm: Helm) -> None:
    objects = render(helm, "--set", "certManager.enabled=true")
    assert kinds(objects) == (DEFAULT_KINDS - {"Secret"}) | {"Issuer", "Certificate"}
    serving = only(objects, "Certificate", f"{RELEASE}-webhook")
    assert serving["spec"]["secretName"] == f"{RELEASE}-webhook-tls"
    assert f"{RELEASE}.{RELEASE_NS}.svc" in serving["spec"]["dnsNames"]
    assert serving["spec"]["issuerRef"]["name"] == f"{RELEASE}-ca"
    assert only(objects, "Certificate", f"{RELEASE}-ca")["spec"]["isCA"] is True
    webhook = only(objects, "MutatingWebhookConfiguration")
    assert webhook["metadata"]["annotations"] == {
        "cert-manager.io/inject-ca-from": f"{RELEASE_NS}/{RELEASE}-webhook"
    }
    assert "caBundle" not in webhook["webhooks"][0]["clientConfig"]

    own = render(
        helm,
        "--set",
        "certManager.enabled=true,certManager.issuerRef.name=corp,certManager.issuerRef.kind=ClusterIssuer",
    )
    assert [o["metadata"]["name"] for o in own if o["kind"] in ("Issuer", "Certificate")] == [
        f"{RELEASE}-webhook"
    ]
    issuer = only(own, "Certificate")["spec"]["issuerRef"]
    assert issuer == {"name": "corp", "kind": "ClusterIssuer"}


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitors_only_where_the_api_exists(helm: Helm, kind: str) -> None:
    key = kind[0].lower() + kind[1:]
    assert kind not in kinds(render(helm, "--set", f"{key}.enabled=true"))
    objects = render(
        helm, "--set", f"{key}.enabled=true,{key}.labels.release=prom",
        "--api-versions", f"{MONITORING}/{kind}",
    )  # fmt: skip
    monitor = only(objects, kind)
    assert monitor["metadata"]["labels"]["release"] == "prom"
    endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
    assert endpoints[0]["port"] == "metrics" and endpoints[0]["path"] == "/metrics"
    assert kind not in kinds(render(helm, "--api-versions", f"{MONITORING}/{kind}"))


def test_network_policy_admits_only_the_three_ports(helm: Helm) -> None:
    peer = '{"namespaceSelector":{"matchLabels":{"name":"monitoring"}}}'
    objects = render(
        helm,
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        f"networkPolicy.metricsFrom=[{peer}]",
    )
    policy = only(objects, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["spec"]["ingress"]}
    assert by_port == {
        "webhook": None,
        "consent": None,
        "metrics": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    }


def test_ingress_serves_the_consent_base_url(helm: Helm) -> None:
    assert "Ingress" not in kinds(render(helm))
    failed = helm("template", RELEASE, str(CHART), "--set", "ingress.enabled=true", check=False)
    assert failed.returncode != 0 and "consent.externalBaseUrl" in failed.stderr
    objects = render(
        helm,
        "--set",
        "ingress.enabled=true,ingress.className=nginx,ingress.tlsSecretName=mail-tls",
        "--set",
        "consent.externalBaseUrl=https://mail-admin.example.com/mailwarden",
    )
    ingress = only(objects, "Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mail-admin.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/mailwarden", "Prefix")
    assert path["backend"]["service"] == {"name": RELEASE, "port": {"name": "consent"}}
    (tls,) = ingress["spec"]["tls"]
    assert tls == {"hosts": ["mail-admin.example.com"], "secretName": "mail-tls"}
    base = env_of(objects)["MAILWARDEN_EXTERNAL_BASE_URL"]
    assert base == "https://mail-admin.example.com/mailwarden"


def test_pod_disruption_budget_is_opt_in(helm: Helm) -> None:
    assert "PodDisruptionBudget" not in kinds(render(helm))
    pdb = only(render(helm, "--set", "podDisruptionBudget.enabled=true"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 0


def test_generated_webhook_certificate(helm: Helm) -> None:
    objects = render(helm, "--set", "webhook.url=https://127.0.0.1:9443")
    secret = only(objects, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    ca = x509.load_pem_x509_certificate(b64(secret["data"]["ca.crt"]))
    leaf = x509.load_pem_x509_certificate(b64(secret["data"]["tls.crt"]))
    verify_signed_by(leaf, ca)
    dns, ips = sans(leaf)
    assert f"{RELEASE}.{RELEASE_NS}.svc" in dns
    assert ips == {"127.0.0.1"}
    (hook,) = only(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"] == {
        "url": "https://127.0.0.1:9443/inject-proxy",
        "caBundle": secret["data"]["ca.crt"],
    }
    named = render(helm, "--set", "webhook.url=https://operator.dev.example:9443/")
    leaf = x509.load_pem_x509_certificate(b64(only(named, "Secret")["data"]["tls.crt"]))
    assert "operator.dev.example" in sans(leaf)[0]


def test_crds_enabled_and_keep(helm: Helm) -> None:
    source = yaml.safe_load(CRD_SOURCE.read_text())
    kept = only(render(helm), "CustomResourceDefinition")
    assert kept["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert kept == source
    assert only(render(helm, "--set", "crds.keep=false"), "CustomResourceDefinition") == source
    assert "CustomResourceDefinition" not in kinds(render(helm, "--set", "crds.enabled=false"))


def test_crd_copy_is_identical_to_deploy_crds() -> None:
    assert CRD_COPY.read_bytes() == CRD_SOURCE.read_bytes(), (
        f"{CRD_COPY} differs from {CRD_SOURCE}: cp {CRD_SOURCE.relative_to(ROOT)} "
        f"{CRD_COPY.relative_to(ROOT)}"
    )


def test_snapshot(helm: Helm) -> None:
    text = mask(render_text(helm))
    assert "<generated" in text
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), f"no snapshot yet: UPDATE_SNAPSHOTS=1 to create {SNAPSHOT}"
    assert text == SNAPSHOT.read_text(), (
        "the default render changed; if intended, UPDATE_SNAPSHOTS=1 and review the diff of "
        f"{SNAPSHOT.relative_to(ROOT)}"
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "replicas=1"], "replicas"),
        (["--set", "webhook.failurPolicy=Fail"], "failurPolicy"),
        (["--set", "image.registry=docker.io"], "registry"),
        (["--set", "replicaCount=2"], "replicaCount"),
        (["--set", "webhook.failurePolicy=Sometimes"], "failurePolicy"),
        (["--set", "webhook.url=https://127.0.0.1:9443/inject-proxy"], "url"),
        (["--set", "watchNamespaces={Not_A_Namespace}"], "watchNamespaces"),
    ],
)
def test_schema_refuses(helm: Helm, args: list[str], complaint: str) -> None:
    proc = helm("template", RELEASE, str(CHART), *args, check=False)
    assert proc.returncode != 0, proc.stdout[:500]
    assert "schema" in proc.stderr and complaint in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- on the apiserver


class Release:
    """The chart installed in the harness, watching one namespace."""

    def __init__(self, kube: KubeCluster, watched: str, webhook_port: int) -> None:
        self.kube = kube
        self.watched = watched
        self.webhook_port = webhook_port
        self.notes = ""
        self.values = [
            "--set", f"watchNamespaces={{{watched}}}",
            "--set", f"webhook.url=https://127.0.0.1:{webhook_port}",
        ]  # fmt: skip

    def install(self, verb: str = "install") -> str:
        extra = ["--create-namespace", "--take-ownership"] if verb == "install" else []
        return self.kube.helm(
            verb, RELEASE, str(CHART), "--namespace", RELEASE_NS, *extra, *self.values
        ).stdout

    def manifest(self) -> list[dict[str, Any]]:
        out = self.kube.helm("get", "manifest", RELEASE, "--namespace", RELEASE_NS).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
        args = ["get", kind, name, "-o", "yaml"] + (["-n", namespace] if namespace else [])
        return dict(yaml.safe_load(self.kube.kubectl(*args).stdout))

    def can_i(self, *args: str) -> bool:
        proc = self.kube.kubectl("auth", "can-i", f"--as={SA}", *args, check=False)
        return proc.stdout.strip() == "yes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def release(kube: KubeCluster) -> Iterator[Release]:
    watched = kube.create_namespace()
    rel = Release(kube, watched, _free_port())
    # --take-ownership: other tests may have applied the CRD with kubectl already.
    rel.notes = rel.install()
    yield rel
    kube.helm("uninstall", RELEASE, "--namespace", RELEASE_NS, check=False)


def test_install_creates_every_object(release: Release) -> None:
    objects = release.manifest()
    assert kinds(objects) == DEFAULT_KINDS | {"Role", "RoleBinding"}
    for obj in objects:
        live = release.get(obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace"))
        assert live["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    crd = release.get("crd", "mailaccounts.mailwarden.io")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established.get("Established") == "True"


def test_notes_tell_the_next_step(release: Release) -> None:
    notes = release.notes
    assert f"kubectl get ma -n {release.watched}" in notes
    assert "mailwarden.io/inject: orders" in notes
    # The MailAccount shown is valid for the installed CRD (server-side dry run).
    manifest = re.search(r"<<'EOF'\n(.*?)\n\s*EOF", notes, re.DOTALL)
    assert manifest is not None, notes
    body = textwrap.dedent(manifest.group(1))
    assert yaml.safe_load(body)["kind"] == "MailAccount"
    release.kube.kubectl("apply", "--dry-run=server", "-n", release.watched, "-f", "-", input=body)


def test_upgrade_keeps_the_webhook_certificate(release: Release) -> None:
    name = f"{RELEASE}-webhook-tls"
    before = release.get("secret", name, RELEASE_NS)["data"]
    release.install("upgrade")
    after = release.get("secret", name, RELEASE_NS)["data"]
    assert after == before
    hook = release.get("mutatingwebhookconfiguration", RELEASE)["webhooks"][0]
    assert hook["clientConfig"]["caBundle"] == before["ca.crt"]
    assert hook["clientConfig"]["url"] == f"https://127.0.0.1:{release.webhook_port}/inject-proxy"


def test_service_account_may_only_what_the_operator_needs(release: Release) -> None:
    ns, other = release.watched, release.kube.create_namespace()
    allowed = [
        ("get", "secrets", "-n", ns),
        ("watch", "secrets", "-n", ns),
        ("delete", "secrets", "-n", ns),
        ("patch", "mailaccounts.mailwarden.io", "-n", ns),
        ("patch", "mailaccounts.mailwarden.io", "--subresource=status", "-n", ns),
        ("create", "events", "-n", ns),
        ("list", "pods", "-n", ns),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("watch", "namespaces"),
    ]
    denied = [
        ("get", "secrets", "-n", other),  # not a watched namespace
        ("list", "secrets", "--all-namespaces"),
        ("get", "secrets", "-n", RELEASE_NS),  # not even its own webhook key
        ("get", "secrets", "-n", "kube-system"),
        ("delete", "mailaccounts.mailwarden.io", "-n", ns),  # MailAccounts are the users'
        ("create", "mailaccounts.mailwarden.io", "-n", ns),
        ("update", "mailaccounts.mailwarden.io", "-n", ns),
        ("get", "mailaccounts.mailwarden.io", "-n", other),
        ("patch", "pods", "-n", ns),  # the API server applies the webhook's patch
        ("create", "pods", "-n", ns),
        ("get", "configmaps", "-n", ns),
        ("create", "clusterroles"),
        ("create", "rolebindings", "-n", ns),
        ("patch", "mutatingwebhookconfigurations"),
        ("update", "customresourcedefinitions.apiextensions.k8s.io"),
        ("create", "leases.coordination.k8s.io", "-n", RELEASE_NS),
        ("create", "serviceaccounts/token", "-n", ns),
        ("impersonate", "users"),
    ]
    assert [a for a in allowed if not release.can_i(*a)] == []
    assert [d for d in denied if release.can_i(*d)] == []


def _wait(what: str, probe: Callable[[], Any], op: OperatorRunner, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        op.check_alive()
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{op.logs()}")


def assert_nothing_refused(op: OperatorRunner) -> None:
    """No API call was refused, not even those kopf tolerates with a warning (its CRD
    and namespace observers log "Not enough permissions" and carry on)."""
    log = op.logs(100_000)
    for refusal in ("Forbidden", " 403 ", "Not enough permissions"):
        assert refusal not in log, log


def _secret(name: str, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "stringData": {"client-secret": value},
    }


def _mailaccount(idp: LocalIdP, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "metadata": {"name": name},
        "spec": {
            "provider": "microsoft",
            "username": "chart@contoso.example",
            "oauth2": {
                "flow": "clientCredentials",
                "clientId": TEST_CLIENT_ID,
                "tenantId": TEST_TENANT,
                "tokenUrl": idp.token_url(TEST_TENANT),
                "clientSecretRef": {"name": f"{name}-app", "key": "client-secret"},
            },
            "imap": {"host": "127.0.0.1", "port": 993},
            "smtp": {"host": "127.0.0.1", "port": 465},
        },
    }


@pytest.fixture
def operator_as_chart_sa(release: Release, idp: LocalIdP) -> Iterator[OperatorRunner]:
    """The operator in-process, authenticated as the chart's ServiceAccount (a client
    certificate for that identity: RBAC matches it exactly like the account's token),
    with the chart's webhook key pair, serving at the URL the chart registered."""
    kube = release.kube
    runner = OperatorRunner(kube, release.watched)
    tls = release.get("secret", f"{RELEASE}-webhook-tls", RELEASE_NS)["data"]
    workdir = Path(kube.workdir) / "chart-webhook"
    workdir.mkdir(exist_ok=True)
    for key in ("tls.crt", "tls.key"):
        (workdir / key).write_bytes(b64(tls[key]))
        (workdir / key).chmod(0o600)
    runner.env.update(
        KUBECONFIG=str(kube.kubeconfig_for_service_account(RELEASE_NS, RELEASE)),
        MAILWARDEN_TOKEN_CA_FILE=str(idp.ca_path),
        MAILWARDEN_WEBHOOK_HOST="127.0.0.1",
        MAILWARDEN_WEBHOOK_PORT=str(release.webhook_port),
        MAILWARDEN_WEBHOOK_CERT_FILE=str(workdir / "tls.crt"),
        MAILWARDEN_WEBHOOK_KEY_FILE=str(workdir / "tls.key"),
        MAILWARDEN_PROXY_IMAGE="registry.example/mailwarden-proxy:test",
    )
    runner.start()
    try:
        yield runner
    finally:
        runner.stop()
        runner.http.close()


def test_operator_runs_on_the_chart_rbac(
    operator_as_chart_sa: OperatorRunner, idp: LocalIdP
) -> None:
    op = operator_as_chart_sa
    name = "chart"
    rendered = f"{name}-proxy"
    # A wrong client secret first: ConfigRendered, Authorized False, a warning Event.
    op.apply(_secret(f"{name}-app", "wrong-secret-for-the-chart-test"), _mailaccount(idp, name))
    ma = op.wait_for_condition(name, "ConfigRendered", "True", reason="Rendered")
    assert "mailwarden.io/finalizer" in ma["metadata"]["finalizers"]
    op.wait_for_condition(name, "Authorized", "False", reason="InvalidClient")
    _wait("the InvalidClient event",
          lambda: [e for e in op.events(name) if e["reason"] == "InvalidClient"], op)  # fmt: skip
    first = op.secret(rendered)
    assert first is not None

    # Rotating the referenced Secret (seen through the Secret watch) re-renders and
    # re-checks: Ready.
    op.apply(_secret(f"{name}-app", TEST_CLIENT_SECRET))
    op.wait_for_condition(name, "Authorized", "True", reason="TokenAcquired")
    op.wait_for_condition(name, "Ready", "True")
    second = _wait(
        "the re-rendered Secret",
        lambda: (
            (s := op.secret(rendered))
            and s["metadata"]["annotations"]["mailwarden.io/config-hash"]
            != first["metadata"]["annotations"]["mailwarden.io/config-hash"]
            and s
        ),
        op,
    )
    assert second["data"]["local-password"] == first["data"]["local-password"]

    # Deleting: the finalizer runs, the owned Secret goes, the user's stays.
    op.kube.kubectl("delete", "-n", op.namespace, "mailaccount", name, "--wait=false")
    _wait("the MailAccount to be finalized", lambda: op.mailaccount(name) is None, op)
    assert op.secret(rendered) is None
    assert op.secret(f"{name}-app") is not None
    assert_nothing_refused(op)


def test_the_api_server_calls_the_webhook(
    operator_as_chart_sa: OperatorRunner, idp: LocalIdP
) -> None:
    op = operator_as_chart_sa
    name = "hooked"
    op.apply(_secret(f"{name}-app", TEST_CLIENT_SECRET), _mailaccount(idp, name))
    op.wait_for_condition(name, "ConfigRendered", "True")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "annotations": {"mailwarden.io/inject": name}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }
    op.apply(pod)
    stored = op.get(f"/api/v1/namespaces/{op.namespace}/pods/app")
    assert stored is not None
    assert stored["metadata"]["annotations"].get("mailwarden.io/status") == "injected", (
        f"{yaml.safe_dump(stored)}\n{op.logs()}"
    )
    sidecars = [
        c for c in stored["spec"].get("initContainers", [])
        if c["name"].startswith("mailwarden-proxy")
    ]  # fmt: skip
    assert sidecars and sidecars[0]["restartPolicy"] == "Always"
    assert sidecars[0]["image"] == "registry.example/mailwarden-proxy:test"
    env = {e["name"] for e in stored["spec"]["containers"][0]["env"]}
    assert {"MAIL_SMTP_HOST", "MAIL_USERNAME", "MAIL_PASSWORD"} <= env
    assert_nothing_refused(op)


def test_cluster_wide_install_rbac(release: Release) -> None:
    # A second release watching every namespace (the default), with the first release's
    # CRD: the same rules, granted by a ClusterRole instead of Roles.
    kube, name, ns = release.kube, "mw-all", "mailwarden-all"
    sa = f"system:serviceaccount:{ns}:{name}-mailwarden"
    kube.helm(
        "install", name, str(CHART), "--namespace", ns, "--create-namespace",
        "--set", "crds.enabled=false", "--set", "webhook.url=https://127.0.0.1:9",
    )  # fmt: skip
    try:
        other = kube.create_namespace()

        def can_i(*args: str) -> bool:
            proc = kube.kubectl("auth", "can-i", f"--as={sa}", *args, check=False)
            return proc.stdout.strip() == "yes"

        assert can_i("list", "secrets", "--all-namespaces")
        assert can_i("delete", "secrets", "-n", other)
        assert can_i("patch", "mailaccounts.mailwarden.io", "--subresource=status", "-A")
        assert can_i("list", "pods", "--all-namespaces")
        assert not can_i("watch", "namespaces")  # kopf doesn't observe them in -A mode
        assert not can_i("delete", "mailaccounts.mailwarden.io", "-A")
        assert not can_i("create", "clusterroles")
        assert not can_i("patch", "pods", "-n", other)
    finally:
        kube.helm("uninstall", name, "--namespace", ns, check=False)

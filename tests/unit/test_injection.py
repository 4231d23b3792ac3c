"""injection.patch_ops (pure) applied to sample pods, and the admission handler's
decisions with a stub API client (no cluster)."""

from __future__ import annotations

import asyncio
import copy
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from mailwarden_operator import injection
from mailwarden_operator.handlers import injection as handler
from mailwarden_operator.injection import (
    Account,
    InjectionRefused,
    Options,
    SidecarMode,
    apply_ops,
    patch_ops,
)
from mailwarden_operator.kube import NotFound
from mailwarden_operator.metrics import OperatorMetrics
from mailwarden_operator.settings import OperatorSettings, SettingsError
from mailwarden_operator.spec import parse_spec

IMAGE = "registry.example/mailwarden/proxy:1.2.3"
OPTIONS = Options(image=IMAGE)
EXPECTED_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def spec(local: dict[str, Any] | None = None, **servers: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "provider": "microsoft",
        "username": "app@contoso.com",
        "oauth2": {
            "flow": "clientCredentials",
            "clientId": "cid",
            "tenantId": "contoso.onmicrosoft.com",
            "clientSecretRef": {"name": "app"},
        },
        **(servers or {"imap": {}, "smtp": {}}),
    }
    if local is not None:
        body["local"] = local
    return body


def account(name: str = "billing", **kwargs: Any) -> Account:
    return Account(name=name, spec=parse_spec(spec(**kwargs)), secret_name=f"{name}-proxy")


def pod(inject: str = "billing", *, namespace: str = "shop", **spec_fields: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "app",
            "namespace": namespace,
            "annotations": {injection.INJECT_ANNOTATION: inject},
        },
        "spec": {
            "containers": [
                {"name": "app", "image": "app:1"},
                {"name": "helper", "image": "helper:1", "env": [{"name": "X", "value": "1"}]},
            ],
            **spec_fields,
        },
    }


def injected(p: dict[str, Any], accounts: list[Account], options: Options = OPTIONS) -> Any:
    return apply_ops(copy.deepcopy(p), patch_ops(p, accounts, options))


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --------------------------------------------------------------------------- the patch


def test_native_sidecar_volume_env_and_status() -> None:
    out = injected(pod(), [account()])
    (sidecar,) = out["spec"]["initContainers"]
    assert sidecar["name"] == "mailwarden-proxy-billing"
    assert sidecar["image"] == IMAGE
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["mailwarden-proxy", "--config", "/etc/mailwarden/proxy.yaml"]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 9464}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9464}
    assert sidecar["volumeMounts"] == [
        {"name": "mailwarden-billing", "mountPath": "/etc/mailwarden", "readOnly": True}
    ]
    assert sidecar["ports"] == [{"name": "mw-metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert "lifecycle" not in sidecar
    assert out["spec"]["volumes"] == [
        {
            "name": "mailwarden-billing",
            "secret": {"secretName": "billing-proxy", "defaultMode": 0o444},
        }
    ]
    ref = {"secretKeyRef": {"name": "billing-proxy", "key": "username"}}
    for container in out["spec"]["containers"]:
        values = env(container)
        assert values["MAIL_IMAP_HOST"] == "127.0.0.1"
        assert values["MAIL_SMTP_HOST"] == "127.0.0.1"
        assert values["MAIL_IMAP_PORT"] == "1143"
        assert values["MAIL_SMTP_PORT"] == "1025"
        assert "MAIL_POP3_PORT" not in values  # the MailAccount serves no POP3
        assert values["MAIL_USERNAME"] == ref
        assert values["MAIL_PASSWORD"] == {
            "secretKeyRef": {"name": "billing-proxy", "key": "local-password"}
        }
    assert env(out["spec"]["containers"][1])["X"] == "1"
    assert out["metadata"]["annotations"][injection.STATUS_ANNOTATION] == "injected"
    assert "prometheus.io/scrape" not in out["metadata"]["annotations"]


def test_security_context_exact() -> None:
    out = injected(pod(), [account()])
    assert out["spec"]["initContainers"][0]["securityContext"] == EXPECTED_SECURITY_CONTEXT
    assert not any("emptyDir" in v for v in out["spec"]["volumes"])  # nothing writable


def test_annotation_keys_escaped_in_paths() -> None:
    ops = patch_ops(pod(), [account()], OPTIONS)
    paths = [op["path"] for op in ops if op["path"].startswith("/metadata")]
    assert paths == ["/metadata/annotations/mailwarden.io~1status"]
    assert injection.escape("a/b~c") == "a~1b~0c"
    assert all(op["op"] == "add" for op in ops)


def test_pod_without_annotations_gets_the_map() -> None:
    p = pod()
    del p["metadata"]["annotations"]
    ops = patch_ops(p, [account()], OPTIONS)
    assert ops[-1] == {
        "op": "add",
        "path": "/metadata/annotations",
        "value": {injection.STATUS_ANNOTATION: "injected"},
    }


def test_existing_init_containers_run_after_the_sidecar() -> None:
    p = pod(initContainers=[{"name": "migrate", "image": "m:1"}])
    out = injected(p, [account()])
    assert [c["name"] for c in out["spec"]["initContainers"]] == [
        "mailwarden-proxy-billing",
        "migrate",
    ]


def test_classic_sidecar_first_with_poststart_and_default_container() -> None:
    options = Options(image=IMAGE, mode=SidecarMode.CLASSIC)
    out = injected(pod(volumes=[{"name": "data", "emptyDir": {}}]), [account()], options)
    names = [c["name"] for c in out["spec"]["containers"]]
    assert names == ["mailwarden-proxy-billing", "app", "helper"]
    sidecar = out["spec"]["containers"][0]
    assert "restartPolicy" not in sidecar
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["python", "-c"] and hook[-1] == "9464"
    compile(hook[2], "<postStart>", "exec")
    assert "initContainers" not in out["spec"]
    # env went to the app containers, not to the sidecar inserted before them
    assert "MAIL_USERNAME" not in env(sidecar)
    assert all("MAIL_USERNAME" in env(c) for c in out["spec"]["containers"][1:])
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", "mailwarden-billing"]
    assert out["metadata"]["annotations"][injection.DEFAULT_CONTAINER_ANNOTATION] == "app"


def test_job_pods_native_completes_classic_warns() -> None:
    job_pod = pod(restartPolicy="Never")
    out = injected(job_pod, [account()])
    # the kubelet stops a restartPolicy: Always init container once the app has exited
    assert out["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert injection.advisories(job_pod, OPTIONS) == []
    classic = Options(image=IMAGE, mode=SidecarMode.CLASSIC)
    (warning,) = injection.advisories(job_pod, classic)
    assert "will not complete" in warning and "native" in warning


def test_env_set_by_the_app_is_kept() -> None:
    p = pod()
    p["spec"]["containers"][0]["env"] = [
        {"name": "MAIL_SMTP_HOST", "value": "smtp.internal"},
        {"name": "MAIL_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "own", "key": "pw"}}},
    ]
    out = injected(p, [account()])
    app = out["spec"]["containers"][0]
    names = [e["name"] for e in app["env"]]
    assert len(names) == len(set(names))
    assert env(app)["MAIL_SMTP_HOST"] == "smtp.internal"
    assert env(app)["MAIL_PASSWORD"] == {"secretKeyRef": {"name": "own", "key": "pw"}}
    assert env(app)["MAIL_SMTP_PORT"] == "1025"


def test_env_prefix_option() -> None:
    out = injected(pod(), [account()], Options(image=IMAGE, env_prefix="SMTP_RELAY_"))
    assert "SMTP_RELAY_SMTP_PORT" in env(out["spec"]["containers"][0])
    assert "MAIL_SMTP_PORT" not in env(out["spec"]["containers"][0])


def test_several_accounts() -> None:
    second = account("alerts.team", smtp={}, local={"smtpPort": 2025, "metricsPort": 9465})
    out = injected(pod("billing,alerts.team"), [account(), second])
    sidecars = out["spec"]["initContainers"]
    assert [c["name"] for c in sidecars] == [
        "mailwarden-proxy-billing",
        "mailwarden-proxy-alerts-team",
    ]
    assert [c["ports"][0]["name"] for c in sidecars] == ["mw-metrics", "mw-metrics-2"]
    assert [v["secret"]["secretName"] for v in out["spec"]["volumes"]] == [
        "billing-proxy",
        "alerts.team-proxy",
    ]
    values = env(out["spec"]["containers"][0])
    assert values["MAIL_SMTP_PORT"] == "1025"  # the first account, plain names
    assert values["MAIL_BILLING_SMTP_PORT"] == "1025"
    assert values["MAIL_ALERTS_TEAM_SMTP_PORT"] == "2025"
    assert "MAIL_ALERTS_TEAM_IMAP_PORT" not in values
    assert values["MAIL_ALERTS_TEAM_USERNAME"]["secretKeyRef"]["name"] == "alerts.team-proxy"


def test_scrape_annotations_unless_the_app_has_its_own() -> None:
    options = Options(image=IMAGE, scrape=True)
    notes = injected(pod(), [account()], options)["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/port"] == "9464"
    assert notes["prometheus.io/path"] == "/metrics"
    p = pod()
    p["metadata"]["annotations"]["prometheus.io/port"] = "8080"
    notes = injected(p, [account()], options)["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == "8080" and "prometheus.io/scrape" not in notes


def test_no_metrics_port_probes_the_listener() -> None:
    out = injected(pod(), [account(local={"metricsPort": 0})])
    sidecar = out["spec"]["initContainers"][0]
    assert sidecar["startupProbe"]["tcpSocket"] == {"port": 1143}
    assert "ports" not in sidecar and "livenessProbe" not in sidecar


def test_long_names_become_dns_labels() -> None:
    name = "a" * 60 + ".b"
    sidecar = injection.sidecar_name(name)
    assert len(sidecar) <= 63 and "." not in sidecar
    assert sidecar != injection.sidecar_name("a" * 60 + ".c")


def test_idempotent() -> None:
    once = injected(pod(), [account()])
    assert patch_ops(once, [account()], OPTIONS) == []
    assert injection.is_injected(once)


def test_matches_a_real_rfc6902_implementation() -> None:
    jsonpatch = pytest.importorskip("jsonpatch")  # kopf's own dependency
    for options in (OPTIONS, Options(image=IMAGE, mode=SidecarMode.CLASSIC, scrape=True)):
        p = pod(initContainers=[{"name": "init", "image": "i"}])
        ops = patch_ops(
            p,
            [
                account(),
                account("other", local={"imapPort": 2143, "smtpPort": 2025, "metricsPort": 9999}),
            ],
            options,
        )
        assert jsonpatch.apply_patch(p, ops) == apply_ops(copy.deepcopy(p), ops)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public"])
def test_system_namespaces_refused(namespace: str) -> None:
    with pytest.raises(InjectionRefused, match=namespace):
        injection.check_pod(namespace, pod(namespace=namespace))


def test_host_network_refused() -> None:
    with pytest.raises(InjectionRefused, match="hostNetwork"):
        injection.check_pod("shop", pod(hostNetwork=True))


def test_ports_colliding_between_accounts_refused() -> None:
    other = account("other")  # the same default local ports
    with pytest.raises(InjectionRefused) as exc:
        patch_ops(pod("billing,other"), [account(), other], OPTIONS)
    assert "'billing'" in exc.value.message and "'other'" in exc.value.message
    assert "1143" in exc.value.message


def test_port_colliding_with_the_app_refused() -> None:
    p = pod()
    p["spec"]["containers"][1]["ports"] = [{"containerPort": 1025}]
    with pytest.raises(InjectionRefused, match=r"1025.*'billing'.*container 'helper'"):
        patch_ops(p, [account()], OPTIONS)


def test_name_already_used_refused() -> None:
    p = pod()
    p["spec"]["containers"][0]["name"] = "mailwarden-proxy-billing"
    with pytest.raises(InjectionRefused, match="already used"):
        patch_ops(p, [account()], OPTIONS)


def test_names_colliding_after_mapping_refused() -> None:
    # "a-b" and "a.b" are distinct MailAccounts but one container name, one env stem
    a = account("a-b")
    b = account("a.b", local={"imapPort": 2143, "smtpPort": 2025, "metricsPort": 9999})
    with pytest.raises(InjectionRefused, match="mailwarden-proxy-a-b"):
        patch_ops(pod("a-b,a.b"), [a, b], OPTIONS)
    with pytest.raises(InjectionRefused, match="MAIL_A_B_"):
        injection.env_vars([a, b], "MAIL_")


@pytest.mark.parametrize("value", ["", " , ", "Bad_Name", "ok,-bad"])
def test_inject_annotation_must_name_accounts(value: str) -> None:
    with pytest.raises(InjectionRefused, match=injection.INJECT_ANNOTATION):
        injection.requested_accounts(pod(value))


def test_requested_accounts_in_order_deduplicated() -> None:
    assert injection.requested_accounts(pod(" b , a,b ")) == ["b", "a"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (injection.MODE_ANNOTATION, "sidecar"),
        (injection.ENV_PREFIX_ANNOTATION, "1X"),
        (injection.CPU_ANNOTATION, "lots"),
        (injection.MEMORY_ANNOTATION, "64 MB"),
        (injection.SCRAPE_ANNOTATION, "yes"),
    ],
)
def test_bad_pod_options_refused(key: str, value: str) -> None:
    p = pod()
    p["metadata"]["annotations"][key] = value
    with pytest.raises(InjectionRefused, match=key):
        injection.pod_options(p, OPTIONS)


def test_pod_options_override_defaults() -> None:
    p = pod()
    p["metadata"]["annotations"].update(
        {
            injection.MODE_ANNOTATION: "classic",
            injection.ENV_PREFIX_ANNOTATION: "SMTP_",
            injection.CPU_ANNOTATION: "200m",
            injection.MEMORY_ANNOTATION: "256Mi",
            injection.SCRAPE_ANNOTATION: "True",
        }
    )
    options = injection.pod_options(p, OPTIONS)
    assert options == Options(
        IMAGE, "IfNotPresent", "200m", "256Mi", "SMTP_", SidecarMode.CLASSIC, True
    )
    sidecar = injected(p, [account()], options)["spec"]["containers"][0]
    assert sidecar["resources"] == {
        "requests": {"cpu": "200m", "memory": "256Mi"},
        "limits": {"memory": "256Mi"},
    }


# --------------------------------------------------------------------------- the handler


class StubKube:
    def __init__(self, mailaccounts: dict[str, dict[str, Any]]) -> None:
        self.mailaccounts = mailaccounts
        self.events: list[tuple[dict[str, Any], str, str]] = []

    async def get_mailaccount(self, namespace: str, name: str) -> dict[str, Any]:
        if name not in self.mailaccounts:
            raise NotFound(404, "NotFound", f"mailaccounts {name!r} not found")
        return self.mailaccounts[name]

    async def create_event(self, obj: Any, *, reason: str, message: str, type: str) -> None:
        self.events.append((obj, reason, message))


def runtime(policy: str = "Fail", rendered: bool = True) -> Any:
    status = "True" if rendered else "False"
    ma = {
        "spec": spec(),
        "status": {
            "conditions": [
                {"type": "ConfigRendered", "status": status, "reason": "R", "message": "m"}
            ]
        },
    }
    settings = OperatorSettings(namespaces=("shop",), webhook_failure_policy=policy)
    return SimpleNamespace(
        kube=StubKube({"billing": ma}), settings=settings, metrics=OperatorMetrics()
    )


def mutate(rt: Any, p: dict[str, Any], dryrun: bool = False) -> tuple[kopf.Patch, list[str]]:
    patch, warnings = kopf.Patch(body=kopf.Body(p)), []
    logger = SimpleNamespace(info=lambda *a: None, warning=lambda *a: None)
    asyncio.run(
        handler.mutate(rt, body=p, patch=patch, warnings=warnings, dryrun=dryrun, logger=logger)
    )
    return patch, warnings


def test_handler_injects_through_kopf_patch() -> None:
    rt = runtime()
    patch, warnings = mutate(rt, pod())
    assert warnings == []
    ops = patch.as_json_patch()  # what kopf puts in the AdmissionReview response
    jsonpatch = pytest.importorskip("jsonpatch")
    out = jsonpatch.apply_patch(pod(), ops)
    assert out["spec"]["initContainers"][0]["name"] == "mailwarden-proxy-billing"
    assert out["metadata"]["annotations"][injection.STATUS_ANNOTATION] == "injected"


def test_handler_warns_while_the_secret_is_not_rendered() -> None:
    _, warnings = mutate(runtime(rendered=False), pod())
    (warning,) = warnings
    assert "billing-proxy" in warning and "not rendered" in warning


def test_handler_refuses_unknown_mailaccount_with_event() -> None:
    rt = runtime()
    p = pod("missing")
    p["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": "nightly",
            "uid": "u1",
            "controller": True,
        }
    ]
    with pytest.raises(kopf.AdmissionError) as exc:
        mutate(rt, p)
    assert "'missing'" in str(exc.value) and "'shop'" in str(exc.value)
    ((subject, reason, message),) = rt.kube.events
    assert subject["kind"] == "Job" and subject["metadata"]["name"] == "nightly"
    assert reason == "InjectionRefused" and "'missing'" in message


def test_handler_ignore_policy_admits_with_warning() -> None:
    rt = runtime("Ignore")
    patch, warnings = mutate(rt, pod("missing"))
    assert not patch.as_json_patch()
    assert "NOT injected" in warnings[0] and "'missing'" in warnings[0]
    assert rt.kube.events[0][1] == "NotInjected"


def test_handler_dry_run_posts_no_event() -> None:
    rt = runtime()
    with pytest.raises(kopf.AdmissionError):
        mutate(rt, pod("missing"), dryrun=True)
    assert rt.kube.events == []


def test_handler_refuses_unwatched_namespace_and_kube_system() -> None:
    for namespace, match in (("other", "not watched"), ("kube-system", "kube-system")):
        with pytest.raises(kopf.AdmissionError, match=match):
            mutate(runtime(), pod(namespace=namespace))


def test_handler_leaves_injected_pods_alone() -> None:
    rt = runtime()
    p = pod("missing")  # would be refused, were it not injected already
    p["metadata"]["annotations"][injection.STATUS_ANNOTATION] = "injected"
    patch, warnings = mutate(rt, p)
    assert not patch.as_json_patch() and warnings == [] and rt.kube.events == []


def test_periodic_check_counts_only_running_uninjected_pods() -> None:
    base = {"metadata": {"annotations": {injection.INJECT_ANNOTATION: "billing"}}}
    assert handler._runs_without_sidecar(base)
    assert not handler._runs_without_sidecar({**base, "status": {"phase": "Succeeded"}})
    assert not handler._runs_without_sidecar(
        {"metadata": {**base["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    )
    done = {"metadata": {"annotations": {injection.STATUS_ANNOTATION: "injected"}}}
    assert not handler._runs_without_sidecar(done)


# --------------------------------------------------------------------------- settings


def test_webhook_and_proxy_settings() -> None:
    defaults = OperatorSettings.from_env({})
    assert (defaults.webhook_host, defaults.webhook_port) == ("0.0.0.0", 9443)
    assert defaults.webhook_cert_file is None and defaults.webhook_managed is None
    assert defaults.webhook_failure_policy == "Fail"
    assert defaults.proxy_image.startswith("ghcr.io/mailwarden/proxy:")
    assert defaults.injection_check_interval == 300
    custom = OperatorSettings.from_env(
        {
            "MAILWARDEN_WEBHOOK_FAILURE_POLICY": "Ignore",
            "MAILWARDEN_PROXY_IMAGE": IMAGE,
            "MAILWARDEN_INJECTION_CHECK_INTERVAL": "2s",
            "MAILWARDEN_PROXY_MEMORY": "96Mi",
        }
    )
    assert custom.webhook_failure_policy == "Ignore" and custom.proxy_image == IMAGE
    assert custom.injection_check_interval == 2 and custom.proxy_memory == "96Mi"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MAILWARDEN_WEBHOOK_FAILURE_POLICY", "ignore"),
        ("MAILWARDEN_PROXY_IMAGE_PULL_POLICY", "Sometimes"),
        ("MAILWARDEN_PROXY_CPU", "fast"),
        ("MAILWARDEN_WEBHOOK_CERT_FILE", "/nonexistent/tls.crt"),
        ("MAILWARDEN_WEBHOOK_MANAGED", "Not A Name"),
        ("MAILWARDEN_WEBHOOK_MANAGED", "nodots"),
    ],
)
def test_bad_webhook_settings(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        OperatorSettings.from_env({variable: value})


def test_webhook_tls_files_come_in_pairs(tmp_path: Any) -> None:
    cert = tmp_path / "tls.crt"
    cert.write_text("x")
    with pytest.raises(SettingsError, match="WEBHOOK_KEY_FILE"):
        OperatorSettings.from_env({"MAILWARDEN_WEBHOOK_CERT_FILE": str(cert)})

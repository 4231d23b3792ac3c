"""Sidecar injection, pure: a Pod + its MailAccounts + options -> JSON-patch operations.

The admission handler (``handlers/injection.py``) looks the MailAccounts up and turns
:class:`InjectionRefused` into a refusal; everything decided about the Pod is decided here,
on plain dicts. A patch (``add`` operations only, applied in order) adds env vars to every
app container (names the container sets in ``env`` are kept: explicit beats injected), a
read-only volume of each MailAccount's rendered Secret, one proxy sidecar per MailAccount
(native: first init containers with ``restartPolicy: Always``; classic: first containers)
and the annotations (``mailwarden.io/status: injected``, optional ``prometheus.io/*``).
The env ops come first: classic sidecars are inserted before the app containers and would
shift the indexes the env ops point at. ``docs/operator-internals.md`` has the contract.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from mailwarden_operator import render
from mailwarden_operator.spec import MailAccountSpec

JsonObject = dict[str, Any]
Op = dict[str, Any]

INJECT_ANNOTATION = "mailwarden.io/inject"
STATUS_ANNOTATION = "mailwarden.io/status"
INJECTED = "injected"
MODE_ANNOTATION = "mailwarden.io/sidecar-mode"
ENV_PREFIX_ANNOTATION = "mailwarden.io/env-prefix"
CPU_ANNOTATION = "mailwarden.io/proxy-cpu"
MEMORY_ANNOTATION = "mailwarden.io/proxy-memory"
SCRAPE_ANNOTATION = "mailwarden.io/prometheus-scrape"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
PROMETHEUS_ANNOTATIONS = ("prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path")
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public"})
SIDECAR_PREFIX = "mailwarden-proxy-"
VOLUME_PREFIX = "mailwarden-"
METRICS_PORT_NAME = "mw-metrics"
PROXY_UID = 65532  # the distroless "nonroot" uid; the proxy image runs as it too

SECURITY_CONTEXT: JsonObject = {
    "runAsNonRoot": True,
    "runAsUser": PROXY_UID,
    "runAsGroup": PROXY_UID,
    "readOnlyRootFilesystem": True,  # tokens live in memory; nothing is written
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

# Classic mode's postStart hook: poll /readyz for up to a minute. Python is in the proxy
# image anyway; no proxy environment variables may capture a loopback request.
_WAIT_READY = (
    "import sys,time,urllib.request as u\no=u.build_opener(u.ProxyHandler({}))\n"
    "for _ in range(600):\n try:\n  o.open('http://127.0.0.1:%s/readyz'%sys.argv[1],timeout=1)"
    ";sys.exit(0)\n except Exception:\n  time.sleep(0.1)\nsys.exit(1)\n"
)
_MA_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_ENV_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODE = re.compile(r"native|classic")
_BOOL = re.compile(r"(?i)true|false")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_DNS_LABEL_MAX = 63


class InjectionRefused(Exception):
    """The pod can't get the sidecar; ``message`` says why, for the person creating it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SidecarMode(StrEnum):
    NATIVE = "native"
    CLASSIC = "classic"


@dataclass(frozen=True)
class Account:
    """A MailAccount the pod asked for: its name, parsed spec and rendered Secret."""

    name: str
    spec: MailAccountSpec
    secret_name: str

    def ports(self) -> list[tuple[int, str]]:
        """(port, use) of every local listener the sidecar opens."""
        local = self.spec.local
        out = [(local.port_for(s.protocol), s.protocol.value) for s in self.spec.servers()]
        if local.metrics_port:
            out.append((local.metrics_port, "metrics"))
        return out


@dataclass(frozen=True)
class Options:
    """Operator-wide defaults (settings), some overridable per pod by annotation."""

    image: str
    pull_policy: str = "IfNotPresent"
    cpu: str = "50m"
    memory: str = "128Mi"
    env_prefix: str = "MAIL_"
    mode: SidecarMode = SidecarMode.NATIVE
    scrape: bool = False


def pod_annotations(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return (pod.get("metadata") or {}).get("annotations") or {}


def is_injected(pod: Mapping[str, Any]) -> bool:
    return pod_annotations(pod).get(STATUS_ANNOTATION) == INJECTED


def requested_accounts(pod: Mapping[str, Any]) -> list[str]:
    """The MailAccount names of ``mailwarden.io/inject`` (comma-separated, in order)."""
    raw = pod_annotations(pod).get(INJECT_ANNOTATION, "")
    names = list(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    if not names or not all(_MA_NAME.fullmatch(n) for n in names):
        raise InjectionRefused(f"annotation {INJECT_ANNOTATION}: {raw!r} is not a list of names")
    return names


def check_pod(namespace: str, pod: Mapping[str, Any]) -> None:
    """Refusals that need no MailAccount."""
    if namespace in SYSTEM_NAMESPACES:
        raise InjectionRefused(f"no mail proxy injection in namespace {namespace}")
    if (pod.get("spec") or {}).get("hostNetwork"):
        # 127.0.0.1 would be the node's loopback, shared with every host-network pod.
        raise InjectionRefused("no mail proxy injection into hostNetwork pods")


def pod_options(pod: Mapping[str, Any], defaults: Options) -> Options:
    """``defaults`` with the pod's ``mailwarden.io/*`` overrides applied and checked."""
    notes = pod_annotations(pod)
    mode = _checked(notes, MODE_ANNOTATION, _MODE, "native|classic")
    prefix = _checked(notes, ENV_PREFIX_ANNOTATION, _ENV_PREFIX, "an env var name prefix")
    cpu = _checked(notes, CPU_ANNOTATION, QUANTITY, "a quantity (50m)")
    memory = _checked(notes, MEMORY_ANNOTATION, QUANTITY, "a quantity (128Mi)")
    scrape = _checked(notes, SCRAPE_ANNOTATION, _BOOL, "true|false")
    return replace(
        defaults,
        mode=SidecarMode(mode) if mode else defaults.mode,
        env_prefix=defaults.env_prefix if prefix is None else prefix,
        cpu=cpu or defaults.cpu,
        memory=memory or defaults.memory,
        scrape=defaults.scrape if scrape is None else scrape.lower() == "true",
    )


def _checked(notes: Mapping[str, str], key: str, pattern: re.Pattern[str], what: str) -> str | None:
    if key not in notes:
        return None
    value = notes[key].strip()
    if not pattern.fullmatch(value):
        raise InjectionRefused(f"annotation {key}: {value!r} is not {what}")
    return value


def dns_label(prefix: str, name: str) -> str:
    """``prefix + name`` as a container/volume name: a DNS label (no dots, <= 63)."""
    label = (prefix + name).replace(".", "-")
    if len(label) <= _DNS_LABEL_MAX:
        return label
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{label[: _DNS_LABEL_MAX - 9].rstrip('-')}-{digest}"


def sidecar_name(ma: str) -> str:
    return dns_label(SIDECAR_PREFIX, ma)


def volume_name(ma: str) -> str:
    return dns_label(VOLUME_PREFIX, ma)


def escape(token: str) -> str:
    """One JSON-pointer reference token (RFC 6901): ``~`` -> ``~0``, ``/`` -> ``~1``."""
    return token.replace("~", "~0").replace("/", "~1")


def _containers(pod: Mapping[str, Any], key: str) -> list[JsonObject]:
    return list((pod.get("spec") or {}).get(key) or [])


def _all_containers(pod: Mapping[str, Any]) -> list[JsonObject]:
    return _containers(pod, "initContainers") + _containers(pod, "containers")


def _check_ports(pod: Mapping[str, Any], accounts: Sequence[Account]) -> None:
    taken: dict[int, str] = {}
    for c in _all_containers(pod):
        for p in c.get("ports") or []:
            taken.setdefault(p.get("containerPort"), f"container {c.get('name')!r}")
    for acc in accounts:
        for port, use in acc.ports():
            owner = f"MailAccount {acc.name!r} ({use})"
            if port in taken:
                raise InjectionRefused(f"local port {port}: {owner} collides with {taken[port]}")
            taken[port] = owner


def _check_names(pod: Mapping[str, Any], accounts: Sequence[Account]) -> None:
    used = {c.get("name") for c in _all_containers(pod)}
    used |= {v.get("name") for v in (pod.get("spec") or {}).get("volumes") or []}
    for acc in accounts:
        for name in (sidecar_name(acc.name), volume_name(acc.name)):
            if name in used:
                raise InjectionRefused(f"{name!r} (for MailAccount {acc.name!r}) is already used")
            used.add(name)


def env_ident(ma: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", ma).upper()


def env_vars(accounts: Sequence[Account], prefix: str) -> list[JsonObject]:
    """The first account under the plain names; with several, each also under
    ``<prefix><MA>_``. Only protocols the MailAccount serves get HOST/PORT."""
    out: list[JsonObject] = []
    for i, acc in enumerate(accounts):
        stems = [prefix] if i == 0 else []
        if len(accounts) > 1:
            stems.append(f"{prefix}{env_ident(acc.name)}_")
        for stem in stems:
            for server in acc.spec.servers():
                proto = server.protocol.value.upper()
                port = acc.spec.local.port_for(server.protocol)
                out.append({"name": f"{stem}{proto}_HOST", "value": render.LISTEN_ADDRESS})
                out.append({"name": f"{stem}{proto}_PORT", "value": str(port)})
            for var, key in (("USERNAME", render.USERNAME_KEY), ("PASSWORD", render.PASSWORD_KEY)):
                ref = {"secretKeyRef": {"name": acc.secret_name, "key": key}}
                out.append({"name": f"{stem}{var}", "valueFrom": ref})
    seen: set[str] = set()
    for item in out:
        if item["name"] in seen:
            raise InjectionRefused(f"two MailAccounts map to the env var {item['name']}")
        seen.add(item["name"])
    return out


def _probe(acc: Account) -> JsonObject:
    metrics = acc.spec.local.metrics_port
    if metrics:
        return {"httpGet": {"path": "/readyz", "port": metrics}}
    # No HTTP endpoint: a TCP connect to the first listener says it is bound.
    return {"tcpSocket": {"port": acc.ports()[0][0]}}


def sidecar(acc: Account, options: Options, port_name: str | None) -> JsonObject:
    """The proxy container for one MailAccount (mode-specific fields included)."""
    memory = options.memory
    container: JsonObject = {
        "name": sidecar_name(acc.name),
        "image": options.image,
        "imagePullPolicy": options.pull_policy,
        "command": ["mailwarden-proxy", "--config", f"{render.MOUNT_PATH}/{render.CONFIG_KEY}"],
        # Mounted whole (no subPath) so Secret updates reach the proxy's file watcher;
        # at MOUNT_PATH itself because the rendered config points at files there.
        "volumeMounts": [
            {"name": volume_name(acc.name), "mountPath": render.MOUNT_PATH, "readOnly": True}
        ],
        # No CPU limit: throttling a relay adds latency to every mail session.
        "resources": {
            "requests": {"cpu": options.cpu, "memory": memory},
            "limits": {"memory": memory},
        },
        "securityContext": copy.deepcopy(SECURITY_CONTEXT),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "startupProbe": {**_probe(acc), "periodSeconds": 1, "failureThreshold": 120},
    }
    metrics = acc.spec.local.metrics_port
    if metrics:
        port: JsonObject = {"containerPort": metrics, "protocol": "TCP"}
        if port_name:
            port = {"name": port_name, **port}
        container["ports"] = [port]
        container["readinessProbe"] = {**_probe(acc), "periodSeconds": 10}
        container["livenessProbe"] = {
            "httpGet": {"path": "/healthz", "port": metrics},
            "periodSeconds": 10,
            "failureThreshold": 3,
        }
    if options.mode is SidecarMode.NATIVE:
        container["restartPolicy"] = "Always"
    elif metrics:
        wait = ["python", "-c", _WAIT_READY, str(metrics)]
        container["lifecycle"] = {"postStart": {"exec": {"command": wait}}}
    return container


def _add_to_list(path: str, present: bool, items: Sequence[Any], at: int | None) -> list[Op]:
    """Ops adding ``items`` to the list at ``path``: created whole if absent, else
    inserted from index ``at`` (or appended)."""
    if not items:
        return []
    if not present:
        return [{"op": "add", "path": path, "value": list(items)}]
    if at is None:
        return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]
    return [{"op": "add", "path": f"{path}/{at + i}", "value": v} for i, v in enumerate(items)]


def patch_ops(pod: Mapping[str, Any], accounts: Sequence[Account], options: Options) -> list[Op]:
    """The JSON patch injecting ``accounts`` into ``pod``; ``[]`` if already injected."""
    if is_injected(pod):
        return []
    if not accounts:
        raise InjectionRefused("no MailAccount to inject")
    _check_ports(pod, accounts)
    _check_names(pod, accounts)
    spec = pod.get("spec") or {}
    ops: list[Op] = []

    wanted = env_vars(accounts, options.env_prefix)
    app = _containers(pod, "containers")
    for i, container in enumerate(app):
        env = container.get("env") or []
        own = {e.get("name") for e in env}
        new = [var for var in wanted if var["name"] not in own]
        ops += _add_to_list(f"/spec/containers/{i}/env", "env" in container, new, None)

    volumes = [
        {"name": volume_name(a.name), "secret": {"secretName": a.secret_name, "defaultMode": 0o444}}
        for a in accounts
    ]
    ops += _add_to_list("/spec/volumes", "volumes" in spec, volumes, None)

    port_names = {p.get("name") for c in _all_containers(pod) for p in c.get("ports") or []}
    sidecars = []
    for i, acc in enumerate(accounts):
        name = METRICS_PORT_NAME if i == 0 else f"{METRICS_PORT_NAME}-{i + 1}"
        sidecars.append(sidecar(acc, options, None if name in port_names else name))
    key = "initContainers" if options.mode is SidecarMode.NATIVE else "containers"
    ops += _add_to_list(f"/spec/{key}", key in spec, sidecars, 0)

    ops += _annotation_ops(pod, accounts, options, app)
    return ops


def _annotation_ops(
    pod: Mapping[str, Any], accounts: Sequence[Account], options: Options, app: list[JsonObject]
) -> list[Op]:
    notes = pod_annotations(pod)
    add: dict[str, str] = {STATUS_ANNOTATION: INJECTED}
    metrics = [a.spec.local.metrics_port for a in accounts if a.spec.local.metrics_port]
    # The app may be scraped already: its own prometheus.io/* annotations win. One port
    # only can be advertised; a PodMonitor on the mw-metrics* port names sees them all.
    if options.scrape and metrics and not any(k in notes for k in PROMETHEUS_ANNOTATIONS):
        add |= dict(zip(PROMETHEUS_ANNOTATIONS, ("true", str(metrics[0]), "/metrics"), strict=True))
    if options.mode is SidecarMode.CLASSIC and app and DEFAULT_CONTAINER_ANNOTATION not in notes:
        add[DEFAULT_CONTAINER_ANNOTATION] = str(app[0].get("name"))
    if not (pod.get("metadata") or {}).get("annotations"):
        return [{"op": "add", "path": "/metadata/annotations", "value": add}]
    return [
        {"op": "add", "path": f"/metadata/annotations/{escape(k)}", "value": v}
        for k, v in add.items()
    ]


def advisories(pod: Mapping[str, Any], options: Options) -> list[str]:
    """Warnings for the admission response: things that work, but not as hoped."""
    restart = (pod.get("spec") or {}).get("restartPolicy", "Always")
    if options.mode is SidecarMode.CLASSIC and restart != "Always":
        return [
            f"classic mail proxy sidecar never exits: this pod (restartPolicy {restart}) "
            "will not complete; use mailwarden.io/sidecar-mode: native"
        ]
    return []


def apply_ops(doc: JsonObject, ops: Sequence[Op]) -> JsonObject:
    """Apply ``add`` operations (all :func:`patch_ops` makes) to ``doc`` in place. The
    admission handler hands this to kopf, which computes the JSON patch it returns."""
    for op in ops:
        if op.get("op") != "add":
            raise ValueError(f"only 'add' operations are supported, not {op.get('op')!r}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
        *parents, last = tokens
        target: Any = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        value = copy.deepcopy(op["value"])
        if isinstance(target, list):
            if last == "-":
                target.append(value)
            else:
                target.insert(int(last), value)
        else:
            target[last] = value
    return doc

"""Operator settings, read once from ``MAILWARDEN_*`` environment variables.

Every setting has a default that works for a single-replica operator in its own
namespace, so a Deployment needs no environment at all; a bad value fails at start-up
with :class:`SettingsError` naming the variable, rather than later in a handler.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

PREFIX = "MAILWARDEN_"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
# Kubernetes resource quantities as the sidecar uses them (no exponents).
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


class SettingsError(ValueError):
    """A ``MAILWARDEN_*`` variable holds a value the operator can't use."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator is configured with. Field docs name the environment variable."""

    namespaces: tuple[str, ...] = ()
    """``MAILWARDEN_NAMESPACES``: comma-separated namespaces to watch; empty or ``*``
    watches all (cluster-wide RBAC needed then)."""

    external_base_url: str | None = None
    """``MAILWARDEN_EXTERNAL_BASE_URL``: how browsers reach the operator's consent
    server, e.g. ``https://mail-admin.example.com/mailwarden`` (the callback is
    ``<base>/oauth2/callback``). Unset: the authorization-code flow is unavailable."""

    # In a pod the probes and browsers come from outside: all interfaces is the point.
    consent_host: str = "0.0.0.0"  # noqa: S104
    """``MAILWARDEN_CONSENT_HOST``: listen address of the consent/callback server."""

    consent_port: int = 8080
    """``MAILWARDEN_CONSENT_PORT``: its port."""

    metrics_host: str = "0.0.0.0"  # noqa: S104
    """``MAILWARDEN_METRICS_HOST``: listen address of /metrics, /healthz, /readyz."""

    metrics_port: int = 8081
    """``MAILWARDEN_METRICS_PORT``: their port; 0 disables that server."""

    check_credentials: bool = True
    """``MAILWARDEN_CHECK_CREDENTIALS``: acquire a token once when a MailAccount or its
    Secrets change, and report the outcome in the ``Authorized`` condition."""

    refresh_interval: float = 86400.0
    """``MAILWARDEN_REFRESH_INTERVAL``: seconds (or ``30m``, ``12h``, ``7d``) between
    keep-alive refreshes of stored refresh tokens. Providers revoke unused ones (Google
    "testing" apps after 7 days, Microsoft after 90 days), so a day is plenty."""

    token_ca_file: str | None = None
    """``MAILWARDEN_TOKEN_CA_FILE``: an extra CA bundle (PEM) for identity providers behind
    a private CA; the system trust store is used as well."""

    webhook_host: str = "0.0.0.0"  # noqa: S104
    """``MAILWARDEN_WEBHOOK_HOST``: listen address of the admission webhook server (HTTPS;
    the apiserver calls ``/inject-proxy``)."""

    webhook_port: int = 9443
    """``MAILWARDEN_WEBHOOK_PORT``: its port."""

    webhook_cert_file: str | None = None
    """``MAILWARDEN_WEBHOOK_CERT_FILE``: its serving certificate (PEM; cert-manager's or the
    chart's ``tls.crt``), re-read when the file changes. Unset (and no
    ``MAILWARDEN_WEBHOOK_MANAGED``): no webhook server, so no injection."""

    webhook_key_file: str | None = None
    """``MAILWARDEN_WEBHOOK_KEY_FILE``: its private key (PEM); set both or neither."""

    webhook_managed: str | None = None
    """``MAILWARDEN_WEBHOOK_MANAGED``: development without the chart: kopf creates and
    keeps the MutatingWebhookConfiguration of this name itself (``failurePolicy: Ignore``,
    every pod of the cluster; self-signed certificate if no cert files are set, which needs
    ``kopf[dev]``). A name with a dot (``dev.mailwarden.io``): kopf names the webhook
    ``inject-proxy.<name>``. Leave unset when the chart owns the configuration."""

    webhook_failure_policy: str = "Fail"
    """``MAILWARDEN_WEBHOOK_FAILURE_POLICY``: ``Fail`` or ``Ignore``, the same value as the
    MutatingWebhookConfiguration's. An answer the webhook gives is never subject to that
    policy, so the operator must know it: ``Fail`` refuses pods it can't inject (the
    message says why); ``Ignore`` admits them without the sidecar, with a warning and a
    Warning Event (the periodic check reports them too)."""

    proxy_image: str = "ghcr.io/mailwarden/proxy:0.1.0"
    """``MAILWARDEN_PROXY_IMAGE``: the injected sidecar's image."""

    proxy_image_pull_policy: str = "IfNotPresent"
    """``MAILWARDEN_PROXY_IMAGE_PULL_POLICY``: ``Always``, ``IfNotPresent`` or ``Never``."""

    proxy_cpu: str = "50m"
    """``MAILWARDEN_PROXY_CPU``: the sidecar's CPU request (no limit: throttling a relay
    adds latency to every session); per pod ``mailwarden.io/proxy-cpu``."""

    proxy_memory: str = "128Mi"
    """``MAILWARDEN_PROXY_MEMORY``: the sidecar's memory request and limit; per pod
    ``mailwarden.io/proxy-memory``."""

    injection_check_interval: float = 300.0
    """``MAILWARDEN_INJECTION_CHECK_INTERVAL``: seconds (or ``5m``) between checks for pods
    that asked for the sidecar but were admitted without it."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def callback_url(self) -> str | None:
        """The OAuth 2.0 redirect URI to register with the identity provider."""
        return f"{self.external_base_url}/oauth2/callback" if self.external_base_url else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read the settings from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        defaults = cls()

        def get(name: str) -> str | None:
            value = env.get(PREFIX + name, "").strip()
            return value or None

        cert = _existing_file("WEBHOOK_CERT_FILE", get("WEBHOOK_CERT_FILE"))
        key = _existing_file("WEBHOOK_KEY_FILE", get("WEBHOOK_KEY_FILE"))
        if (cert is None) != (key is None):
            missing = "WEBHOOK_KEY_FILE" if key is None else "WEBHOOK_CERT_FILE"
            raise SettingsError(PREFIX + missing, "set both webhook TLS files or neither")
        return cls(
            namespaces=_namespaces(get("NAMESPACES")),
            external_base_url=_base_url(get("EXTERNAL_BASE_URL")),
            consent_host=get("CONSENT_HOST") or defaults.consent_host,
            consent_port=_port("CONSENT_PORT", get("CONSENT_PORT"), defaults.consent_port),
            metrics_host=get("METRICS_HOST") or defaults.metrics_host,
            metrics_port=_port("METRICS_PORT", get("METRICS_PORT"), defaults.metrics_port),
            check_credentials=_bool(
                "CHECK_CREDENTIALS", get("CHECK_CREDENTIALS"), defaults.check_credentials
            ),
            refresh_interval=_duration(
                "REFRESH_INTERVAL", get("REFRESH_INTERVAL"), defaults.refresh_interval
            ),
            token_ca_file=_existing_file("TOKEN_CA_FILE", get("TOKEN_CA_FILE")),
            webhook_host=get("WEBHOOK_HOST") or defaults.webhook_host,
            webhook_port=_port("WEBHOOK_PORT", get("WEBHOOK_PORT"), defaults.webhook_port),
            webhook_cert_file=cert,
            webhook_key_file=key,
            webhook_managed=_webhook_config_name("WEBHOOK_MANAGED", get("WEBHOOK_MANAGED")),
            webhook_failure_policy=_choice(
                "WEBHOOK_FAILURE_POLICY",
                get("WEBHOOK_FAILURE_POLICY"),
                ("Fail", "Ignore"),
                defaults.webhook_failure_policy,
            ),
            proxy_image=get("PROXY_IMAGE") or defaults.proxy_image,
            proxy_image_pull_policy=_choice(
                "PROXY_IMAGE_PULL_POLICY",
                get("PROXY_IMAGE_PULL_POLICY"),
                ("Always", "IfNotPresent", "Never"),
                defaults.proxy_image_pull_policy,
            ),
            proxy_cpu=_quantity("PROXY_CPU", get("PROXY_CPU"), defaults.proxy_cpu),
            proxy_memory=_quantity("PROXY_MEMORY", get("PROXY_MEMORY"), defaults.proxy_memory),
            injection_check_interval=_duration(
                "INJECTION_CHECK_INTERVAL",
                get("INJECTION_CHECK_INTERVAL"),
                defaults.injection_check_interval,
            ),
        )


def _namespaces(value: str | None) -> tuple[str, ...]:
    if value is None or value == "*":
        return ()
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    for name in names:
        if not _NAMESPACE.match(name):
            raise SettingsError(PREFIX + "NAMESPACES", f"{name!r} is not a namespace name")
    return names


def _base_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError(PREFIX + "EXTERNAL_BASE_URL", f"{value!r} is not an http(s) URL")
    if parts.query or parts.fragment:
        raise SettingsError(
            PREFIX + "EXTERNAL_BASE_URL", "must not carry a query or fragment (it is a prefix)"
        )
    return value.rstrip("/")


def _webhook_config_name(name: str, value: str | None) -> str | None:
    if value is not None and not _DNS_NAME.match(value):
        raise SettingsError(PREFIX + name, f"{value!r} is not an object name")
    if value is not None and "." not in value:
        # kopf names the webhook "<handler id>.<this name>", and the apiserver wants
        # webhook names with at least three dot-separated parts.
        raise SettingsError(PREFIX + name, f"{value!r} needs a dot (dev.mailwarden.io)")
    return value


def _choice(name: str, value: str | None, choices: tuple[str, ...], default: str) -> str:
    if value is None:
        return default
    if value not in choices:
        raise SettingsError(PREFIX + name, f"{value!r} is not one of {', '.join(choices)}")
    return value


def _quantity(name: str, value: str | None, default: str) -> str:
    if value is None:
        return default
    if not _QUANTITY.fullmatch(value):
        raise SettingsError(PREFIX + name, f"{value!r} is not a quantity (50m, 128Mi)")
    return value


def _existing_file(name: str, value: str | None) -> str | None:
    if value is not None and not os.path.isfile(value):
        raise SettingsError(PREFIX + name, f"{value!r} is not a readable file")
    return value


def _port(name: str, value: str | None, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise SettingsError(PREFIX + name, f"{value!r} is not a port number (0-65535)")
    return int(value)


def _bool(name: str, value: str | None, default: bool) -> bool:
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(PREFIX + name, f"{value!r} is not a boolean (true/false)")


def _duration(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    match = _DURATION.match(value)
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise SettingsError(PREFIX + name, f"{value!r} is not a positive duration (60, 30m, 12h)")
    return seconds

"""ProxyConfig -> the native YAML schema (the inverse of `native.from_dict`).

`--check` prints this with secrets masked, which also makes it the migration path from
an emailproxy file; the operator can render with `mask=False`.
"""

from __future__ import annotations

from typing import Any

from mailwarden_proxy.config.model import (
    Account,
    Limits,
    Listener,
    MailProtocol,
    OAuth2,
    ProxyConfig,
)
from mailwarden_proxy.config.native import VERSION
from mailwarden_proxy.secret import Secret

MASK = "****"


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _secret(value: Secret | None, mask: bool) -> str | None:
    if value is None:
        return None
    return MASK if mask else value.reveal()


def _listener(listener: Listener) -> dict[str, Any]:
    up = listener.upstream
    return {
        "name": listener.name,
        "protocol": listener.protocol.value,
        "local": _drop_none(
            {
                "address": listener.local_address,
                "port": listener.local_port,
                "tls": listener.local_tls.value,
                "certificateFile": listener.local_certificate,
                "keyFile": listener.local_key,
            }
        ),
        "upstream": _drop_none(
            {
                "host": up.host,
                "port": up.port,
                "tls": up.tls.value,
                "caFile": up.ca_file,
                "allowInsecure": up.allow_insecure,
            }
        ),
    }


def _oauth2(o: OAuth2, mask: bool) -> dict[str, Any]:
    return _drop_none(
        {
            "provider": o.provider.value,
            "flow": o.flow.value,
            "tenantId": o.tenant_id,
            "tokenUrl": o.token_url,
            "authorizeUrl": o.authorize_url,
            "clientId": o.client_id or None,
            "clientSecret": _secret(o.client_secret, mask),
            "clientCertificateFile": o.client_certificate_path,
            "clientKeyFile": o.client_key_path,
            "serviceAccountKey": _secret(o.service_account_key, mask),
            "subject": o.subject,
            "refreshToken": _secret(o.refresh_token, mask),
            "password": _secret(o.password, mask),
            "scopes": list(o.scopes),
            "redirectUri": o.redirect_uri,
            "usePkce": o.use_pkce,
            "caFile": o.ca_file,
        }
    )


def _account(a: Account, mask: bool) -> dict[str, Any]:
    return _drop_none(
        {
            "username": a.username,
            "localPassword": _secret(a.local_password, mask),
            "mechanism": a.mechanism.value,
            "upstreamUsername": a.upstream_username,
            "oauth2": _oauth2(a.oauth2, mask),
        }
    )


def to_native(config: ProxyConfig, *, mask: bool = True) -> dict[str, Any]:
    """The configuration as a native document; every default spelled out, except the
    limits added after the first release (`_later_limits`)."""
    limits = config.limits
    return {
        "version": VERSION,
        "listeners": [_listener(listener) for listener in config.listeners],
        "accounts": [_account(a, mask) for a in config.accounts],
        "metrics": {"address": config.metrics.address, "port": config.metrics.port},
        "limits": {
            "maxLineLength": limits.max_line,
            "maxLiteralLength": limits.max_literal,
            "connectTimeoutSeconds": limits.connect_timeout,
            "loginTimeoutSeconds": limits.login_timeout,
            **_later_limits(limits),
        },
        "cacheStore": config.cache_store,
    }


def _later_limits(limits: Limits) -> dict[str, Any]:
    """The limits an older proxy doesn't know, only where they differ from the default.

    The operator renders every sidecar's file with this: during an upgrade, a file from
    the new operator must still load in a sidecar of the previous version, which refuses
    unknown keys."""
    default = Limits()
    later: dict[str, Any] = {}
    if limits.max_connections != default.max_connections:
        later["maxConnectionsPerListener"] = limits.max_connections
    idle = {p.value: limits.idle_timeout(p) for p in MailProtocol}
    if idle != {p.value: default.idle_timeout(p) for p in MailProtocol}:
        later["idleTimeoutSeconds"] = idle
    failed = {
        "burst": limits.failed_login_burst,
        "perMinute": limits.failed_logins_per_minute,
        "delaySeconds": limits.failed_login_delay,
    }
    if (limits.failed_login_burst, limits.failed_logins_per_minute, limits.failed_login_delay) != (
        default.failed_login_burst,
        default.failed_logins_per_minute,
        default.failed_login_delay,
    ):
        later["failedLocalLogins"] = failed
    return later

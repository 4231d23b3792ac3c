"""Cross-field validation and preset completion, shared by both loaders.

Loaders turn their syntax into model objects; the rules about what a listener or an
account needs live here once. Field names in errors stay in the user's vocabulary: each
loader passes a `Namer` that turns a model path ("upstream.tls", "oauth2.client_secret")
into its own spelling (`listeners[0].upstream.tls`, `[@] client_secret`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import replace

from mailwarden_proxy.config import presets
from mailwarden_proxy.config.common import Warnings, check_readable, check_url
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    LocalTLS,
    Metrics,
    OAuth2,
    ProviderKind,
    UpstreamTLS,
)

Namer = Callable[[str], str]

_FORBIDDEN_IN_NAMES = frozenset(" \t\r\n\x00/\\[]<>\"'")


def check_port(value: int, field: str, *, source: str) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(field, f"{value} is not a port (1..65535)", source=source)
    return value


def _check_host(value: str, field: str, *, source: str) -> None:
    if not value or any(c in _FORBIDDEN_IN_NAMES or ord(c) < 32 for c in value):
        raise ConfigError(field, f"{value!r} is not a host name or address", source=source)


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def finish_listener(listener: Listener, name: Namer, warnings: Warnings) -> Listener:
    source = warnings.source
    check_port(listener.local_port, name("local_port"), source=source)
    check_port(listener.upstream.port, name("upstream.port"), source=source)
    _check_host(listener.local_address, name("local_address"), source=source)
    _check_host(listener.upstream.host, name("upstream.host"), source=source)
    if listener.upstream.tls is UpstreamTLS.NONE and not listener.upstream.allow_insecure:
        raise ConfigError(
            name("upstream.tls"),
            "none would send tokens in clear text; set allowInsecure: true if you really mean it",
            source=source,
        )
    if listener.upstream.ca_file is not None:
        check_readable(listener.upstream.ca_file, name("upstream.ca_file"), source=source)
    if listener.local_tls is LocalTLS.NONE:
        for attr in ("local_certificate", "local_key"):
            if getattr(listener, attr) is not None:
                raise ConfigError(name(attr), "is set but local TLS is none", source=source)
        if not _is_loopback(listener.local_address):
            warnings.add(
                name("local_address"),
                f"{listener.local_address} is reachable from other hosts and local TLS is off: "
                "local passwords would cross the network in clear text",
            )
    else:
        for attr in ("local_certificate", "local_key"):
            path = getattr(listener, attr)
            if path is None:
                raise ConfigError(
                    name(attr), f"is required for local TLS {listener.local_tls}", source=source
                )
            check_readable(path, name(attr), source=source)
    return listener


def _complete_endpoints(o: OAuth2, name: Namer, source: str) -> OAuth2:
    tenant = o.tenant_id
    token_url = o.token_url
    if token_url:
        check_url(token_url, name("oauth2.token_url"), source=source)
        if o.provider is ProviderKind.MICROSOFT and tenant is None:
            tenant = presets.infer_provider(token_url)[1]
    else:
        derived = presets.token_url_for(o.provider, tenant)
        if derived is None:
            why = "a tenant id" if o.provider is ProviderKind.MICROSOFT else "provider presets"
            raise ConfigError(
                name("oauth2.token_url"),
                f"is required (no {why} to derive it from)",
                source=source,
            )
        token_url = derived
    if tenant is not None:
        _check_host(tenant, name("oauth2.tenant_id"), source=source)
    authorize_url = o.authorize_url
    if authorize_url:
        check_url(authorize_url, name("oauth2.authorize_url"), source=source)
    elif o.flow is Flow.AUTHORIZATION_CODE:
        # the operator's consent step needs it; presets fill it where the provider is known
        authorize_url = presets.authorize_url_for(o.provider, tenant)
    if o.redirect_uri:
        check_url(o.redirect_uri, name("oauth2.redirect_uri"), source=source)
    return replace(o, token_url=token_url, tenant_id=tenant, authorize_url=authorize_url)


def lint_scopes(
    provider: ProviderKind, scopes: tuple[str, ...], field: str, warnings: Warnings
) -> None:
    """Warn about misspelt Microsoft scopes (`SMPT.Send`): Entra ID would only say
    AADSTS70011 at the first login. Runs for Microsoft accounts and for any account whose
    scopes name a Microsoft mail resource, whatever its token URL says."""
    if provider is ProviderKind.MICROSOFT or any(map(presets.is_microsoft_mail_scope, scopes)):
        for scope, problem in presets.microsoft_scope_problems(scopes):
            warnings.add(field, f"`{scope}` {problem}")


def _complete_scopes(o: OAuth2, name: Namer, warnings: Warnings) -> OAuth2:
    scopes = o.scopes or presets.default_scopes(o.provider, o.flow)
    field = name("oauth2.scopes")
    lint_scopes(o.provider, scopes, field, warnings)
    if o.provider is ProviderKind.MICROSOFT and o.flow is Flow.CLIENT_CREDENTIALS:
        app_only = presets.microsoft_app_only(scopes)
        if app_only is not None:
            # Mapping is what makes emailproxy-style configs work: Entra ID refuses
            # delegated scopes on the client-credentials grant.
            warnings.add(
                field,
                f"clientCredentials cannot use delegated scopes ({' '.join(scopes)}); "
                f"using `{app_only[0]}` (the app's application permissions) instead",
            )
            scopes = app_only
    if not scopes:
        raise ConfigError(field, "no scopes given and no provider preset", source=warnings.source)
    return replace(o, scopes=scopes)


def _require(value: object, field: str, why: str, source: str) -> None:
    if not value:
        raise ConfigError(field, f"is required {why}", source=source)


def finish_oauth2(o: OAuth2, name: Namer, warnings: Warnings) -> OAuth2:
    """Fill provider presets and check that the flow has what it needs."""
    source = warnings.source
    o = _complete_endpoints(o, name, source)
    o = _complete_scopes(o, name, warnings)
    flow = o.flow
    cert, key = o.client_certificate_path, o.client_key_path
    has_cert = cert is not None or key is not None
    if has_cert:
        if cert is None or key is None:
            missing = "client_certificate_path" if cert is None else "client_key_path"
            raise ConfigError(
                name(f"oauth2.{missing}"), "is required with the other half", source=source
            )
        check_readable(cert, name("oauth2.client_certificate_path"), source=source)
        check_readable(key, name("oauth2.client_key_path"), source=source)
    if o.ca_file is not None:
        check_readable(o.ca_file, name("oauth2.ca_file"), source=source)
    if flow is not Flow.SERVICE_ACCOUNT:
        _require(o.client_id, name("oauth2.client_id"), f"for the {flow} flow", source)
    if flow is Flow.CLIENT_CREDENTIALS:
        if o.provider is ProviderKind.GOOGLE:
            raise ConfigError(
                name("oauth2.flow"),
                "Google offers no clientCredentials grant for mail; use serviceAccount",
                source=source,
            )
        if not o.client_secret and not has_cert:
            raise ConfigError(
                name("oauth2.client_secret"),
                "is required for clientCredentials (or a client certificate and key)",
                source=source,
            )
        if o.provider is ProviderKind.MICROSOFT and (o.tenant_id or "").lower() in (
            presets.MICROSOFT_MULTI_TENANT
        ):
            raise ConfigError(
                name("oauth2.tenant_id"),
                f"{o.tenant_id!r} cannot issue app-only tokens; clientCredentials needs the "
                "tenant id (GUID or domain)",
                source=source,
            )
    elif flow is Flow.SERVICE_ACCOUNT:
        if o.provider is not ProviderKind.GOOGLE:
            raise ConfigError(
                name("oauth2.flow"),
                f"serviceAccount is a Google flow; provider is {o.provider}",
                source=source,
            )
        _require(
            o.service_account_key,
            name("oauth2.service_account_key"),
            "for the serviceAccount flow",
            source,
        )
    elif flow in (Flow.REFRESH_TOKEN, Flow.AUTHORIZATION_CODE):
        _require(o.refresh_token, name("oauth2.refresh_token"), f"for the {flow} flow", source)
    elif flow is Flow.PASSWORD:
        _require(o.password, name("oauth2.password"), "for the password flow", source)
    return o


def check_username(username: str, field: str, *, source: str) -> str:
    """`user@domain`, `@domain` or `@`."""
    local, at, domain = username.rpartition("@")
    bad = any(c.isspace() or ord(c) < 32 or c in '<>"[]\\' for c in username)
    if bad or not at or (local and not domain):
        raise ConfigError(
            field,
            f"{username!r} is not a mail address, `@domain` or `@` (catch-all)",
            source=source,
        )
    return username


def finish_account(account: Account, name: Namer, warnings: Warnings) -> Account:
    source = warnings.source
    check_username(account.username, name("username"), source=source)
    if account.local_password is not None and not account.local_password:
        raise ConfigError(name("local_password"), "must not be empty", source=source)
    if account.upstream_username is not None:
        check_username(account.upstream_username, name("upstream_username"), source=source)
        if account.upstream_username.startswith("@"):
            raise ConfigError(name("upstream_username"), "must be a full address", source=source)
    return replace(account, oauth2=finish_oauth2(account.oauth2, name, warnings))


def check_together(
    listeners: Sequence[tuple[Listener, Namer]],
    accounts: Sequence[tuple[Account, Namer]],
    metrics: Metrics,
    metrics_port_field: str,
    *,
    source: str,
) -> None:
    """Rules that span objects: unique ports and account names, nothing empty."""
    if not listeners:
        raise ConfigError("listeners", "at least one listener is required", source=source)
    if not accounts:
        raise ConfigError("accounts", "at least one account is required", source=source)
    used: dict[int, str] = {}
    names: set[str] = set()
    for listener, name in listeners:
        if listener.name in names:  # names label metrics and logs; two would merge
            raise ConfigError(name("name"), f"{listener.name!r} appears twice", source=source)
        names.add(listener.name)
        if listener.local_port in used:
            raise ConfigError(
                name("local_port"),
                f"{listener.local_port} is already used by {used[listener.local_port]}",
                source=source,
            )
        used[listener.local_port] = listener.name
    if metrics.port and metrics.port in used:
        raise ConfigError(
            metrics_port_field,
            f"{metrics.port} is already used by {used[metrics.port]}",
            source=source,
        )
    seen: set[str] = set()
    for account, name in accounts:
        key = account.username.lower()
        if key in seen:
            raise ConfigError(
                name("username"), f"{account.username!r} appears twice", source=source
            )
        seen.add(key)

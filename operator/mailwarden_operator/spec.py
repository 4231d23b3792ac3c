"""A typed, fully resolved MailAccountSpec from a MailAccount's `.spec` (pure: no I/O).

The CRD's OpenAPI schema and CEL rules refuse most bad objects, but this parser checks
every rule again and applies every schema default itself: objects created before a rule
or default existed, or written while the CRD was being upgraded, reach the operator too,
and the handlers must be able to trust what they get. It also fills in the provider
presets (servers, token endpoints, scopes), so `render` and the consent handlers see one
resolved view. Anything wrong raises `SpecError(field, message)`, `field` being the dotted
path a user would look for in their manifest (`spec.oauth2.clientSecretRef.name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mailwarden_proxy.config import presets
from mailwarden_proxy.config.model import Flow, MailProtocol, Mechanism, ProviderKind, UpstreamTLS
from mailwarden_proxy.config.native import DEFAULT_UPSTREAM_PORT

E = TypeVar("E", bound=StrEnum)

# The CRD's patterns, in Python syntax (fullmatch, so no anchors).
_USERNAME = re.compile(r"[^@\s]+@[^@\s]+")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")
_URL = re.compile(r"https://[^\s\[\]()<>\"]+")
_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,253}")
_SCOPE = re.compile(r"\S+")

# Default Secret keys of each reference (the CRD shares one schema for all of them, so the
# per-reference defaults can only live here).
DEFAULT_KEYS = {
    "clientSecretRef": "client-secret",
    "serviceAccountKeyRef": "key.json",
    "refreshTokenRef": "refresh-token",
    "passwordRef": "password",
    "passwordSecretRef": "local-password",
}
# Flows whose refresh token comes from a person's consent, obtained by the operator.
CONSENT_FLOWS = frozenset({Flow.DEVICE_CODE, Flow.AUTHORIZATION_CODE})


class SpecError(ValueError):
    """A MailAccount spec the operator cannot use; `field` is a dotted path."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str


@dataclass(frozen=True)
class CertificateRef:
    name: str
    certificate_key: str = "tls.crt"
    private_key_key: str = "tls.key"

    @property
    def certificate(self) -> SecretKeyRef:
        return SecretKeyRef(self.name, self.certificate_key)

    @property
    def private_key(self) -> SecretKeyRef:
        return SecretKeyRef(self.name, self.private_key_key)


@dataclass(frozen=True)
class OAuth2Spec:
    flow: Flow
    token_url: str
    scopes: tuple[str, ...]
    client_id: str | None = None
    tenant_id: str | None = None  # Microsoft only; "organizations" for delegated flows
    authorize_url: str | None = None  # authorizationCode only
    device_authorization_url: str | None = None  # deviceCode only
    subject: str | None = None  # serviceAccount only; defaults to spec.username
    use_pkce: bool = True
    client_secret_ref: SecretKeyRef | None = None
    client_certificate_ref: CertificateRef | None = None
    service_account_key_ref: SecretKeyRef | None = None
    refresh_token_ref: SecretKeyRef | None = None
    password_ref: SecretKeyRef | None = None

    @property
    def needs_consent(self) -> bool:
        """True when a person must sign in once (the operator runs that flow)."""
        return self.flow in CONSENT_FLOWS


@dataclass(frozen=True)
class ServerSpec:
    protocol: MailProtocol
    host: str
    port: int
    tls: UpstreamTLS
    allow_insecure: bool = False


@dataclass(frozen=True)
class LocalSpec:
    imap_port: int = 1143
    pop3_port: int = 1110
    smtp_port: int = 1025
    metrics_port: int = 9464  # 0: no metrics/health endpoint
    password_secret_ref: SecretKeyRef | None = None

    def port_for(self, protocol: MailProtocol) -> int:
        port: int = getattr(self, f"{protocol.value}_port")
        return port


@dataclass(frozen=True)
class MailAccountSpec:
    provider: ProviderKind
    username: str
    oauth2: OAuth2Spec
    mechanism: Mechanism = Mechanism.XOAUTH2
    imap: ServerSpec | None = None
    pop3: ServerSpec | None = None
    smtp: ServerSpec | None = None
    local: LocalSpec = LocalSpec()

    def servers(self) -> tuple[ServerSpec, ...]:
        """The upstream servers present, in the order imap, pop3, smtp."""
        return tuple(s for s in (self.imap, self.pop3, self.smtp) if s is not None)

    def secret_refs(self) -> list[SecretKeyRef]:
        """Every Secret key the spec references (not the operator's own token Secret)."""
        o = self.oauth2
        cert = o.client_certificate_ref
        refs = [
            o.client_secret_ref,
            *((cert.certificate, cert.private_key) if cert else ()),
            o.service_account_key_ref,
            o.refresh_token_ref,
            o.password_ref,
            self.local.password_secret_ref,
        ]
        return list(dict.fromkeys(r for r in refs if r is not None))


class _Obj:
    """One mapping of the spec at a dotted `path`, with typed getters. Unknown keys are
    ignored: the apiserver prunes them, and a newer CRD may add fields. A null is an
    absent key, as in a merge patch."""

    def __init__(self, data: object, path: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(path, "must be an object")
        self.path = path
        self.data = {k: v for k, v in data.items() if v is not None}

    def field(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, pattern: re.Pattern[str] | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise SpecError(self.field(key), "must be a non-empty string")
        if pattern is not None and not pattern.fullmatch(value):
            raise SpecError(self.field(key), f"{value!r} does not match {pattern.pattern}")
        return value

    def req(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.text(key, pattern)
        if value is None:
            raise SpecError(self.field(key), "is required")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.data.get(key, default)
        if type(value) is not int or not low <= value <= high:  # bool is an int subclass
            raise SpecError(self.field(key), f"must be an integer {low}..{high}, not {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise SpecError(self.field(key), f"must be true or false, not {value!r}")
        return value

    def enum(self, key: str, cls: type[E], default: E | None = None) -> E:
        value = self.data.get(key, default)
        choices = [m.value for m in cls]
        if not isinstance(value, str) or value not in choices:
            raise SpecError(self.field(key), f"{value!r} is not one of {' | '.join(choices)}")
        return cls(value)

    def url(self, key: str) -> str | None:
        value = self.text(key, _URL)
        if value is not None:
            try:
                parts = urlsplit(value)
                _ = parts.port  # ValueError on a bad port
            except ValueError as exc:
                raise SpecError(self.field(key), f"{value!r} is not a valid URL: {exc}") from None
            if not parts.hostname:
                raise SpecError(self.field(key), f"{value!r} has no host")
        return value

    def child(self, key: str) -> _Obj | None:
        value = self.data.get(key)
        return None if value is None else _Obj(value, self.field(key))

    def ref(self, key: str) -> SecretKeyRef | None:
        obj = self.child(key)
        if obj is None:
            return None
        return SecretKeyRef(obj.req("name"), obj.text("key") or DEFAULT_KEYS[key])

    def certificate_ref(self, key: str) -> CertificateRef | None:
        obj = self.child(key)
        if obj is None:
            return None
        cert, private = obj.text("certificateKey"), obj.text("privateKeyKey")
        default = CertificateRef("")
        return CertificateRef(
            obj.req("name"), cert or default.certificate_key, private or default.private_key_key
        )


def _scopes(o: _Obj, provider: ProviderKind, flow: Flow) -> tuple[str, ...]:
    raw = o.data.get("scopes", [])
    if not isinstance(raw, list | tuple) or len(raw) > 32:
        raise SpecError(o.field("scopes"), "must be a list of at most 32 scopes")
    for i, scope in enumerate(raw):
        if not isinstance(scope, str) or not _SCOPE.fullmatch(scope):
            raise SpecError(f"{o.field('scopes')}[{i}]", "must be a scope without spaces")
    # An empty list means the defaults too: every IdP refuses a request for no scope.
    scopes = tuple(raw) or presets.default_scopes(provider, flow)
    if not scopes:
        raise SpecError(o.field("scopes"), f"provider {provider} has no default scopes")
    return scopes


# flow -> (the key it needs, alternatives that also do, a hint)
_NEEDS = {
    Flow.CLIENT_CREDENTIALS: ("clientSecretRef", ("clientCertificateRef",), " (or a certificate)"),
    Flow.SERVICE_ACCOUNT: ("serviceAccountKeyRef", (), ""),
    Flow.REFRESH_TOKEN: ("refreshTokenRef", (), ""),
    Flow.PASSWORD: ("passwordRef", (), " (the mailbox password, not the local one)"),
}

_NOT_AT_GOOGLE = {
    Flow.CLIENT_CREDENTIALS: "Google has no clientCredentials grant for mail; use serviceAccount",
    Flow.PASSWORD: "Google has no password (ROPC) grant",
    Flow.DEVICE_CODE: "Google's device flow does not allow the Gmail scope",
}


def _check_flow(o: _Obj, provider: ProviderKind, flow: Flow) -> None:
    """The CRD's CEL rules on spec.oauth2, and the combinations no provider offers."""
    if flow is not Flow.SERVICE_ACCOUNT and not o.has("clientId"):
        raise SpecError(o.field("clientId"), f"is required for the {flow} flow")
    key, alternatives, hint = _NEEDS.get(flow, ("", (), ""))
    if key and not any(map(o.has, (key, *alternatives))):
        raise SpecError(o.field(key), f"is required for the {flow} flow{hint}")
    if flow is Flow.SERVICE_ACCOUNT and provider is not ProviderKind.GOOGLE:
        raise SpecError(o.field("flow"), "serviceAccount (domain-wide delegation) is Google only")
    # Checked here because the CRD lets them through and they could only fail later, at
    # the first token request, with an opaque IdP error.
    if provider is ProviderKind.GOOGLE and flow in _NOT_AT_GOOGLE:
        raise SpecError(o.field("flow"), _NOT_AT_GOOGLE[flow])
    if o.has("clientCertificateRef") and provider is not ProviderKind.MICROSOFT:
        raise SpecError(
            o.field("clientCertificateRef"), "certificate credentials exist only for microsoft"
        )


def _oauth2(spec: _Obj, provider: ProviderKind, username: str) -> OAuth2Spec:
    o = spec.child("oauth2")
    if o is None:
        raise SpecError(spec.field("oauth2"), "is required")
    flow = o.enum("flow", Flow)
    _check_flow(o, provider, flow)
    client_id = o.text("clientId")
    if client_id is not None and len(client_id) > 256:
        raise SpecError(o.field("clientId"), "must be at most 256 characters")
    tenant = o.text("tenantId", _TENANT)
    token_url, authorize_url = o.url("tokenUrl"), o.url("authorizeUrl")
    device_url = o.url("deviceAuthorizationUrl")
    if provider is ProviderKind.MICROSOFT:
        if flow is Flow.CLIENT_CREDENTIALS and (
            tenant is None or tenant.lower() in presets.MICROSOFT_MULTI_TENANT
        ):
            why = "needs the directory (not common/organizations/consumers) for clientCredentials"
            raise SpecError(o.field("tenantId"), why)
        if tenant is None and token_url is not None:
            tenant = presets.infer_provider(token_url)[1]
        tenant = tenant or presets.MICROSOFT_DEFAULT_DELEGATED_TENANT
    else:
        tenant = None  # meaningless outside Microsoft; ignored rather than refused
    token_url = token_url or presets.token_url_for(provider, tenant)
    if token_url is None:
        raise SpecError(o.field("tokenUrl"), f"provider {provider} needs spec.oauth2.tokenUrl")
    if flow is Flow.AUTHORIZATION_CODE:
        authorize_url = authorize_url or presets.authorize_url_for(provider, tenant)
        if authorize_url is None:
            raise SpecError(o.field("authorizeUrl"), f"is required for provider {provider}")
    else:
        authorize_url = None
    if flow is Flow.DEVICE_CODE:
        device_url = device_url or presets.device_authorization_url_for(provider, tenant)
        if device_url is None:
            raise SpecError(o.field("deviceAuthorizationUrl"), f"is required for {provider}")
    else:
        device_url = None
    subject = o.text("subject")
    return OAuth2Spec(
        flow=flow,
        token_url=token_url,
        scopes=_scopes(o, provider, flow),
        client_id=client_id,
        tenant_id=tenant,
        authorize_url=authorize_url,
        device_authorization_url=device_url,
        subject=(subject or username) if flow is Flow.SERVICE_ACCOUNT else None,
        use_pkce=o.flag("usePkce", True),
        client_secret_ref=o.ref("clientSecretRef"),
        client_certificate_ref=o.certificate_ref("clientCertificateRef"),
        service_account_key_ref=o.ref("serviceAccountKeyRef"),
        refresh_token_ref=o.ref("refreshTokenRef"),
        password_ref=o.ref("passwordRef"),
    )


def _server(spec: _Obj, provider: ProviderKind, protocol: MailProtocol) -> ServerSpec | None:
    s = spec.child(protocol.value)
    if s is None:
        return None
    preset = presets.server_preset(provider, protocol)
    host = s.text("host", _HOST) or (preset.host if preset else None)
    if host is None:
        raise SpecError(s.field("host"), f"provider {provider} has no default {protocol} server")
    tls = s.enum("tls", UpstreamTLS, preset.tls if preset else UpstreamTLS.IMPLICIT)
    if preset is not None and tls is preset.tls:
        default_port = preset.port
    else:  # e.g. Gmail SMTP with starttls: the standard port for that kind of TLS
        default_port = DEFAULT_UPSTREAM_PORT[protocol, tls is UpstreamTLS.IMPLICIT]
    allow_insecure = s.flag("allowInsecure", False)
    if tls is UpstreamTLS.NONE and not allow_insecure:
        why = "none sends OAuth 2.0 tokens in clear text; needs allowInsecure: true"
        raise SpecError(s.field("tls"), why)
    port = s.integer("port", default_port, 1, 65535)
    return ServerSpec(protocol, host, port, tls, allow_insecure)


def _local(spec: _Obj, servers: tuple[ServerSpec, ...]) -> LocalSpec:
    obj = spec.child("local") or _Obj({}, spec.field("local"))
    # metricsPort may be 0 (no endpoint); the mail ports may not
    default = LocalSpec()
    ports = {
        f"{p}_port": obj.integer(
            f"{p}Port", getattr(default, f"{p}_port"), int(p != "metrics"), 65535
        )
        for p in ("imap", "pop3", "smtp", "metrics")
    }
    local = LocalSpec(**ports, password_secret_ref=obj.ref("passwordSecretRef"))
    if len({local.imap_port, local.pop3_port, local.smtp_port}) != 3:
        raise SpecError(obj.path, "local ports must differ")
    # Only the listeners that will exist can clash with the metrics endpoint.
    if local.metrics_port and local.metrics_port in {local.port_for(s.protocol) for s in servers}:
        raise SpecError(obj.field("metricsPort"), "must differ from the local mail ports")
    return local


def parse_spec(spec: Mapping[str, Any]) -> MailAccountSpec:
    """The resolved spec of a MailAccount, or SpecError naming the offending field."""
    top = _Obj(spec, "spec")
    provider = top.enum("provider", ProviderKind)
    username = top.req("username", _USERNAME)
    if not 3 <= len(username) <= 254:
        raise SpecError(top.field("username"), "must be 3..254 characters")
    oauth2 = _oauth2(top, provider, username)
    servers = tuple(_server(top, provider, p) for p in MailProtocol)
    present = tuple(s for s in servers if s is not None)
    if not present:
        why = "at least one of spec.imap, spec.pop3, spec.smtp must be set ({} for defaults)"
        raise SpecError("spec", why)
    mechanism = top.enum("mechanism", Mechanism, Mechanism.XOAUTH2)
    imap, pop3, smtp = servers
    return MailAccountSpec(
        provider, username, oauth2, mechanism, imap, pop3, smtp, _local(top, present)
    )

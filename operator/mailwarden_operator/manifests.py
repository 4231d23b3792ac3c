"""A validated proxy Account (+ its listeners) -> a MailAccount and its credentials Secret.

Pure: `mailwarden register` and `mailwarden import` build the proxy's own model objects
with the proxy's own validation (so the same mistakes get the same messages), and this
module turns them into the two manifests a user applies. Anything the operator would fill
in by itself is left out, so the manifest shows only what is particular to the account:

- servers equal to the provider preset become `{}`, and a port equal to what the operator
  derives for the written TLS mode is dropped (`spec._server` has the same rule);
- the token/authorize/device URLs are dropped when the tenant (or provider) implies them;
- scopes are dropped when they equal the preset for the flow (after the loader's mapping
  of delegated scopes to `.default` for clientCredentials, which it warns about).

Settings a MailAccount cannot express (local TLS, a listen address, a second listener of
the same protocol) are reported as warnings rather than dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailwarden_proxy.config import presets
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    LocalTLS,
    MailProtocol,
    Mechanism,
    OAuth2,
    ProviderKind,
    UpstreamTLS,
)
from mailwarden_proxy.config.native import DEFAULT_UPSTREAM_PORT
from mailwarden_proxy.secret import Secret

API_VERSION = "mailwarden.io/v1alpha1"
KIND = "MailAccount"
# The CLI's Secret; `<name>-proxy` and `<name>-oauth2-token` belong to the operator.
SECRET_SUFFIX = "-oauth2-client"
# The same key names as the operator's defaults (spec.DEFAULT_KEYS), written explicitly
# so the manifest reads on its own.
CLIENT_SECRET_KEY = "client-secret"
SERVICE_ACCOUNT_KEY = "key.json"
PASSWORD_KEY = "password"
REFRESH_TOKEN_KEY = "refresh-token"
CERTIFICATE_KEY, PRIVATE_KEY_KEY = "tls.crt", "tls.key"
# Stands in for what only exists later (a refresh token from the operator's consent, the
# mailbox password the user adds to the Secret), so `register` can run the proxy's
# validation of those flows; never written to a manifest.
OBTAINED_LATER = Secret("obtained-later")
# CRD defaults of spec.local; a port equal to its default is left out.
DEFAULT_LOCAL_PORTS = {
    MailProtocol.IMAP: ("imapPort", 1143),
    MailProtocol.POP3: ("pop3Port", 1110),
    MailProtocol.SMTP: ("smtpPort", 1025),
}
CREATED_BY = {"app.kubernetes.io/created-by": "mailwarden-cli"}
# A DNS-1123 label: the operator derives Secret names and label values from it.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_MAX_NAME = 63 - len(SECRET_SUFFIX)
_PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


@dataclass
class Manifests:
    """The documents to apply, in order (the Secret first, so the MailAccount's first
    reconcile finds it), and what the conversion could not carry over."""

    documents: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    @property
    def mail_account(self) -> dict[str, Any]:
        return self.documents[-1]


def check_name(name: str, flag: str = "--name") -> str:
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise ConfigError(
            flag,
            f"{name!r} is not a valid MailAccount name: lower-case letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {_MAX_NAME} characters",
        )
    return name


def name_for(username: str, prefix: str = "") -> str:
    """A MailAccount name derived from a mailbox: `prefix` + `vault-contoso-com`."""
    slug = re.sub(r"[^a-z0-9]+", "-", username.lower()).strip("-")
    return check_name((prefix + slug)[:_MAX_NAME].rstrip("-"), "--name-prefix")


def _placeholders(o: OAuth2) -> list[str]:
    """Deployment guides print TENANT_ID / CLIENT_ID / CLIENT_SECRET; a file or command
    copied before filling them in would otherwise fail only at the first token request."""
    found = [
        (what, value)
        for what, value in (("tenant id", o.tenant_id), ("client id", o.client_id))
        if value and _PLACEHOLDER.fullmatch(value)
    ]
    out = [f"the {what} {value!r} looks like a placeholder; replace it" for what, value in found]
    if o.client_secret and _PLACEHOLDER.fullmatch(o.client_secret.reveal()):
        out.append("the client secret looks like a placeholder; replace it")
    return out


def _metadata(name: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(CREATED_BY)
    return meta


def _server(provider: ProviderKind, listener: Listener) -> dict[str, Any]:
    up = listener.upstream
    preset = presets.server_preset(provider, listener.protocol)
    out: dict[str, Any] = {}
    if preset is None or up.host.lower() != preset.host:
        out["host"] = up.host
    if preset is None or up.tls is not preset.tls:
        out["tls"] = up.tls.value
    # the port the operator derives for this TLS mode (spec._server)
    if preset is not None and up.tls is preset.tls:
        implied = preset.port
    else:
        implied = DEFAULT_UPSTREAM_PORT[listener.protocol, up.tls is UpstreamTLS.IMPLICIT]
    if up.port != implied:
        out["port"] = up.port
    if up.allow_insecure:
        out["allowInsecure"] = True
    return out


def _servers(
    provider: ProviderKind, listeners: Sequence[Listener], warnings: list[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    servers: dict[str, Any] = {}
    local: dict[str, int] = {}
    used: dict[MailProtocol, Listener] = {}
    for listener in listeners:
        protocol = listener.protocol
        if protocol in used:
            warnings.append(
                f"[{listener.name}]: a MailAccount has one {protocol} server; "
                f"kept [{used[protocol].name}], this listener is not carried over"
            )
            continue
        used[protocol] = listener
        servers[protocol.value] = _server(provider, listener)
        key, default = DEFAULT_LOCAL_PORTS[protocol]
        if listener.local_port and listener.local_port != default:
            local[key] = listener.local_port
        if listener.local_tls is not LocalTLS.NONE:
            warnings.append(
                f"[{listener.name}]: local TLS is not carried over: the sidecar serves the "
                "application on 127.0.0.1 inside the pod, in plain text"
            )
        if listener.local_address not in ("127.0.0.1", "localhost", "::1"):
            warnings.append(
                f"[{listener.name}]: local_address {listener.local_address} is not carried "
                "over: the sidecar listens on 127.0.0.1 only"
            )
        if listener.upstream.ca_file:
            warnings.append(
                f"[{listener.name}]: the upstream CA file is not carried over: a MailAccount "
                "trusts the image's CA bundle"
            )
    return servers, local


def _endpoints(o: OAuth2) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tenant = o.tenant_id if o.provider is ProviderKind.MICROSOFT else None
    if tenant:
        out["tenantId"] = tenant
    if o.token_url != presets.token_url_for(o.provider, tenant):
        out["tokenUrl"] = o.token_url
    if o.flow is Flow.AUTHORIZATION_CODE:
        implied = presets.authorize_url_for(o.provider, tenant)
        if o.authorize_url not in (None, implied):
            out["authorizeUrl"] = o.authorize_url
    elif o.flow is Flow.DEVICE_CODE:
        # emailproxy's device flow takes its device-authorization endpoint from permission_url
        implied = presets.device_authorization_url_for(o.provider, tenant)
        if o.authorize_url not in (None, implied):
            out["deviceAuthorizationUrl"] = o.authorize_url
    return out


def _credentials(
    o: OAuth2,
    secret_name: str,
    read_text: Callable[[str], str],
    warnings: list[str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """(the spec.oauth2 references, the Secret's stringData)."""
    refs: dict[str, Any] = {}
    data: dict[str, str] = {}
    if o.flow is Flow.SERVICE_ACCOUNT and o.service_account_key:
        data[SERVICE_ACCOUNT_KEY] = o.service_account_key.reveal()
        refs["serviceAccountKeyRef"] = {"name": secret_name, "key": SERVICE_ACCOUNT_KEY}
    elif o.client_secret:
        data[CLIENT_SECRET_KEY] = o.client_secret.reveal()
        refs["clientSecretRef"] = {"name": secret_name, "key": CLIENT_SECRET_KEY}
    elif o.client_certificate_path and o.client_key_path:
        data[CERTIFICATE_KEY] = read_text(o.client_certificate_path)
        data[PRIVATE_KEY_KEY] = read_text(o.client_key_path)
        refs["clientCertificateRef"] = {
            "name": secret_name,
            "certificateKey": CERTIFICATE_KEY,
            "privateKeyKey": PRIVATE_KEY_KEY,
        }
    if o.flow is Flow.REFRESH_TOKEN and o.refresh_token:  # native files carry one
        data[REFRESH_TOKEN_KEY] = o.refresh_token.reveal()
        refs["refreshTokenRef"] = {"name": secret_name, "key": REFRESH_TOKEN_KEY}
    if o.flow is Flow.PASSWORD:
        refs["passwordRef"] = {"name": secret_name, "key": PASSWORD_KEY}
        if o.password and o.password is not OBTAINED_LATER:
            data[PASSWORD_KEY] = o.password.reveal()
            return refs, data
        # emailproxy takes the mailbox password from each client login; a MailAccount keeps
        # it in a Secret, which only the user can fill in
        warnings.append(
            f"oauth2.flow password: add the mailbox password to Secret {secret_name} under "
            f"key {PASSWORD_KEY!r} (kubectl edit secret {secret_name}); it is not in the "
            "generated manifest"
        )
    return refs, data


def _oauth2(
    o: OAuth2, username: str, secret_name: str, read_text: Callable[[str], str], warnings: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    spec: dict[str, Any] = {"flow": o.flow.value}
    if o.client_id:
        spec["clientId"] = o.client_id
    spec.update(_endpoints(o))
    if set(o.scopes) != set(presets.default_scopes(o.provider, o.flow)):
        spec["scopes"] = list(o.scopes)
    if o.flow is Flow.SERVICE_ACCOUNT and o.subject and o.subject.lower() != username.lower():
        spec["subject"] = o.subject
    refs, data = _credentials(o, secret_name, read_text, warnings)
    spec.update(refs)
    return spec, data


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def build(
    account: Account,
    listeners: Sequence[Listener],
    *,
    name: str,
    username: str,
    namespace: str | None = None,
    read_text: Callable[[str], str] = _read_text,
) -> Manifests:
    """The Secret (when the account has a credential to keep) and the MailAccount."""
    check_name(name)
    o = account.oauth2
    warnings = _placeholders(o)
    secret_name = name + SECRET_SUFFIX
    oauth2, data = _oauth2(o, username, secret_name, read_text, warnings)
    servers, local = _servers(o.provider, listeners, warnings)
    spec: dict[str, Any] = {"provider": o.provider.value, "username": username}
    if account.mechanism is not Mechanism.XOAUTH2:
        spec["mechanism"] = account.mechanism.value
    spec["oauth2"] = oauth2
    spec.update(servers)
    if local:
        spec["local"] = local
    if account.local_password is not None:
        warnings.append(
            "the local password is not carried over: the operator generates one (key "
            f"local-password of Secret {name}-proxy), or set spec.local.passwordSecretRef"
        )
    if account.upstream_username and account.upstream_username.lower() != username.lower():
        warnings.append(
            f"upstreamUsername {account.upstream_username} is not carried over: a MailAccount "
            "logs in upstream as spec.username"
        )
    documents: list[dict[str, Any]] = []
    if data or o.flow is Flow.PASSWORD:
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": _metadata(secret_name, namespace),
                "type": "Opaque",
                "stringData": data,
            }
        )
    documents.append(
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": _metadata(name, namespace),
            "spec": spec,
        }
    )
    return Manifests(documents, warnings)

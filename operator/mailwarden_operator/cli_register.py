"""`mailwarden register`: the flags deployment guides print, as a validated proxy Account.

The guides print `... register --imap-server-address ... --oauth2-flow client_credentials
... --force`; that command is a vendor wrapper (emailproxy itself has no `register`) that
writes the same emailproxy sections `mailwarden import` reads. So the flags are turned into
the proxy's model objects and checked by the proxy's shared validation, in the emailproxy
loader's order: scope spelling is linted before the token URL is checked (a guide with both
mistakes reports both), then the flow, then the credentials. Errors and warnings name the
flag (`--oauth2-token-url`), not the INI key.

The one deliberate difference from the loader: authorization_code (and absent
--oauth2-flow with a permission URL) is accepted, because the operator runs that consent;
the proxy alone cannot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mailwarden_operator.manifests import DEFAULT_LOCAL_PORTS, OBTAINED_LATER
from mailwarden_proxy.config import presets
from mailwarden_proxy.config.common import (
    Warnings,
    check_service_account_key,
    check_url,
    read_secret_file,
    suggest,
)
from mailwarden_proxy.config.emailproxy_ini import FLOWS
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    MailProtocol,
    Metrics,
    OAuth2,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.config.native import DEFAULT_UPSTREAM_PORT, LISTENER_PREFIX
from mailwarden_proxy.config.validate import (
    Namer,
    check_together,
    finish_account,
    finish_listener,
    lint_scopes,
)
from mailwarden_proxy.secret import Secret

# the flag spelling of each model path, for messages from the shared validation
ACCOUNT_FLAGS = {
    "username": "--username",
    "oauth2.provider": "--oauth2-token-url",
    "oauth2.tenant_id": "--oauth2-token-url",
    "oauth2.token_url": "--oauth2-token-url",
    "oauth2.authorize_url": "--oauth2-permission-url",
    "oauth2.scopes": "--oauth2-scope",
    "oauth2.flow": "--oauth2-flow",
    "oauth2.client_id": "--oauth2-client-id",
    "oauth2.client_secret": "--oauth2-client-secret",
    "oauth2.service_account_key": "--oauth2-client-secret",
}
_FLAG_PREFIX = {MailProtocol.IMAP: "imap", MailProtocol.POP3: "pop", MailProtocol.SMTP: "smtp"}
_LISTENER_FLAGS = {
    "upstream.host": "server-address",
    "upstream.port": "server-port",
    "upstream.tls": "server-starttls",
    "local_port": "local-port",
}


@dataclass(frozen=True)
class ServerFlags:
    address: str | None = None
    port: int | None = None
    starttls: bool = False
    local_port: int | None = None


@dataclass(frozen=True)
class RegisterFlags:
    username: str
    imap: ServerFlags = ServerFlags()
    pop: ServerFlags = ServerFlags()
    smtp: ServerFlags = ServerFlags()
    token_url: str | None = None
    permission_url: str | None = None
    scope: str | None = None
    flow: str | None = None
    client_id: str | None = None
    client_secret: str | None = None


def _clean(value: str | None) -> str | None:
    # the guides quote values with stray spaces ("https://.../token "); emailproxy's INI
    # reader strips them too
    if value is None or not value.strip():
        return None
    return value.strip()


def _listener_namer(protocol: MailProtocol) -> Namer:
    prefix = f"--{_FLAG_PREFIX[protocol]}"

    def name(path: str) -> str:
        return f"{prefix}-{_LISTENER_FLAGS.get(path, 'server-address')}"

    return name


def _listener(protocol: MailProtocol, flags: ServerFlags, warnings: Warnings) -> Listener | None:
    prefix = f"--{_FLAG_PREFIX[protocol]}"
    name = _listener_namer(protocol)
    host = _clean(flags.address)
    if host is None:
        for given, flag in ((flags.port, "server-port"), (flags.local_port, "local-port")):
            if given is not None:
                raise ConfigError(f"{prefix}-{flag}", f"needs {prefix}-server-address")
        return None
    tls = UpstreamTLS.STARTTLS if flags.starttls else UpstreamTLS.IMPLICIT
    if flags.starttls and protocol is not MailProtocol.SMTP:
        warnings.add(
            f"{prefix}-server-starttls",
            "emailproxy ignores STARTTLS settings for IMAP/POP; mailwarden honours them",
        )
    port = flags.port or DEFAULT_UPSTREAM_PORT[protocol, tls is UpstreamTLS.IMPLICIT]
    local_port = flags.local_port or DEFAULT_LOCAL_PORTS[protocol][1]
    listener = Listener(
        name=f"{LISTENER_PREFIX[protocol]}-{local_port}",
        protocol=protocol,
        upstream=Upstream(host=host, port=port, tls=tls),
        local_port=local_port,
    )
    return finish_listener(listener, name, warnings)


def _flow(flags: RegisterFlags, permission_url: str | None, warnings: Warnings) -> Flow:
    text = _clean(flags.flow)
    if text is None:
        if permission_url is None:
            raise ConfigError(
                "--oauth2-flow", "is required when there is no --oauth2-permission-url"
            )
        text = "authorization_code"  # emailproxy's browser flow
    # the MailAccount spellings (clientCredentials, ...) are accepted as well
    choices = {**FLOWS, **{f.value: f for f in Flow if f is not Flow.REFRESH_TOKEN}}
    if text not in choices:
        raise ConfigError(
            "--oauth2-flow", f"{text!r} is not one of {' | '.join(FLOWS)}{suggest(text, choices)}"
        )
    flow = choices[text]
    if permission_url is not None and flow not in (Flow.AUTHORIZATION_CODE, Flow.DEVICE_CODE):
        warnings.add(
            "--oauth2-flow",
            f"emailproxy ignores --oauth2-flow {text} when --oauth2-permission-url is set and "
            f"runs its browser flow instead; mailwarden uses {flow} as written (the permission "
            "URL is not used)",
        )
    return flow


def _service_account_key(client_id: str | None, secret: str | None) -> Secret:
    # emailproxy's convention: client_id = file | key, client_secret = the path or the JSON
    field = "--oauth2-client-secret"
    if client_id not in ("file", "key") or secret is None:
        raise ConfigError(
            "--oauth2-client-id",
            "must be `file` or `key` for service_account, with --oauth2-client-secret "
            "holding the key file's path or its JSON",
        )
    key = read_secret_file(secret, field, source="") if client_id == "file" else Secret(secret)
    return check_service_account_key(key, field, source="")


def account_from_flags(
    flags: RegisterFlags, warnings: Warnings | None = None
) -> tuple[Account, list[Listener]]:
    """The validated Account and listeners the flags describe. Warnings go to `warnings`,
    which the caller reports even when a ConfigError follows (as the loader does)."""
    warnings = warnings if warnings is not None else Warnings("")

    def name(path: str) -> str:
        return ACCOUNT_FLAGS.get(path, "--username")

    username = _clean(flags.username) or ""
    if username.startswith("@") or "@" not in username:
        raise ConfigError(
            "--username", f"{username!r} must be the mailbox address (a MailAccount is one mailbox)"
        )
    token_url = _clean(flags.token_url)
    permission_url = _clean(flags.permission_url)
    scopes = tuple((flags.scope or "").split())
    provider, tenant = presets.infer_provider(token_url or "")
    lint_scopes(provider, scopes, name("oauth2.scopes"), warnings)
    if token_url is None:
        raise ConfigError("--oauth2-token-url", "is required")
    check_url(token_url, "--oauth2-token-url", source="")
    flow = _flow(flags, permission_url, warnings)
    client_id, secret = _clean(flags.client_id), _clean(flags.client_secret)
    sa_key = _service_account_key(client_id, secret) if flow is Flow.SERVICE_ACCOUNT else None
    oauth2 = OAuth2(
        provider=provider,
        flow=flow,
        token_url=token_url,
        tenant_id=tenant,
        scopes=scopes,
        client_id="" if sa_key else (client_id or ""),
        client_secret=None if sa_key or not secret else Secret(secret),
        service_account_key=sa_key,
        subject=username if sa_key else None,
        authorize_url=permission_url
        if flow in (Flow.AUTHORIZATION_CODE, Flow.DEVICE_CODE)
        else None,
        refresh_token=OBTAINED_LATER if flow is Flow.AUTHORIZATION_CODE else None,
        password=OBTAINED_LATER if flow is Flow.PASSWORD else None,
    )
    account = finish_account(Account(username=username, oauth2=oauth2), name, warnings)
    listeners = [
        lst
        for protocol, server in (
            (MailProtocol.IMAP, flags.imap),
            (MailProtocol.POP3, flags.pop),
            (MailProtocol.SMTP, flags.smtp),
        )
        if (lst := _listener(protocol, server, warnings)) is not None
    ]
    if not listeners:
        raise ConfigError(
            "--imap-server-address",
            "at least one of --imap-server-address, --pop-server-address, "
            "--smtp-server-address is required",
        )
    check_together(
        [(lst, _listener_namer(lst.protocol)) for lst in listeners],
        [(account, name)],
        Metrics(port=0),  # the sidecar's metrics port is the operator's business
        "--metrics-port",
        source="",
    )
    return account, listeners


def read_client_secret(path: Path) -> str:
    """`--oauth2-client-secret-file`: keeps the secret out of shell history and `ps`."""
    return read_secret_file(str(path), "--oauth2-client-secret-file", source="").reveal()

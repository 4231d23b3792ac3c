"""Loader for the configuration files of emailproxy (simonrob/email-oauth2-proxy).

Semantics follow emailproxy 2026.7.3 where it has them, so its users can move over with
the same file; where emailproxy is silent or unsafe, mailwarden says so in a warning:

- `[IMAP-<port>]`, `[POP-<port>]`, `[SMTP-<port>]`: a local listener. Upstream is
  implicit TLS unless `server_starttls` (or its older name `starttls`) is true.
  emailproxy reads STARTTLS keys for SMTP only; mailwarden honours them for IMAP/POP as
  well and warns. `local_certificate_path` + `local_key_path` mean local implicit TLS,
  with `local_starttls = True` local STARTTLS. emailproxy listens on `::` (all
  interfaces) when `local_address` is missing; mailwarden listens on 127.0.0.1 and warns.
- `[user@domain]`, `[@domain]`, `[@]`: accounts. With `allow_catch_all_accounts`, a
  missing key falls back to `[@domain]`, then `[@]` (emailproxy's lookup). No local
  password is stored: the first successful login's password becomes it.
- `oauth2_flow`: authorization_code | client_credentials | device | service_account |
  password. emailproxy runs its browser flow whenever `permission_url` is set and then
  ignores `oauth2_flow` (unless device); mailwarden follows `oauth2_flow` and warns.
- The keys emailproxy writes back (`access_token`, `refresh_token`, `token_salt`, ...) are
  encrypted with the login password; they are ignored with a warning. Tokens are
  requested afresh and kept in memory; nothing is written to the file.
- Unknown keys and sections are warnings with a "did you mean"; malformed values
  (a URL that is not one, a port that is not a number) are ConfigErrors naming
  `[section] key`.
"""

from __future__ import annotations

from mailwarden_proxy.config import presets
from mailwarden_proxy.config.common import (
    check_service_account_key,
    check_url,
    read_secret_file,
    reported_on_error,
    suggest,
)
from mailwarden_proxy.config.emailproxy_ini import (
    ACCOUNT_KEYS,
    ACCOUNT_NAMES,
    CACHED_KEYS,
    DOCUMENTATION_ONLY,
    FLOWS,
    GLOBAL_KEYS,
    GLOBAL_SECTION,
    LISTENER_NAMES,
    PROTOCOLS,
    SERVER_KEYS,
    SERVER_SECTION,
    IniFile,
    parse_ini,
    parse_port,
)
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    LocalTLS,
    MailProtocol,
    Metrics,
    OAuth2,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.config.validate import (
    Namer,
    check_together,
    finish_account,
    finish_listener,
    lint_scopes,
)
from mailwarden_proxy.secret import Secret


def _listener(f: IniFile, section: str, kind: str, port_text: str) -> tuple[Listener, Namer]:
    def name(field: str) -> str:
        key = LISTENER_NAMES.get(field)
        return f"[{section}] {key}" if key else f"[{section}]"

    f.unknown_keys(section, SERVER_KEYS)
    protocol = PROTOCOLS[kind]
    local_port = parse_port(port_text, f"[{section}]", f.source)
    host = f.raw(section, "server_address")
    if host is None:
        raise f.error(section, "server_address", "is required")
    port_raw = f.raw(section, "server_port")
    if port_raw is None:
        raise f.error(section, "server_port", "is required")
    upstream_port = parse_port(port_raw, f"[{section}] server_port", f.source)
    starttls_key = "server_starttls" if f.raw(section, "server_starttls") else "starttls"
    server_starttls = f.flag(section, starttls_key, False)
    local_starttls = f.flag(section, "local_starttls", False)
    if protocol is not MailProtocol.SMTP and (server_starttls or local_starttls):
        f.warnings.add(
            f"[{section}] {'local_starttls' if local_starttls else starttls_key}",
            "emailproxy ignores STARTTLS settings for IMAP/POP; mailwarden honours them",
        )
    cert, key = f.raw(section, "local_certificate_path"), f.raw(section, "local_key_path")
    if (cert is None) != (key is None):
        missing = "local_key_path" if key is None else "local_certificate_path"
        raise f.error(section, missing, "is required when the other local TLS path is set")
    local_tls = LocalTLS.NONE
    if local_starttls:
        local_tls = LocalTLS.STARTTLS
    elif cert is not None:
        local_tls = LocalTLS.IMPLICIT
    listener = Listener(
        name=section,
        protocol=protocol,
        upstream=Upstream(
            host=host,
            port=upstream_port,
            tls=UpstreamTLS.STARTTLS if server_starttls else UpstreamTLS.IMPLICIT,
        ),
        local_address=f.raw(section, "local_address") or "127.0.0.1",
        local_port=local_port,
        local_tls=local_tls,
        local_certificate=cert,
        local_key=key,
    )
    return finish_listener(listener, name, f.warnings), name


def _flow(f: IniFile, account: str) -> Flow:
    text, permission_url = f.get(account, "oauth2_flow"), f.get(account, "permission_url")
    origin = f.origin(account, "oauth2_flow")
    if text is None:
        if permission_url is None:
            raise f.error(origin, "oauth2_flow", "is required when there is no permission_url")
        text = "authorization_code"  # emailproxy's browser flow
    if text not in FLOWS:
        raise f.error(
            origin,
            "oauth2_flow",
            f"{text!r} is not one of {' | '.join(FLOWS)}{suggest(text, FLOWS)}",
        )
    flow = FLOWS[text]
    if flow is Flow.AUTHORIZATION_CODE:
        raise f.error(
            f.origin(account, "permission_url"),
            "permission_url",
            "the interactive authorization_code flow needs a browser consent, which "
            "mailwarden-proxy does not run, and emailproxy's saved refresh_token is encrypted "
            "with the login password; use the native format with a refreshTokenFile "
            "(or the operator's consent flow)",
        )
    if flow is Flow.PASSWORD:
        raise f.error(
            origin,
            "oauth2_flow",
            "password (ROPC with the client's login password "
            "as the mailbox password) is not supported",
        )
    if permission_url is not None and flow is not Flow.DEVICE_CODE:
        f.warnings.add(
            f"[{origin}] oauth2_flow",
            f"emailproxy ignores oauth2_flow = {text} when permission_url is set and runs its "
            f"browser flow instead; mailwarden uses {text} as written (permission_url and "
            "redirect_uri are not used)",
        )
    return flow


class _Credentials:
    """What an account authenticates its client with, as emailproxy resolves it."""

    def __init__(self) -> None:
        self.client_id = ""
        self.client_secret: Secret | None = None
        self.certificate: str | None = None
        self.key: str | None = None
        self.service_account_key: Secret | None = None


def _credentials(f: IniFile, account: str, flow: Flow) -> _Credentials:
    """client_secret / jwt_* / service-account key, in emailproxy's order of precedence."""
    out = _Credentials()
    out.client_id = f.get(account, "client_id") or ""
    secret = f.get(account, "client_secret")
    encrypted_origin = f.origin(account, "client_secret_encrypted")
    if f.get(account, "client_secret_encrypted") is not None:
        if secret is None:
            raise f.error(
                encrypted_origin,
                "client_secret_encrypted",
                "is encrypted with the account's login password, which mailwarden "
                "does not have at load time; put the plain client_secret back",
            )
        f.warnings.add(
            f"[{encrypted_origin}] client_secret_encrypted",
            "ignored: client_secret is also set and wins, as in emailproxy",
        )
    if flow is Flow.SERVICE_ACCOUNT:
        # emailproxy: client_id = file | key, client_secret = the key's path or JSON text
        field = f"[{f.origin(account, 'client_secret')}] client_secret"
        if out.client_id not in ("file", "key") or secret is None:
            raise f.error(
                f.origin(account, "client_id"),
                "client_id",
                "must be `file` or `key` for service_account, with client_secret "
                "holding the key file's path or its JSON",
            )
        if out.client_id == "file":
            sa_key = read_secret_file(secret, field, source=f.source)
        else:
            sa_key = Secret(secret)
        out.service_account_key = check_service_account_key(sa_key, field, source=f.source)
        out.client_id = ""
        return out
    out.certificate = f.get(account, "jwt_certificate_path")
    out.key = f.get(account, "jwt_key_path")
    if out.certificate is not None and out.key is not None and secret is not None:
        f.warnings.add(
            f"[{f.origin(account, 'jwt_certificate_path')}] jwt_certificate_path",
            "ignored: client_secret is also set and wins, as in emailproxy",
        )
        out.certificate = out.key = None
    out.client_secret = Secret(secret) if secret else None
    return out


def _account(f: IniFile, account: str) -> tuple[Account, Namer]:
    def name(field: str) -> str:
        key = ACCOUNT_NAMES.get(field)
        return f"[{f.origin(account, key)}] {key}" if key else f"[{account}]"

    token_url = f.get(account, "token_url")
    scopes = tuple((f.get(account, "oauth2_scope") or "").split())
    provider, tenant = presets.infer_provider(token_url or "")
    # warn about scopes before any fatal error, so a file refused for its token_url
    # still tells the user about its misspelt scope
    lint_scopes(provider, scopes, name("oauth2.scopes"), f.warnings)
    if token_url is None:
        raise f.error(account, "token_url", "is required")
    # before the flow checks: a broken token URL is the first thing to fix
    check_url(token_url, f"[{f.origin(account, 'token_url')}] token_url", source=f.source)
    cached = [k for k in CACHED_KEYS if f.raw(account, k) is not None]
    if cached:
        f.warnings.add(
            f"[{account}] {', '.join(cached)}",
            "ignored: emailproxy's saved tokens are encrypted with the login password; "
            "mailwarden requests new tokens and keeps them in memory only",
        )
    if f.get(account, "oauth2_resource") is not None:
        f.warnings.add(
            f"[{f.origin(account, 'oauth2_resource')}] oauth2_resource",
            "not supported, ignored (a 21Vianet ROPC variant)",
        )
    flow = _flow(f, account)
    creds = _credentials(f, account, flow)
    app_only = flow in (Flow.CLIENT_CREDENTIALS, Flow.SERVICE_ACCOUNT)
    oauth2 = OAuth2(
        provider=provider,
        flow=flow,
        token_url=token_url,
        tenant_id=tenant,
        scopes=scopes,
        # app-only flows never visit an authorization page; keeping the URLs would make
        # `--check` output suggest they matter
        authorize_url=None if app_only else f.get(account, "permission_url"),
        redirect_uri=None if app_only else f.get(account, "redirect_uri"),
        use_pkce=f.flag(f.origin(account, "use_pkce"), "use_pkce", False),
        # a named account impersonates itself; a catch-all whoever logged in (None)
        subject=None if account.startswith("@") else account,
        client_id=creds.client_id,
        client_secret=creds.client_secret,
        client_certificate_path=creds.certificate,
        client_key_path=creds.key,
        service_account_key=creds.service_account_key,
    )
    resets = f.flag(GLOBAL_SECTION, "delete_account_token_on_password_error", True)
    result = Account(
        username=account,
        oauth2=oauth2,
        local_password=None,  # emailproxy meaning: the first successful login sets it
        # emailproxy never resets app-only (client credentials, service account) accounts
        # on a wrong password: that would let any password take the account over
        delete_token_on_password_error=resets and not app_only,
    )
    return finish_account(result, name, f.warnings), name


def _globals(f: IniFile) -> None:
    if not f.parser.has_section(GLOBAL_SECTION):
        return
    f.unknown_keys(GLOBAL_SECTION, GLOBAL_KEYS)
    if f.flag(GLOBAL_SECTION, "encrypt_client_secret_on_first_use", False):
        f.warnings.add(
            f"[{GLOBAL_SECTION}] encrypt_client_secret_on_first_use",
            "ignored: mailwarden never writes to the configuration file",
        )
    if f.flag(GLOBAL_SECTION, "use_login_password_as_client_credentials_secret", False):
        f.warnings.add(
            f"[{GLOBAL_SECTION}] use_login_password_as_client_credentials_secret",
            "not supported: set client_secret in the account section",
        )


def from_text(text: str, *, source: str = "") -> ProxyConfig:
    """A validated ProxyConfig from the text of an emailproxy configuration file."""
    f = IniFile(parse_ini(text, source), source)
    with reported_on_error(f.warnings):
        return _build(f, source)


def _build(f: IniFile, source: str) -> ProxyConfig:
    _globals(f)
    listeners: list[tuple[Listener, Namer]] = []
    accounts: list[tuple[Account, Namer]] = []
    unset_address: list[str] = []
    skipped_catch_alls: list[str] = []
    for section in f.parser.sections():
        match = SERVER_SECTION.match(section)
        if match:
            if f.raw(section, "local_address") is None:
                unset_address.append(f"[{section}]")
            listeners.append(_listener(f, section, match["type"], match["port"]))
        elif "@" in section:
            if section.startswith("@") and not f.catch_all:
                skipped_catch_alls.append(section)
                f.warnings.add(
                    f"[{section}]",
                    "catch-all section ignored: "
                    f"[{GLOBAL_SECTION}] allow_catch_all_accounts is not True",
                )
                continue
            f.unknown_keys(section, ACCOUNT_KEYS + CACHED_KEYS)
            accounts.append(_account(f, section))
        elif section != GLOBAL_SECTION and set(f.parser.options(section)) - DOCUMENTATION_ONLY:
            # emailproxy matches server sections case-sensitively, so `[imap-1993]` is dead
            upper = section.upper()
            hint = (
                f" (did you mean `{upper}`?)"
                if SERVER_SECTION.match(upper)
                else suggest(section, [GLOBAL_SECTION])
            )
            f.warnings.add(f"[{section}]", f"unknown section, ignored{hint}")
    if unset_address:
        f.warnings.add(
            ", ".join(unset_address) + " local_address",
            "not set: emailproxy would listen on all interfaces (::); mailwarden "
            "listens on 127.0.0.1 only (set local_address to change this)",
        )
    if not accounts and skipped_catch_alls:
        raise f.error(
            GLOBAL_SECTION,
            "allow_catch_all_accounts",
            "must be True: the only account sections are catch-alls",
        )
    metrics = Metrics()
    check_together(listeners, accounts, metrics, "metrics port (default)", source=source)
    return ProxyConfig(
        listeners=tuple(listener for listener, _ in listeners),
        accounts=tuple(a for a, _ in accounts),
        metrics=metrics,
        allow_catch_all_accounts=f.catch_all,
        source=source,
        warnings=tuple(f.warnings.items),
    )

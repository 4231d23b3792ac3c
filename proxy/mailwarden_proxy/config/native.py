"""The native configuration format: YAML, camelCase keys, strict.

This is what the operator renders into a Secret and what `--check` prints, so unknown
keys are errors (with a "did you mean"), not warnings: a machine wrote the file, and a
silently ignored key is a setting that silently does not apply.

    version: 1                          # required; the only version so far
    listeners:
      - name: IMAP-1143                 # optional; "<IMAP|POP|SMTP>-<local port>"
        protocol: imap                  # imap | pop3 | smtp
        local:
          address: 127.0.0.1            # default 127.0.0.1
          port: 1143                    # required, 1..65535, unique
          tls: none                     # none | implicit | starttls (then both files below)
          certificateFile: /tls/tls.crt
          keyFile: /tls/tls.key
        upstream:
          host: outlook.office365.com   # required
          port: 993                     # default by protocol and tls (993/143, 995/110, 465/587)
          tls: implicit                 # implicit | starttls | none (needs allowInsecure: true)
          caFile: /etc/ssl/extra-ca.pem # extra trust anchors; certificates are always checked
          allowInsecure: false
    accounts:
      - username: app@example.com       # or "@example.com" / "@" (catch-all)
        localPassword: "..."            # or localPasswordFile (exactly one is required)
        mechanism: xoauth2              # xoauth2 | oauthbearer
        upstreamUsername: box@example.com   # optional; defaults to the login username
        oauth2:
          provider: microsoft           # microsoft | google | generic
          flow: clientCredentials       # clientCredentials | authorizationCode | deviceCode |
                                        # refreshToken | serviceAccount | password
          tenantId: contoso.onmicrosoft.com
          tokenUrl: https://...         # derived for microsoft (from tenantId) and google
          authorizeUrl: https://...     # derived likewise for authorizationCode
          clientId: "..."
          clientSecret: "..."           # or clientSecretFile
          refreshToken: "..."           # or refreshTokenFile
          serviceAccountKey: "{...}"    # or serviceAccountKeyFile (google serviceAccount)
          subject: box@example.com      # serviceAccount: the mailbox to impersonate
          password: "..."               # or passwordFile (password flow: the mailbox password)
          clientCertificateFile: ...    # certificate credential instead of a client secret
          clientKeyFile: ...
          scopes: [...]                 # default from provider and flow
          redirectUri: https://...
          usePkce: false
          caFile: ...                   # extra trust anchors for the token endpoint
    metrics: {address: 127.0.0.1, port: 9464}     # port 0 switches the endpoint off
    limits:
      maxLineLength: 16384              # at least 1024
      maxLiteralLength: 65536
      connectTimeoutSeconds: 15
      loginTimeoutSeconds: 60           # the whole pre-login dialogue
      maxConnectionsPerListener: 2000
      idleTimeoutSeconds: {imap: 1860, pop3: 600, smtp: 600}   # or one number; 0 = never
      failedLocalLogins: {burst: 10, perMinute: 10, delaySeconds: 1}   # burst 0 = off
    cacheStore: null                    # path of the encrypted token cache, or null

Every `*File` key is read when the configuration is loaded (mounted Secret keys); a file
that cannot be read is a ConfigError naming that key. docs/configuration.md has the
full reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

from mailwarden_proxy.config.common import (
    Warnings,
    check_service_account_key,
    read_secret_file,
    reported_on_error,
    suggest,
)
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Limits,
    Listener,
    LocalTLS,
    MailProtocol,
    Mechanism,
    Metrics,
    OAuth2,
    ProviderKind,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.config.validate import (
    Namer,
    check_port,
    check_together,
    finish_account,
    finish_listener,
)
from mailwarden_proxy.secret import Secret

VERSION = 1
E = TypeVar("E", bound=StrEnum)

# The section-name style of emailproxy, so names match across both formats.
LISTENER_PREFIX = {MailProtocol.IMAP: "IMAP", MailProtocol.POP3: "POP", MailProtocol.SMTP: "SMTP"}
DEFAULT_UPSTREAM_PORT = {
    (MailProtocol.IMAP, True): 993,
    (MailProtocol.IMAP, False): 143,
    (MailProtocol.POP3, True): 995,
    (MailProtocol.POP3, False): 110,
    (MailProtocol.SMTP, True): 465,
    (MailProtocol.SMTP, False): 587,
}

# model path -> native key, for error messages from the shared validation
LISTENER_KEYS = {
    "name": "name",
    "local_port": "local.port",
    "local_address": "local.address",
    "local_tls": "local.tls",
    "local_certificate": "local.certificateFile",
    "local_key": "local.keyFile",
    "upstream.host": "upstream.host",
    "upstream.port": "upstream.port",
    "upstream.tls": "upstream.tls",
    "upstream.ca_file": "upstream.caFile",
    "upstream.allow_insecure": "upstream.allowInsecure",
}
OAUTH2_KEYS = {
    "provider": "provider",
    "flow": "flow",
    "token_url": "tokenUrl",
    "tenant_id": "tenantId",
    "client_id": "clientId",
    "client_secret": "clientSecret",
    "scopes": "scopes",
    "authorize_url": "authorizeUrl",
    "redirect_uri": "redirectUri",
    "use_pkce": "usePkce",
    "client_certificate_path": "clientCertificateFile",
    "client_key_path": "clientKeyFile",
    "service_account_key": "serviceAccountKey",
    "subject": "subject",
    "refresh_token": "refreshToken",
    "password": "password",
    "ca_file": "caFile",
}
ACCOUNT_KEYS = {
    "username": "username",
    "local_password": "localPassword",
    "mechanism": "mechanism",
    "upstream_username": "upstreamUsername",
    **{f"oauth2.{k}": f"oauth2.{v}" for k, v in OAUTH2_KEYS.items()},
}
_SECRET_KEYS = ("clientSecret", "refreshToken", "serviceAccountKey", "password")


def _namer(prefix: str, keys: dict[str, str]) -> Namer:
    return lambda field: f"{prefix}.{keys.get(field, field)}"


class _Map:
    """One YAML mapping at `path`, with typed getters; unknown keys are refused up front."""

    def __init__(self, data: object, path: str, known: tuple[str, ...], source: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(path or "(top level)", "must be a mapping", source=source)
        self.path, self.source, self.data = path, source, data
        for key in data:
            if not isinstance(key, str) or key not in known:
                name = str(key)
                if not name.strip() or not name.isprintable():
                    name = repr(key)  # a blank or control-character key must stay visible
                raise ConfigError(
                    self.field(name), f"unknown key{suggest(str(key), known)}", source=source
                )

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.field(key), message, source=self.source)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {value!r}")
        return value

    def req(self, key: str) -> str:
        value = self.text(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, default: int) -> int:
        value = self.data.get(key, default)
        if type(value) is not int:  # bool is an int subclass; `port: yes` is not a port
            raise self.error(key, f"must be an integer, not {value!r}")
        return value

    def number(self, key: str, default: float, *, zero: bool = False) -> float:
        """A positive number (or zero too, with `zero`)."""
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, not {value!r}")
        if not (value >= 0 if zero else value > 0) or not math.isfinite(value):
            kind = "zero or a positive number" if zero else "a positive number"
            raise self.error(key, f"must be {kind}, not {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def enum(self, key: str, cls: type[E], default: E | None = None) -> E:
        value = self.data.get(key)
        choices = " | ".join(m.value for m in cls)
        if value is None and default is not None:
            return default
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted `off`/`no` as false
            raise self.error(key, f"got a boolean ({value}); write one of {choices}")
        if not isinstance(value, str) or value not in {m.value for m in cls}:
            hint = suggest(value, [m.value for m in cls]) if isinstance(value, str) else ""
            raise self.error(key, f"{value!r} is not one of {choices}{hint}")
        return cls(value)

    def secret(self, key: str) -> Secret | None:
        """`key` inline or `keyFile` read now; both at once is ambiguous."""
        inline, path = self.text(key), self.text(key + "File")
        if inline is not None and path is not None:
            raise self.error(key, f"give either {key} or {key}File, not both")
        if path is not None:
            return read_secret_file(path, self.field(key + "File"), source=self.source)
        if inline is not None and not inline:
            raise self.error(key, "must not be empty")
        return Secret(inline) if inline is not None else None

    def child(self, key: str, known: tuple[str, ...], *, required: bool = False) -> _Map:
        value = self.data.get(key)
        if value is None and not required:
            value = {}
        return _Map(value, self.field(key), known, self.source)

    def items(self, key: str) -> list[object]:
        value = self.data.get(key)
        if not isinstance(value, list):
            raise self.error(key, "must be a list")
        return value


def _with_files(*keys: str) -> tuple[str, ...]:
    return tuple(k for key in keys for k in (key, key + "File"))


def _listener(item: _Map, warnings: Warnings) -> Listener:
    protocol = item.enum("protocol", MailProtocol)
    local = item.child(
        "local", ("address", "port", "tls", "certificateFile", "keyFile"), required=True
    )
    up = item.child("upstream", ("host", "port", "tls", "caFile", "allowInsecure"), required=True)
    if "port" not in local.data:
        raise local.error("port", "is required (an explicit local port)")
    port = local.integer("port", 0)
    tls = up.enum("tls", UpstreamTLS, UpstreamTLS.IMPLICIT)
    default_port = DEFAULT_UPSTREAM_PORT[protocol, tls is UpstreamTLS.IMPLICIT]
    listener = Listener(
        name=item.text("name") or f"{LISTENER_PREFIX[protocol]}-{port}",
        protocol=protocol,
        upstream=Upstream(
            host=up.req("host"),
            port=up.integer("port", default_port),
            tls=tls,
            ca_file=up.text("caFile"),
            allow_insecure=up.flag("allowInsecure", False),
        ),
        local_address=local.text("address", "127.0.0.1") or "",
        local_port=port,
        local_tls=local.enum("tls", LocalTLS, LocalTLS.NONE),
        local_certificate=local.text("certificateFile"),
        local_key=local.text("keyFile"),
    )
    return finish_listener(listener, _namer(item.path, LISTENER_KEYS), warnings)


def _oauth2(m: _Map) -> OAuth2:
    scopes = m.data.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
        raise m.error("scopes", "must be a list of non-empty strings")
    key = m.secret("serviceAccountKey")
    if key is not None:
        check_service_account_key(key, m.field("serviceAccountKey"), source=m.source)
    return OAuth2(
        provider=m.enum("provider", ProviderKind),
        flow=m.enum("flow", Flow),
        token_url=m.text("tokenUrl") or "",
        client_id=m.text("clientId") or "",
        client_secret=m.secret("clientSecret"),
        scopes=tuple(s for scope in scopes for s in scope.split()),
        tenant_id=m.text("tenantId"),
        authorize_url=m.text("authorizeUrl"),
        redirect_uri=m.text("redirectUri"),
        use_pkce=m.flag("usePkce", False),
        client_certificate_path=m.text("clientCertificateFile"),
        client_key_path=m.text("clientKeyFile"),
        service_account_key=key,
        subject=m.text("subject"),
        refresh_token=m.secret("refreshToken"),
        password=m.secret("password"),
        ca_file=m.text("caFile"),
    )


_OAUTH2_ALLOWED = tuple(v for v in OAUTH2_KEYS.values() if v not in _SECRET_KEYS) + _with_files(
    *_SECRET_KEYS
)
_ACCOUNT_ALLOWED = (
    "username",
    "mechanism",
    "upstreamUsername",
    "oauth2",
    *_with_files("localPassword"),
)


def _account(item: _Map, warnings: Warnings) -> Account:
    local_password = item.secret("localPassword")
    if local_password is None:
        # emailproxy's "first login sets it" is only for emailproxy files: a rendered
        # config always knows the password the app was given.
        raise item.error("localPassword", "is required (or localPasswordFile)")
    account = Account(
        username=item.req("username"),
        oauth2=_oauth2(item.child("oauth2", _OAUTH2_ALLOWED, required=True)),
        local_password=local_password,
        mechanism=item.enum("mechanism", Mechanism, Mechanism.XOAUTH2),
        upstream_username=item.text("upstreamUsername"),
    )
    return finish_account(account, _namer(item.path, ACCOUNT_KEYS), warnings)


def _each(
    top: _Map,
    key: str,
    known: tuple[str, ...],
    build: Callable[[_Map, Warnings], Any],
    warnings: Warnings,
) -> list[tuple[Any, Namer]]:
    built = []
    for i, raw in enumerate(top.items(key)):
        item = _Map(raw, f"{key}[{i}]", known, top.source)
        names = LISTENER_KEYS if key == "listeners" else ACCOUNT_KEYS
        built.append((build(item, warnings), _namer(item.path, names)))
    return built


_LIMITS_KEYS = (
    "maxLineLength",
    "maxLiteralLength",
    "connectTimeoutSeconds",
    "loginTimeoutSeconds",
    "maxConnectionsPerListener",
    "idleTimeoutSeconds",
    "failedLocalLogins",
)
_PROTOCOL_NAMES = tuple(p.value for p in MailProtocol)
# RFC 3501 §5.4: an IMAP autologout timer must be at least 30 minutes
IMAP_MIN_IDLE_TIMEOUT = 30 * 60


def _idle_timeouts(lim: _Map) -> dict[MailProtocol, float]:
    """`idleTimeoutSeconds`: one number for every protocol, or a mapping by protocol."""
    defaults = {p: Limits().idle_timeout(p) for p in MailProtocol}
    raw = lim.data.get("idleTimeoutSeconds")
    if raw is None:
        return defaults
    if not isinstance(raw, dict):
        every = lim.number("idleTimeoutSeconds", 0, zero=True)
        return dict.fromkeys(MailProtocol, every)
    by = lim.child("idleTimeoutSeconds", _PROTOCOL_NAMES)
    return {p: by.number(p.value, defaults[p], zero=True) for p in MailProtocol}


def _limits(lim: _Map, warnings: Warnings) -> Limits:
    default = Limits()
    idle = _idle_timeouts(lim)
    failed = lim.child("failedLocalLogins", ("burst", "perMinute", "delaySeconds"))
    limits = Limits(
        max_line=lim.integer("maxLineLength", default.max_line),
        max_literal=lim.integer("maxLiteralLength", default.max_literal),
        connect_timeout=lim.number("connectTimeoutSeconds", default.connect_timeout),
        login_timeout=lim.number("loginTimeoutSeconds", default.login_timeout),
        max_connections=lim.integer("maxConnectionsPerListener", default.max_connections),
        imap_idle_timeout=idle[MailProtocol.IMAP],
        pop3_idle_timeout=idle[MailProtocol.POP3],
        smtp_idle_timeout=idle[MailProtocol.SMTP],
        failed_login_burst=failed.integer("burst", default.failed_login_burst),
        failed_logins_per_minute=failed.number("perMinute", default.failed_logins_per_minute),
        failed_login_delay=failed.number("delaySeconds", default.failed_login_delay, zero=True),
    )
    if limits.max_line < 1024:  # RFC 5321 allows 1000-octet lines; anything less breaks SMTP
        raise lim.error("maxLineLength", f"{limits.max_line} is below the minimum of 1024")
    if limits.max_literal < 0:
        raise lim.error("maxLiteralLength", f"{limits.max_literal} must not be negative")
    if limits.max_connections < 1:
        raise lim.error("maxConnectionsPerListener", f"{limits.max_connections} must be at least 1")
    if limits.failed_login_burst < 0:
        raise failed.error("burst", f"{limits.failed_login_burst} must not be negative")
    if 0 < limits.imap_idle_timeout < IMAP_MIN_IDLE_TIMEOUT:
        field = "idleTimeoutSeconds" + (
            ".imap" if isinstance(lim.data.get("idleTimeoutSeconds"), dict) else ""
        )
        warnings.add(
            lim.field(field),
            f"{limits.imap_idle_timeout:g} s is shorter than IMAP's 30 minutes (RFC 3501 "
            "§5.4): clients in IDLE re-issue it only every 29 minutes and would be cut off",
        )
    return limits


def from_dict(data: object, *, source: str = "") -> ProxyConfig:
    """A validated ProxyConfig from an already parsed YAML document."""
    warnings = Warnings(source)
    with reported_on_error(warnings):
        return _from_dict(data, source, warnings)


def _from_dict(data: object, source: str, warnings: Warnings) -> ProxyConfig:
    top = _Map(
        data, "", ("version", "listeners", "accounts", "metrics", "limits", "cacheStore"), source
    )
    version = top.data.get("version")
    if type(version) is not int or version != VERSION:
        raise top.error("version", f"must be {VERSION}, not {version!r}")
    listener_known = ("name", "protocol", "local", "upstream")
    listeners = _each(top, "listeners", listener_known, _listener, warnings)
    accounts = _each(top, "accounts", _ACCOUNT_ALLOWED, _account, warnings)
    m = top.child("metrics", ("address", "port"))
    metrics = Metrics(address=m.text("address", "127.0.0.1") or "", port=m.integer("port", 9464))
    if metrics.port:
        check_port(metrics.port, m.field("port"), source=source)
    limits = _limits(top.child("limits", _LIMITS_KEYS), warnings)
    check_together(listeners, accounts, metrics, m.field("port"), source=source)
    account_objs = tuple(a for a, _ in accounts)
    return ProxyConfig(
        listeners=tuple(listener for listener, _ in listeners),
        accounts=account_objs,
        metrics=metrics,
        limits=limits,
        allow_catch_all_accounts=any(a.is_catch_all for a in account_objs),
        cache_store=top.text("cacheStore"),
        source=source,
        warnings=tuple(warnings.items),
    )

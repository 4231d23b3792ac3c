"""The typed configuration model shared by the proxy and the operator.

Everything here is immutable and already validated: loaders (`native`, `emailproxy`)
build these objects and raise `ConfigError` naming the offending field, so code that
receives a `ProxyConfig` never re-checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden_proxy.secret import Secret


class MailProtocol(StrEnum):
    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


class UpstreamTLS(StrEnum):
    IMPLICIT = "implicit"
    STARTTLS = "starttls"
    NONE = "none"  # only with allow_insecure: tokens would travel in clear text


class LocalTLS(StrEnum):
    NONE = "none"
    IMPLICIT = "implicit"
    STARTTLS = "starttls"


class Mechanism(StrEnum):
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"


class ProviderKind(StrEnum):
    MICROSOFT = "microsoft"
    GOOGLE = "google"
    GENERIC = "generic"


class Flow(StrEnum):
    CLIENT_CREDENTIALS = "clientCredentials"
    AUTHORIZATION_CODE = "authorizationCode"  # consent run elsewhere; here it means "refresh token"
    DEVICE_CODE = "deviceCode"
    REFRESH_TOKEN = "refreshToken"
    SERVICE_ACCOUNT = "serviceAccount"
    PASSWORD = "password"  # ROPC


DEFAULT_MAX_LINE = 16 * 1024
DEFAULT_MAX_LITERAL = 64 * 1024


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    tls: UpstreamTLS = UpstreamTLS.IMPLICIT
    ca_file: str | None = None  # extra CA bundle; system trust store otherwise
    allow_insecure: bool = False  # permits tls=none; certificate checks are never switched off


@dataclass(frozen=True)
class Listener:
    name: str  # e.g. "IMAP-2993": used in logs and metrics
    protocol: MailProtocol
    upstream: Upstream
    local_address: str = "127.0.0.1"
    local_port: int = 0
    local_tls: LocalTLS = LocalTLS.NONE
    local_certificate: str | None = None
    local_key: str | None = None


@dataclass(frozen=True)
class OAuth2:
    provider: ProviderKind
    flow: Flow
    token_url: str
    client_id: str = ""
    client_secret: Secret | None = None
    scopes: tuple[str, ...] = ()
    tenant_id: str | None = None
    authorize_url: str | None = None  # emailproxy's permission_url
    redirect_uri: str | None = None
    use_pkce: bool = False
    # certificate credential (msal client credentials with a certificate; emailproxy jwt_*)
    client_certificate_path: str | None = None
    client_key_path: str | None = None
    # google service account: the key JSON and the mailbox to impersonate (domain-wide delegation)
    service_account_key: Secret | None = None
    subject: str | None = None
    refresh_token: Secret | None = None
    # ROPC: the upstream password (not the local one)
    password: Secret | None = None
    ca_file: str | None = None  # extra CA bundle for the token endpoint


@dataclass(frozen=True)
class Account:
    """A mailbox, or a catch-all: `user@domain`, `@domain` or `@`."""

    username: str
    oauth2: OAuth2
    # None means emailproxy's meaning: the password of the first successful login becomes
    # the local password (held as a keyed hash in memory only).
    local_password: Secret | None = None
    mechanism: Mechanism = Mechanism.XOAUTH2
    # the identity sent upstream; defaults to the username the client logged in with
    upstream_username: str | None = None
    delete_token_on_password_error: bool = False

    @property
    def is_catch_all(self) -> bool:
        return self.username.startswith("@")


@dataclass(frozen=True)
class Metrics:
    address: str = "127.0.0.1"
    port: int = 9464  # 0 switches the HTTP endpoint off


# After login, a session with no bytes either way for this long is closed (0: never).
# IMAP: clients re-issue IDLE every 29 minutes (RFC 2177) and RFC 3501 §5.4 wants an
# autologout timer of at least 30; POP3: at least 10 minutes (RFC 1939 §3); SMTP: a
# client waits up to 10 minutes for the reply to the end of DATA (RFC 5321 §4.5.3.2.6),
# so the relay must not give up sooner (servers close idle clients after 5 themselves).
DEFAULT_IDLE_TIMEOUT = {
    MailProtocol.IMAP: 31 * 60.0,
    MailProtocol.POP3: 10 * 60.0,
    MailProtocol.SMTP: 10 * 60.0,
}


@dataclass(frozen=True)
class Limits:
    max_line: int = DEFAULT_MAX_LINE
    max_literal: int = DEFAULT_MAX_LITERAL
    connect_timeout: float = 15.0
    login_timeout: float = 60.0  # a client must finish the pre-auth dialogue within this
    # concurrent client connections per listener; more are answered "try later" and closed
    # (1,000 idle IMAP sessions through one listener is a case the bench measures)
    max_connections: int = 2000
    imap_idle_timeout: float = DEFAULT_IDLE_TIMEOUT[MailProtocol.IMAP]
    pop3_idle_timeout: float = DEFAULT_IDLE_TIMEOUT[MailProtocol.POP3]
    smtp_idle_timeout: float = DEFAULT_IDLE_TIMEOUT[MailProtocol.SMTP]
    # failed local logins per source address (token bucket): `failed_login_burst` in a
    # row, then `failed_logins_per_minute`; beyond that a login is refused unchecked,
    # after `failed_login_delay` seconds, with a "try again later" reply. Burst 0: off.
    failed_login_burst: int = 10
    failed_logins_per_minute: float = 10.0
    failed_login_delay: float = 1.0

    def idle_timeout(self, protocol: MailProtocol) -> float:
        """Seconds without traffic after login before a session is closed; 0 is never."""
        match protocol:
            case MailProtocol.IMAP:
                return self.imap_idle_timeout
            case MailProtocol.POP3:
                return self.pop3_idle_timeout
            case MailProtocol.SMTP:
                return self.smtp_idle_timeout


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[Listener, ...]
    accounts: tuple[Account, ...]
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = field(default_factory=Limits)
    allow_catch_all_accounts: bool = False
    cache_store: str | None = None
    source: str = ""  # the file it was loaded from, for messages
    warnings: tuple[str, ...] = ()

    def account_for(self, username: str) -> Account | None:
        """The account section that serves `username`: exact, then `@domain`, then `@`.

        Matching is case-insensitive, as mail addresses are in practice.
        """
        wanted = username.lower()
        by_name = {a.username.lower(): a for a in self.accounts}
        if wanted in by_name:
            return by_name[wanted]
        if not self.allow_catch_all_accounts:
            return None
        _, _, domain = wanted.rpartition("@")
        if "@" in wanted and f"@{domain}" in by_name:
            return by_name[f"@{domain}"]
        return by_name.get("@")

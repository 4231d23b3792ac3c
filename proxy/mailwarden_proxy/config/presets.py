"""Provider presets: token endpoints, default scopes, and scope spell-checking.

Shared by the proxy's loaders and the operator (which renders MailAccounts with the same
defaults), so "microsoft + tenant" means the same URL everywhere. Pure data and functions.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailwarden_proxy.config.model import Flow, MailProtocol, ProviderKind, UpstreamTLS

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
MICROSOFT_TOKEN_URL = MICROSOFT_AUTHORITY + "/{tenant}/oauth2/v2.0/token"
MICROSOFT_AUTHORIZE_URL = MICROSOFT_AUTHORITY + "/{tenant}/oauth2/v2.0/authorize"
MICROSOFT_DEVICE_CODE_URL = MICROSOFT_AUTHORITY + "/{tenant}/oauth2/v2.0/devicecode"
# The tenant alias delegated flows use when none is given: any work or school account.
MICROSOFT_DEFAULT_DELEGATED_TENANT = "organizations"
MICROSOFT_RESOURCE = "https://outlook.office365.com"
MICROSOFT_DELEGATED_SCOPES = (
    f"{MICROSOFT_RESOURCE}/IMAP.AccessAsUser.All",
    f"{MICROSOFT_RESOURCE}/POP.AccessAsUser.All",
    f"{MICROSOFT_RESOURCE}/SMTP.Send",
    "offline_access",
)
# Microsoft's client-credentials grant accepts exactly one scope, `<resource>/.default`:
# the application permissions granted to the app registration (IMAP.AccessAsApp, ...).
MICROSOFT_APP_SCOPES = (f"{MICROSOFT_RESOURCE}/.default",)

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_MAIL_SCOPES = ("https://mail.google.com/",)

# Sovereign clouds use the same path layout as the global one (tenant first).
MICROSOFT_LOGIN_HOSTS = frozenset(
    {"login.microsoftonline.com", "login.microsoftonline.us", "login.partner.microsoftonline.cn"}
)
GOOGLE_HOSTS = frozenset({"oauth2.googleapis.com", "accounts.google.com", "www.googleapis.com"})
# Tenant aliases that only work for delegated flows; app-only tokens need a real tenant.
MICROSOFT_MULTI_TENANT = frozenset({"common", "organizations", "consumers"})

# Scope names Exchange Online accepts on its mail resources, and the OpenID ones.
MICROSOFT_RESOURCE_SCOPES = (
    "IMAP.AccessAsUser.All",
    "POP.AccessAsUser.All",
    "SMTP.Send",
    ".default",
)
MICROSOFT_BARE_SCOPES = ("offline_access", "openid", "profile", "email")
_MICROSOFT_MAIL_RESOURCES = (
    "https://outlook.office365.com/",
    "https://outlook.office.com/",
    "https://outlook.office365.us/",
    "https://partner.outlook.cn/",
)
_DELEGATED = frozenset(s.lower() for s in (*MICROSOFT_RESOURCE_SCOPES[:3], *MICROSOFT_BARE_SCOPES))


def infer_provider(token_url: str) -> tuple[ProviderKind, str | None]:
    """The provider a token URL belongs to, and the Microsoft tenant in its path."""
    try:
        parts = urlsplit(token_url)
        host = (parts.hostname or "").lower()
    except ValueError:
        return ProviderKind.GENERIC, None
    if host in MICROSOFT_LOGIN_HOSTS:
        tenant = parts.path.strip("/").split("/", 1)[0]
        return ProviderKind.MICROSOFT, tenant or None
    if host in GOOGLE_HOSTS:
        return ProviderKind.GOOGLE, None
    return ProviderKind.GENERIC, None


def token_url_for(provider: ProviderKind, tenant: str | None) -> str | None:
    if provider is ProviderKind.MICROSOFT:
        return MICROSOFT_TOKEN_URL.format(tenant=tenant) if tenant else None
    if provider is ProviderKind.GOOGLE:
        return GOOGLE_TOKEN_URL
    return None


def authorize_url_for(provider: ProviderKind, tenant: str | None) -> str | None:
    if provider is ProviderKind.MICROSOFT:
        return MICROSOFT_AUTHORIZE_URL.format(tenant=tenant) if tenant else None
    if provider is ProviderKind.GOOGLE:
        return GOOGLE_AUTHORIZE_URL
    return None


def device_authorization_url_for(provider: ProviderKind, tenant: str | None) -> str | None:
    """Microsoft's device authorization endpoint. Google's device flow does not allow the
    Gmail scope, so there is deliberately no Google preset."""
    if provider is ProviderKind.MICROSOFT:
        return MICROSOFT_DEVICE_CODE_URL.format(tenant=tenant) if tenant else None
    return None


def default_scopes(provider: ProviderKind, flow: Flow) -> tuple[str, ...]:
    if provider is ProviderKind.MICROSOFT:
        return (
            MICROSOFT_APP_SCOPES if flow is Flow.CLIENT_CREDENTIALS else MICROSOFT_DELEGATED_SCOPES
        )
    if provider is ProviderKind.GOOGLE:
        return GOOGLE_MAIL_SCOPES
    return ()


def _split_microsoft(scope: str) -> tuple[str, str]:
    """(resource prefix or '', scope name)."""
    for resource in _MICROSOFT_MAIL_RESOURCES:
        if scope.lower().startswith(resource):
            return scope[: len(resource)], scope[len(resource) :]
    return "", scope


def microsoft_scope_problems(scopes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(scope, message) for each scope Exchange Online would refuse, with a suggestion.

    Scopes of other resources (Graph, custom APIs) are left alone: only the mail
    resources and the OpenID names are known here. Case is ignored, as Entra ID does.
    """
    problems: list[tuple[str, str]] = []
    for scope in scopes:
        resource, name = _split_microsoft(scope)
        if resource:
            known: tuple[str, ...] = MICROSOFT_RESOURCE_SCOPES
        elif "://" in scope:
            continue
        else:
            known = MICROSOFT_BARE_SCOPES + MICROSOFT_RESOURCE_SCOPES
        if name.lower() in {k.lower() for k in known}:
            if not resource and name.lower() in {k.lower() for k in MICROSOFT_RESOURCE_SCOPES}:
                problems.append(
                    (scope, f"needs its resource: `{MICROSOFT_RESOURCE}/{name}`"),
                )
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if not close:
            lowered = {k.lower(): k for k in known}
            close = [lowered[m] for m in difflib.get_close_matches(name.lower(), lowered, n=1)]
        hint = f"; did you mean `{resource}{close[0]}`?" if close else ""
        problems.append((scope, f"is not a Microsoft mail scope{hint}"))
    return problems


def is_microsoft_mail_scope(scope: str) -> bool:
    return bool(_split_microsoft(scope)[0])


def microsoft_app_only(scopes: tuple[str, ...]) -> tuple[str, ...] | None:
    """The `.default` scope to use instead when `scopes` are delegated ones, else None.

    The client-credentials grant refuses delegated scopes (AADSTS1002012); the app's
    application permissions are requested with the resource's `.default` scope. The
    resource of the first mail scope is kept (outlook.office.com vs outlook.office365.com).
    """
    if not any(_split_microsoft(s)[1].lower() in _DELEGATED for s in scopes):
        return None
    resources = [r for r, _ in map(_split_microsoft, scopes) if r]
    resource = resources[0].rstrip("/") if resources else MICROSOFT_RESOURCE
    return (f"{resource}/.default",)


@dataclass(frozen=True)
class ServerPreset:
    host: str
    port: int
    tls: UpstreamTLS


# The mail servers each provider documents for OAuth 2.0 clients. Microsoft's SMTP
# submission endpoint offers only STARTTLS on 587; Gmail offers implicit TLS on 465
# (the preset) and STARTTLS on 587, which a caller gets by asking for starttls.
SERVER_PRESETS: dict[tuple[ProviderKind, MailProtocol], ServerPreset] = {
    (ProviderKind.MICROSOFT, MailProtocol.IMAP): ServerPreset(
        "outlook.office365.com", 993, UpstreamTLS.IMPLICIT
    ),
    (ProviderKind.MICROSOFT, MailProtocol.POP3): ServerPreset(
        "outlook.office365.com", 995, UpstreamTLS.IMPLICIT
    ),
    (ProviderKind.MICROSOFT, MailProtocol.SMTP): ServerPreset(
        "smtp.office365.com", 587, UpstreamTLS.STARTTLS
    ),
    (ProviderKind.GOOGLE, MailProtocol.IMAP): ServerPreset(
        "imap.gmail.com", 993, UpstreamTLS.IMPLICIT
    ),
    (ProviderKind.GOOGLE, MailProtocol.POP3): ServerPreset(
        "pop.gmail.com", 995, UpstreamTLS.IMPLICIT
    ),
    (ProviderKind.GOOGLE, MailProtocol.SMTP): ServerPreset(
        "smtp.gmail.com", 465, UpstreamTLS.IMPLICIT
    ),
}


def server_preset(provider: ProviderKind, protocol: MailProtocol) -> ServerPreset | None:
    """The provider's server for `protocol`, or None (generic providers have none)."""
    return SERVER_PRESETS.get((provider, protocol))

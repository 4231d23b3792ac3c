"""Choosing a token provider for an account.

Provider modules are imported here, inside the function, and only for the provider an
account names: msal and google-auth together add ~25 MB to a process that may need
neither.
"""

from __future__ import annotations

from mailwarden_proxy.config.model import Account, Flow, ProviderKind
from mailwarden_proxy.tokens.base import TokenProvider
from mailwarden_proxy.tokens.generic import GenericProvider, RefreshTokenHook
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT


def provider_for(
    account: Account,
    *,
    on_refresh_token: RefreshTokenHook | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> TokenProvider:
    """A provider for `account`'s provider and flow; ValueError for a combination that
    doesn't exist (configuration validation should have refused it already)."""
    oauth2 = account.oauth2
    if oauth2.provider is ProviderKind.MICROSOFT:
        from mailwarden_proxy.tokens.msal_provider import MsalProvider

        return MsalProvider(account, on_refresh_token=on_refresh_token, timeout=timeout)
    if oauth2.provider is ProviderKind.GOOGLE and (
        oauth2.flow is Flow.SERVICE_ACCOUNT or oauth2.client_secret is not None
    ):
        from mailwarden_proxy.tokens.google_provider import GoogleProvider

        return GoogleProvider(account, on_refresh_token=on_refresh_token, timeout=timeout)
    # generic endpoints, and Google flows google-auth has no class for (e.g. a public client)
    return GenericProvider(account, on_refresh_token=on_refresh_token, timeout=timeout)

"""Choosing a token provider for an account.

Provider modules are imported here, inside the function, and only for the provider an
account names: msal and google-auth together add ~25 MB to a process that may need
neither. The generic provider is imported the same way: every provider module imports
requests (with urllib3, charset_normalizer and idna: 6 MB of an idle proxy's 40 MB RSS)
and the broker imports this module at start-up, so requests waits for the first token
request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from mailwarden_proxy.config.model import Account, Flow, ProviderKind
from mailwarden_proxy.tokens.base import DEFAULT_TIMEOUT, TokenProvider

if TYPE_CHECKING:
    from mailwarden_proxy.secret import Secret
    from mailwarden_proxy.tokens.generic import RefreshTokenHook
    from mailwarden_proxy.tokens.store import TokenStore


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
    from mailwarden_proxy.tokens.generic import GenericProvider

    return GenericProvider(account, on_refresh_token=on_refresh_token, timeout=timeout)


def stored_provider_factory(
    store: TokenStore, *, timeout: float = DEFAULT_TIMEOUT
) -> Callable[[Account], TokenProvider]:
    """A provider factory for the broker that starts each account from its newest stored
    refresh token (`TokenStore.initial`) and stores every rotation."""

    def make(account: Account) -> TokenProvider:
        seed = account.oauth2.refresh_token
        initial = store.initial(account.username, seed)
        if initial is not seed:
            # only the provider sees the stored token: the broker keys on the configured
            # account, which a reload compares with the next configuration
            account = replace(account, oauth2=replace(account.oauth2, refresh_token=initial))

        def keep(username: str, token: Secret) -> None:
            store.remember(username, token, seed=seed)

        return provider_for(account, on_refresh_token=keep, timeout=timeout)

    return make

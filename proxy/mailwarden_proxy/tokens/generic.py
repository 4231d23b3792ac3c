"""A plain OAuth 2.0 token endpoint client (RFC 6749) for providers without a library.

Also home of `RotatingRefreshToken`, which the msal and google providers share: identity
providers may answer a refresh with a new refresh token and retire the old one, so the
newest is kept in memory and handed to a hook that can persist it (operator Secret,
`--cache-store`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailwarden_proxy.config.model import Account, Flow, OAuth2
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import AccessToken, PermanentTokenError, TokenError
from mailwarden_proxy.tokens.errors import from_token_response, without_credentials
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT, make_session, post_token_request

log = logging.getLogger(__name__)

RefreshTokenHook = Callable[[str, Secret], None]
"""Called as `hook(account_username, newest_refresh_token)` after a rotation."""


class RotatingRefreshToken:
    """The newest refresh token of one account, thread-safe."""

    def __init__(self, account: str, initial: Secret | None, hook: RefreshTokenHook | None) -> None:
        self._account = account
        self._value = initial
        self._hook = hook
        self._lock = threading.Lock()

    @property
    def current(self) -> Secret | None:
        with self._lock:
            return self._value

    def clear(self, expected: Secret | None) -> None:
        """Forget the token if it is still `expected` (it was refused)."""
        with self._lock:
            if self._value is expected:
                self._value = None

    def update(self, value: str | None) -> None:
        if not value:
            return
        with self._lock:
            if self._value is not None and self._value.equals(value):
                return
            self._value = Secret(value)
        if self._hook is not None:
            try:
                self._hook(self._account, Secret(value))
            except Exception:  # a failing store must not fail the login that got a token
                log.exception("storing the new refresh token of %s failed", self._account)


def fetch_masking_credentials(
    fetch: Callable[[str], AccessToken],
    username: str,
    oauth2: OAuth2,
    refresh_token: RotatingRefreshToken,
) -> AccessToken:
    """`fetch(username)`, with every credential the provider sends masked in its errors
    (`errors.without_credentials`: an identity provider may quote one back bare)."""
    try:
        return fetch(username)
    except TokenError as exc:
        o = oauth2
        sent = (o.client_secret, o.password, o.refresh_token, refresh_token.current)
        raise without_credentials(exc, sent) from None


def upstream_login(account: Account, username: str) -> str:
    """The mailbox a per-user grant is for: explicit upstream name, else who logged in."""
    if account.upstream_username:
        return account.upstream_username
    return username if account.is_catch_all else account.username


def require(value: Secret | None, code: str, what: str) -> str:
    if not value:
        raise PermanentTokenError(code, f"{what} is not configured")
    return value.reveal()


class GenericProvider:
    """client_credentials, refresh_token (also for authorizationCode) and password grants."""

    SUPPORTED = frozenset(
        {Flow.CLIENT_CREDENTIALS, Flow.REFRESH_TOKEN, Flow.AUTHORIZATION_CODE, Flow.PASSWORD}
    )

    def __init__(
        self,
        account: Account,
        *,
        on_refresh_token: RefreshTokenHook | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if account.oauth2.flow not in self.SUPPORTED:
            raise ValueError(f"the generic provider has no {account.oauth2.flow} flow")
        self._account = account
        self._oauth2 = account.oauth2
        self._session = make_session(self._oauth2.token_url, self._oauth2.ca_file, timeout)
        self.refresh_token = RotatingRefreshToken(
            account.username, self._oauth2.refresh_token, on_refresh_token
        )

    def fetch(self, username: str) -> AccessToken:
        return fetch_masking_credentials(self._fetch, username, self._oauth2, self.refresh_token)

    def _fetch(self, username: str) -> AccessToken:
        oauth2 = self._oauth2
        data = {"client_id": oauth2.client_id, "scope": " ".join(oauth2.scopes)}
        if oauth2.client_secret:
            data["client_secret"] = oauth2.client_secret.reveal()
        if oauth2.flow is Flow.CLIENT_CREDENTIALS:
            data["grant_type"] = "client_credentials"
        elif oauth2.flow is Flow.PASSWORD:
            data["grant_type"] = "password"
            data["username"] = upstream_login(self._account, username)
            data["password"] = require(oauth2.password, "no_password", "the upstream password")
        else:
            data["grant_type"] = "refresh_token"
            data["refresh_token"] = require(
                self.refresh_token.current, "consent_required", "a refresh token"
            )
        started = time.time()
        body = post_token_request(self._session, oauth2.token_url, data)
        value, expires_in, refresh = from_token_response(body)
        self.refresh_token.update(refresh)
        return AccessToken(Secret(value), started + expires_in)

    def close(self) -> None:
        self._session.close()

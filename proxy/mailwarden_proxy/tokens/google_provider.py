"""Google Workspace flows through google-auth.

Imported only when an account uses the google provider (see `tokens.factory`). Two flows:
a service account with domain-wide delegation, which impersonates `subject` or else the
mailbox that logged in; and an authorized-user refresh token. google-auth's transport
gets our own session (`tokens.http`), so `REQUESTS_CA_BUNDLE` can't replace the CA.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any

from mailwarden_proxy.config.model import Account, Flow
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import (
    AccessToken,
    PermanentTokenError,
    TemporaryTokenError,
    TokenError,
)
from mailwarden_proxy.tokens.errors import (
    from_exception,
    from_oauth_error,
    scrub,
)
from mailwarden_proxy.tokens.generic import (
    RefreshTokenHook,
    RotatingRefreshToken,
    fetch_masking_credentials,
    require,
)
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT, make_session

GMAIL_SCOPE = "https://mail.google.com/"


class GoogleProvider:
    SUPPORTED = frozenset({Flow.SERVICE_ACCOUNT, Flow.REFRESH_TOKEN, Flow.AUTHORIZATION_CODE})

    def __init__(
        self,
        account: Account,
        *,
        on_refresh_token: RefreshTokenHook | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        oauth2 = account.oauth2
        if oauth2.flow not in self.SUPPORTED:
            raise ValueError(f"the google provider has no {oauth2.flow} flow")
        self._account = account
        self._oauth2 = oauth2
        self._scopes = list(oauth2.scopes) or [GMAIL_SCOPE]
        self._session = make_session(oauth2.token_url, oauth2.ca_file, timeout)
        self._timeout = timeout
        self.refresh_token = RotatingRefreshToken(
            account.username, oauth2.refresh_token, on_refresh_token
        )
        self._base: Any = None  # the parsed service account, reused for every subject
        self._lock = threading.Lock()

    def fetch(self, username: str) -> AccessToken:
        return fetch_masking_credentials(self._fetch, username, self._oauth2, self.refresh_token)

    def _fetch(self, username: str) -> AccessToken:
        started = time.time()
        try:
            credentials = self._credentials(username)
            credentials.refresh(self._request)
        except TokenError:
            raise
        except Exception as exc:
            raise _from_google_exception(exc) from None
        if self._oauth2.flow is not Flow.SERVICE_ACCOUNT:
            self.refresh_token.update(credentials.refresh_token)
        expiry = credentials.expiry  # naive UTC datetime, or None
        expires_at = _utc_timestamp(expiry) if expiry is not None else started + 3600
        return AccessToken(Secret(str(credentials.token)), expires_at)

    def close(self) -> None:
        self._session.close()

    def _request(self, url: str, method: str = "GET", **kwargs: Any) -> Any:
        """google-auth's transport callable on our session, with our timeout."""
        from google.auth.transport.requests import Request

        kwargs["timeout"] = self._timeout
        return Request(session=self._session)(url, method=method, **kwargs)

    def _credentials(self, username: str) -> Any:
        oauth2 = self._oauth2
        if oauth2.flow is Flow.SERVICE_ACCOUNT:
            with self._lock:
                if self._base is None:
                    self._base = self._service_account()
                base = self._base
            # domain-wide delegation: a fixed subject, else the mailbox that logged in
            return base.with_subject(oauth2.subject or self._account.upstream_username or username)
        from google.oauth2.credentials import Credentials

        return Credentials(  # type: ignore[no-untyped-call]
            token=None,
            refresh_token=require(
                self.refresh_token.current, "consent_required", "a refresh token"
            ),
            token_uri=oauth2.token_url,
            client_id=oauth2.client_id,
            client_secret=oauth2.client_secret.reveal() if oauth2.client_secret else None,
            scopes=self._scopes,
        )

    def _service_account(self) -> Any:
        from google.oauth2 import service_account

        raw = require(self._oauth2.service_account_key, "invalid_client", "the service account key")
        try:
            info = json.loads(raw)
            info["token_uri"] = self._oauth2.token_url  # the configured endpoint wins
            factory: Any = service_account.Credentials.from_service_account_info
            return factory(info, scopes=self._scopes)
        except (ValueError, KeyError, TypeError) as exc:
            # the message may quote the key file: keep only the exception type
            raise PermanentTokenError(
                "invalid_client", f"unusable service account key ({type(exc).__name__})"
            ) from None


def _utc_timestamp(expiry: Any) -> float:
    return float(expiry.replace(tzinfo=datetime.UTC).timestamp())


def _from_google_exception(exc: Exception) -> TokenError:
    """RefreshError carries the parsed error body as its second argument."""
    name = type(exc).__name__
    if name == "RefreshError":
        body = exc.args[1] if len(exc.args) > 1 else None
        retryable = bool(getattr(exc, "retryable", False))
        if isinstance(body, dict) and body.get("error"):
            return from_oauth_error(body, 500 if retryable else 400)
        if retryable:
            return from_oauth_error({"error": "server_error"}, 500)
        return PermanentTokenError("refresh_error", scrub(str(exc.args[0]) if exc.args else name))
    if name == "TransportError":
        return from_exception(exc)
    return (
        from_exception(exc)
        if isinstance(exc, OSError)
        else TemporaryTokenError(name, scrub(str(exc)))
    )

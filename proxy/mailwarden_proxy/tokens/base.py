"""The token provider interface and its errors.

Providers wrap blocking libraries (msal, google-auth, requests) and are called from a
worker thread by the cache; they never log token values, and their errors carry the
identity provider's error code (`invalid_grant`, `AADSTS7000215`, ...) but never a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mailwarden_proxy.secret import Secret

# seconds, connect and read each; here rather than in `tokens.http` so that choosing a
# provider (`tokens.factory`) doesn't import requests before the first token request
DEFAULT_TIMEOUT = 15.0


@dataclass(frozen=True)
class AccessToken:
    value: Secret
    expires_at: float  # seconds since the epoch


class TokenError(Exception):
    """A token could not be obtained.

    `code` is the identity provider's error code (or a local one such as `timeout`,
    `connection`); `description` its human text, already stripped of secrets.
    """

    temporary: bool = True

    def __init__(self, code: str, description: str = "") -> None:
        self.code = code
        self.description = description
        super().__init__(f"{code}: {description}" if description else code)


class TemporaryTokenError(TokenError):
    """Worth retrying later: IdP down, 5xx, timeout, throttling."""

    temporary = True


class PermanentTokenError(TokenError):
    """Retrying won't help until the configuration or consent changes (invalid_grant, ...)."""

    temporary = False


class TokenProvider(Protocol):
    """Fetches a new access token for one account (and mailbox, for per-user flows)."""

    def fetch(self, username: str) -> AccessToken:
        """Blocking; raises TokenError. Called off the event loop."""
        ...

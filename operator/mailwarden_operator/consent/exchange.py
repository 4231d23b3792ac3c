"""The authorization-code leg of the consent flow: the authorize URL and the code exchange.

A plain RFC 6749 §4.1 client on the proxy's token HTTP helpers rather than msal or
google-auth: the operator already holds the `state` and the PKCE verifier itself (msal's
`initiate_auth_code_flow` would want to own both), the same code then serves Microsoft,
Google and generic providers, and every failure goes through the proxy's error mapping,
which keeps secrets out of messages.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from mailwarden_proxy.config.model import Account, ProviderKind
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError
from mailwarden_proxy.tokens.errors import from_token_response
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT, make_session, post_token_request

# OpenID scopes added to the authorization request so the answer carries an id_token that
# names who signed in (checked against spec.username). Generic providers may not speak
# OpenID Connect, and an unknown scope would fail their sign-in, so they get none.
_IDENTITY_SCOPES = {
    ProviderKind.MICROSOFT: ("openid", "profile", "offline_access"),
    ProviderKind.GOOGLE: ("openid", "email"),
}
_USERNAME_CLAIMS = ("preferred_username", "email", "upn")


@dataclass(frozen=True)
class CodeGrant:
    """What the token endpoint answered to a code exchange."""

    refresh_token: Secret | None = field(repr=False)
    expires_at: float
    signed_in_as: str | None  # from the id_token, when the provider sent one


def request_scopes(account: Account) -> tuple[str, ...]:
    extra = _IDENTITY_SCOPES.get(account.oauth2.provider, ())
    return tuple(dict.fromkeys((*account.oauth2.scopes, *extra)))


def authorize_url(account: Account, *, redirect_uri: str, state: str, challenge: str | None) -> str:
    """The URL a browser is sent to. `login_hint` preselects the mailbox's account, so a
    person signed in with several accounts doesn't consent for the wrong one."""
    oauth2 = account.oauth2
    if not oauth2.authorize_url:
        raise ValueError("the account has no authorize URL")
    query = {
        "client_id": oauth2.client_id,
        "response_type": "code",
        "redirect_uri": redirect_uri,
        "scope": " ".join(request_scopes(account)),
        "state": state,
        "login_hint": account.username,
    }
    if challenge is not None:
        query.update(code_challenge=challenge, code_challenge_method="S256")
    if oauth2.provider is ProviderKind.GOOGLE:
        # Google hands out a refresh token only for offline access, and only again after a
        # fresh consent screen
        query.update(access_type="offline", prompt="consent")
    separator = "&" if "?" in oauth2.authorize_url else "?"
    return f"{oauth2.authorize_url}{separator}{urlencode(query)}"


def exchange_code(
    account: Account,
    code: str,
    *,
    redirect_uri: str,
    verifier: str | None,
    timeout: float = DEFAULT_TIMEOUT,
) -> CodeGrant:
    """Blocking: trade `code` for tokens; raises TokenError (never carrying a secret)."""
    oauth2 = account.oauth2
    if oauth2.client_certificate_path:
        raise PermanentTokenError(
            "unsupported_credential",
            "certificate credentials are not supported for the authorizationCode flow; "
            "use clientSecretRef",
        )
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": oauth2.client_id,
        "scope": " ".join(request_scopes(account)),
    }
    if verifier is not None:
        data["code_verifier"] = verifier
    if oauth2.client_secret:
        data["client_secret"] = oauth2.client_secret.reveal()
    session = make_session(oauth2.token_url, oauth2.ca_file, timeout)
    started = time.time()
    try:
        body = post_token_request(session, oauth2.token_url, data)
    finally:
        session.close()
    _, expires_in, refresh = from_token_response(body)
    return CodeGrant(
        Secret(refresh) if refresh else None,
        started + expires_in,
        _signed_in_as(body.get("id_token")),
    )


def _signed_in_as(id_token: Any) -> str | None:
    """The user name in an id_token. The signature is not checked: the token came straight
    from the token endpoint over verified TLS (OpenID Connect Core §3.1.3.7 allows that),
    and it only serves to catch a person signing in with the wrong mailbox."""
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return None
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    if not isinstance(claims, dict):
        return None
    for claim in _USERNAME_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return None

"""The grant logic of the local identity provider (`idp.LocalIdP`): state and answers.

Kept apart from the HTTP server so each stays readable; `LocalIdP` inherits from
`GrantState` and adds the server, registration helpers and failure injection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography import x509

GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

Reply = tuple[int, dict[str, Any]] | None  # None: drop the connection without an answer

# Every credential this IdP issues (access and refresh tokens, authorization and device
# codes) starts with this marker, so tests can scan logs, exception texts, metrics and
# Events for leaks (tests/fixtures/secrets_scan.py). Nothing else emits it.
SECRET_MARKER = "mwcanary"


def new_secret(nbytes: int) -> str:
    """A random credential carrying `SECRET_MARKER`."""
    return SECRET_MARKER + secrets.token_urlsafe(nbytes)


class OAuthError(Exception):
    def __init__(self, error: str, aadsts: int, description: str, status: int = 400) -> None:
        super().__init__(error)
        self.status = status
        self.body = {
            "error": error,
            "error_description": f"AADSTS{aadsts}: {description}",
            "error_codes": [aadsts],
            "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        }


# Error bodies as Entra ID and Google send them, for `LocalIdP.fail_next("aadsts:<n>")`
# and `fail_next("google:<error>")`: (OAuth error, description, HTTP status).
AADSTS_ERRORS: dict[int, tuple[str, str, int]] = {
    7000215: (
        "invalid_client",
        "Invalid client secret provided. Ensure the secret being "
        "sent in the request is the client secret value, not the client secret ID, for "
        "a secret added to app '{client}'.",
        401,
    ),
    7000222: (
        "invalid_client",
        "The provided client secret keys for app '{client}' are expired.",
        401,
    ),
    700016: (
        "unauthorized_client",
        "Application with identifier '{client}' was not found in the directory '{tenant}'.",
        400,
    ),
    65001: (
        "invalid_grant",
        "The user or administrator has not consented to use the application with ID '{client}'.",
        400,
    ),
    50076: (
        "interaction_required",
        "Due to a configuration change made by your "
        "administrator, or because you moved to a new location, you must use multi-factor "
        "authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
        400,
    ),
    50079: (
        "interaction_required",
        "Due to a configuration change made by your "
        "administrator, or because you moved to a new location, you must enroll in "
        "multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
        400,
    ),
    70043: (
        "invalid_grant",
        "The refresh token has expired or is invalid due to sign-in "
        "frequency checks by conditional access.",
        400,
    ),
    700082: (
        "invalid_grant",
        "The refresh token has expired due to inactivity. The token "
        "was issued on 2026-01-02T03:04:05Z and was inactive for 90.00:00:00.",
        400,
    ),
    54005: (
        "invalid_grant",
        "OAuth2 Authorization code was already redeemed, please retry "
        "with a new valid code or use an existing refresh token.",
        400,
    ),
    50126: (
        "invalid_grant",
        "Error validating credentials due to invalid username or password.",
        400,
    ),
    90002: (
        "invalid_request",
        "Tenant '{tenant}' not found. Check to make sure you have the "
        "correct tenant ID and are signing into the correct cloud.",
        400,
    ),
    500011: (
        "invalid_resource",
        "The resource principal named "
        "https://outlook.office365.com was not found in the tenant named {tenant}.",
        400,
    ),
    53003: (
        "access_denied",
        "Access has been blocked by Conditional Access policies. The "
        "access policy does not allow token issuance.",
        400,
    ),
}
GOOGLE_ERRORS: dict[str, tuple[str, str, int]] = {
    "unauthorized_client": (
        "unauthorized_client",
        "Client is unauthorized to retrieve "
        "access tokens using this method, or client not authorized for "
        "any of the scopes requested.",
        401,
    ),
    "invalid_grant": ("invalid_grant", "Token has been expired or revoked.", 400),
    "user_not_found": ("invalid_grant", "Invalid email or User ID", 400),
}


def scripted_error(mode: str, client: str, tenant: str) -> tuple[int, dict[str, Any]]:
    """The answer for a failure mode "aadsts:<number>" or "google:<name>"."""
    kind, _, name = mode.partition(":")
    if kind == "google":
        error, description, status = GOOGLE_ERRORS[name]
        return status, {"error": error, "error_description": description}
    number = int(name)
    error, description, status = AADSTS_ERRORS.get(
        number, ("invalid_request", "Injected error.", 400)
    )
    # Entra ID appends trace ids and a timestamp, which the proxy strips before logging
    trace = " Trace ID: 0d7a8f1e-0000-4000-8000-000000000000 Correlation ID: 7c1f Timestamp: x"
    text = description.format(client=client, tenant=tenant) + trace
    err = OAuthError(error, number, text, status)
    return err.status, err.body


@dataclass
class Client:
    secret: str | None
    certificate: x509.Certificate | None


@dataclass
class Grant:
    username: str | None  # None: an app-only token (client credentials)
    client_id: str | None
    scope: str
    expires_at: float = 0.0


@dataclass
class Device:
    device_code: str
    client_id: str
    scope: str
    expires_at: float
    username: str | None = None
    declined: bool = False


class GrantState:
    """Everything the token, device, authorize and introspection endpoints know."""

    base_url: str

    def __init__(self, token_lifetime: int, device_interval: int, single_use: bool) -> None:
        self.token_lifetime = token_lifetime
        self.device_interval = device_interval
        # Microsoft rotates refresh tokens; refusing a used one catches clients that
        # keep replaying the first token instead of the newest.
        self.single_use_refresh_tokens = single_use
        self.requests: Counter[str] = Counter()
        self.introspections = 0
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        self._users: dict[str, str | None] = {}
        self._service_accounts: dict[str, Any] = {}
        self._access: dict[str, Grant] = {}
        self._refresh: dict[str, Grant] = {}
        self._codes: dict[str, tuple[Grant, str, str | None]] = {}
        self._devices: dict[str, Device] = {}
        self._id_key = secrets.token_bytes(32)

    # -- URLs --------------------------------------------------------------------------
    def issue_authorization_code(
        self, username: str, client_id: str, redirect_uri: str, code_challenge: str | None = None
    ) -> str:
        code = new_secret(24)
        with self._lock:
            self._codes[code] = (Grant(username, client_id, ""), redirect_uri, code_challenge)
        return code

    def authority(self, tenant: str = "common") -> str:
        return f"{self.base_url}/{tenant}"

    def token_url(self, tenant: str = "common") -> str:
        return f"{self.base_url}/{tenant}/oauth2/v2.0/token"

    def device_url(self, tenant: str = "common") -> str:
        return f"{self.base_url}/{tenant}/oauth2/v2.0/devicecode"

    def authorize_url(self, tenant: str = "common") -> str:
        return f"{self.base_url}/{tenant}/oauth2/v2.0/authorize"

    @property
    def introspection_url(self) -> str:
        return f"{self.base_url}/introspect"

    def _discovery(self, tenant: str) -> dict[str, Any]:
        return {
            "issuer": f"{self.base_url}/{tenant}/v2.0",
            "authorization_endpoint": self.authorize_url(tenant),
            "token_endpoint": self.token_url(tenant),
            "device_authorization_endpoint": self.device_url(tenant),
            "introspection_endpoint": self.introspection_url,
            "response_types_supported": ["code"],
            "grant_types_supported": ["client_credentials", "refresh_token", "password"],
        }

    def _introspect(self, token: str, url_username: str | None) -> dict[str, Any]:
        with self._lock:
            self.introspections += 1
            grant = self._access.get(token)
        if grant is None or grant.expires_at <= time.time():
            return {"active": False}
        user = grant.username or url_username
        if url_username and user and user.lower() != url_username.lower():
            return {"active": False}
        reply: dict[str, Any] = {"active": True, "exp": int(grant.expires_at)}
        reply.update({"token_type": "Bearer", "client_id": grant.client_id, "scope": grant.scope})
        if user:
            reply.update(username=user, email=user)
        return reply

    def _client(
        self, form: dict[str, str], auth: str | None, tenant: str, *, confidential: bool
    ) -> str:
        """Authenticates the client (secret in body or Basic, or a signed assertion)."""
        client_id, secret = form.get("client_id", ""), form.get("client_secret")
        if auth and auth.lower().startswith("basic "):
            client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        with self._lock:
            client = self._clients.get(client_id)
        if client is None:
            raise OAuthError("invalid_client", 700016, f"Application '{client_id}' not found.", 400)
        if client.secret is None and client.certificate is None:
            if confidential:
                raise OAuthError("unauthorized_client", 700025, "Client is public.")
            return client_id
        assertion = form.get("client_assertion")
        if assertion and client.certificate is not None:
            try:
                claims = jwt.decode(
                    assertion,
                    client.certificate.public_key(),  # type: ignore[arg-type]
                    algorithms=["PS256", "RS256", "ES256"],
                    audience=self.token_url(tenant),
                    options={"require": ["exp", "iss", "aud"]},
                )
            except jwt.PyJWTError as exc:
                raise OAuthError("invalid_client", 700027, f"Bad assertion: {exc}", 401) from exc
            if claims.get("iss") != client_id:
                raise OAuthError("invalid_client", 700023, "Assertion issuer mismatch.", 401)
            return client_id
        if secret is None:
            raise OAuthError("invalid_client", 7000218, "client_assertion or secret required.")
        if client.secret is None or not secrets.compare_digest(secret, client.secret):
            raise OAuthError("invalid_client", 7000215, "Invalid client secret provided.", 401)
        return client_id

    def _token(
        self, grant_type: str, tenant: str, form: dict[str, str], auth: str | None
    ) -> dict[str, Any]:
        scope = form.get("scope", "")
        if grant_type == "client_credentials":
            client_id = self._client(form, auth, tenant, confidential=True)
            return self._respond(Grant(None, client_id, scope), tenant)
        if grant_type == "refresh_token":
            client_id = self._client(form, auth, tenant, confidential=False)
            with self._lock:
                token = form.get("refresh_token", "")
                old = self._refresh.get(token)
                if old is not None and self.single_use_refresh_tokens:
                    del self._refresh[token]
            if old is None or old.client_id != client_id:
                raise OAuthError("invalid_grant", 70000, "The refresh token is invalid or used.")
            return self._respond(Grant(old.username, client_id, scope or old.scope), tenant)
        if grant_type == "password":
            client_id = self._client(form, auth, tenant, confidential=False)
            user = form.get("username", "")
            with self._lock:
                known = self._users.get(user.lower())
            if known is None or not secrets.compare_digest(known, form.get("password", "")):
                raise OAuthError("invalid_grant", 50126, "Invalid username or password.")
            return self._respond(Grant(user, client_id, scope), tenant)
        if grant_type == DEVICE_GRANT:
            return self._device_token(form, auth, tenant)
        if grant_type == JWT_BEARER_GRANT:
            return self._jwt_bearer(form.get("assertion", ""), tenant)
        if grant_type == "authorization_code":
            client_id = self._client(form, auth, tenant, confidential=False)
            with self._lock:
                grant, redirect, challenge = self._codes.pop(form.get("code", ""), (None, "", None))
            if (
                grant is None
                or grant.client_id != client_id
                or redirect != form.get("redirect_uri")
            ):
                raise OAuthError("invalid_grant", 70000, "The authorization code is invalid.")
            verifier = form.get("code_verifier", "").encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=")
            if challenge is not None and digest.decode() != challenge:
                raise OAuthError("invalid_grant", 501481, "The code_verifier does not match.")
            return self._respond(Grant(grant.username, client_id, scope), tenant)
        raise OAuthError("unsupported_grant_type", 70003, f"Grant '{grant_type}' unsupported.")

    def _device_authorization(self, form: dict[str, str]) -> dict[str, Any]:
        user_code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ23456789") for _ in range(9))
        device = Device(
            new_secret(32),
            form.get("client_id", ""),
            form.get("scope", ""),
            time.time() + 900,
        )
        with self._lock:
            self._devices[user_code] = device
        url = f"{self.base_url}/devicelogin"
        return {
            "user_code": user_code,
            "device_code": device.device_code,
            "verification_uri": url,
            "expires_in": 900,
            "interval": self.device_interval,
            "message": f"To sign in, use a web browser to open the page {url} and enter the "
            f"code {user_code} to authenticate.",
        }

    def _device_token(self, form: dict[str, str], auth: str | None, tenant: str) -> dict[str, Any]:
        client_id = self._client(form, auth, tenant, confidential=False)
        with self._lock:
            found = [
                (c, d) for c, d in self._devices.items() if d.device_code == form.get("device_code")
            ]
        if not found or found[0][1].client_id != client_id:
            raise OAuthError("invalid_grant", 70000, "Unknown device code.")
        user_code, device = found[0]
        if device.expires_at <= time.time():
            raise OAuthError("expired_token", 70020, "The device code expired.")
        if device.declined:
            raise OAuthError("authorization_declined", 70019, "The user declined.")
        if device.username is None:
            raise OAuthError("authorization_pending", 70016, "Waiting for the user to sign in.")
        with self._lock:
            self._devices.pop(user_code, None)
        return self._respond(Grant(device.username, client_id, device.scope), tenant)

    def _jwt_bearer(self, assertion: str, tenant: str) -> dict[str, Any]:
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
            with self._lock:
                key = self._service_accounts.get(issuer)
            if key is None:
                raise OAuthError("invalid_grant", 70000, "Unknown service account.")
            # google-auth always addresses Google's token URL, whatever token_uri says
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                audience=[GOOGLE_TOKEN_URL, self.token_url(tenant), f"{self.base_url}/token"],
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            raise OAuthError("invalid_grant", 70000, f"Invalid JWT: {exc}") from exc
        grant = Grant(claims.get("sub") or issuer, issuer, str(claims.get("scope", "")))
        reply = self._respond(grant, tenant)
        for key_name in ("refresh_token", "id_token", "client_info"):
            reply.pop(key_name, None)  # Google answers a jwt-bearer grant with an access token only
        return reply

    def _authorize(self, query: dict[str, str]) -> Reply:
        username = query.get("login_hint")
        if not username:
            raise OAuthError("invalid_request", 900144, "login_hint (the consenting user) missing.")
        redirect = query.get("redirect_uri", "")
        code = self.issue_authorization_code(
            username, query.get("client_id", ""), redirect, query.get("code_challenge")
        )
        location = f"{redirect}{'&' if '?' in redirect else '?'}"
        location += urlencode({"code": code, "state": query.get("state", "")})
        return 302, {"location": location}

    def _respond(self, grant: Grant, tenant: str) -> dict[str, Any]:
        access = new_secret(32)
        grant.expires_at = time.time() + self.token_lifetime
        reply: dict[str, Any] = {
            "token_type": "Bearer",
            "scope": grant.scope,
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": access,
        }
        with self._lock:
            self._access[access] = grant
            if grant.username is not None:
                refresh = new_secret(48)
                self._refresh[refresh] = Grant(grant.username, grant.client_id, grant.scope)
        if grant.username is None:
            return reply
        oid = str(uuid.uuid5(uuid.NAMESPACE_DNS, grant.username.lower()))
        tid = str(uuid.uuid5(uuid.NAMESPACE_DNS, tenant))
        now = int(time.time())
        claims = {
            "iss": f"{self.base_url}/{tenant}/v2.0",
            "sub": oid,
            "aud": grant.client_id,
            "iat": now,
            "nbf": now,
            "exp": now + self.token_lifetime,
            "oid": oid,
            "tid": tid,
            "preferred_username": grant.username,
            "name": grant.username,
        }
        info = json.dumps({"uid": oid, "utid": tid}).encode()
        reply["refresh_token"] = refresh
        reply["id_token"] = jwt.encode(claims, self._id_key, algorithm="HS256")
        reply["client_info"] = base64.urlsafe_b64encode(info).rstrip(b"=").decode()
        return reply

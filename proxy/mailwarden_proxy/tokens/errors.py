"""Turning identity-provider answers and transport failures into `TokenError`s.

Every provider funnels its failures through here so that the temporary/permanent split
(which decides between "try again later" and "authentication failed" for the mail
client) is made in one place, and so that nothing echoed from a response body can carry
a token or a secret into a log line or an exception message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import requests

from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import PermanentTokenError, TemporaryTokenError, TokenError

# RFC 6749 §5.2, RFC 8628 §3.5 and what Microsoft/Google add. Codes in neither set are
# decided by the HTTP status.
TEMPORARY_CODES = frozenset(
    {
        "temporarily_unavailable",
        "server_error",
        "slow_down",
        "authorization_pending",
        "throttled",
        "internal_failure",
    }
)
PERMANENT_CODES = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "interaction_required",
        "consent_required",
        "login_required",
        "invalid_request",
        "unsupported_grant_type",
        "access_denied",
        "expired_token",
        "authorization_declined",
        "invalid_authority",
    }
)

_SENSITIVE = (
    "access_token|refresh_token|id_token|client_secret|client_assertion|assertion"
    "|password|device_code|code_verifier|code"
)
# `"key": "value"` (JSON), `key=value` (forms, URLs), `key: value` and `key 'value'`
_SCRUB = re.compile(
    rf"""(?P<key>["']?\b(?:{_SENSITIVE})\b["']?(?:\s*[:=]\s*|\s+(?=["'])))(?P<q>["']?)[^"'&\s,}}]+""",
    re.IGNORECASE,
)
# Microsoft appends trace/correlation ids and a timestamp: noise in logs and metrics
_TRACE = re.compile(r"\s*(Trace ID|Correlation ID|Timestamp):.*$", re.IGNORECASE | re.DOTALL)
_MAX_DESCRIPTION = 300
_MIN_MASKED = 8


def scrub(text: str) -> str:
    """`text` with the values of token/secret-bearing fields masked, and shortened."""
    cleaned = _SCRUB.sub(lambda m: f"{m['key']}{m['q']}****", text)
    cleaned = " ".join(cleaned.split())
    return cleaned[:_MAX_DESCRIPTION]


def without_credentials(exc: TokenError, values: Iterable[Secret | None]) -> TokenError:
    """`exc` again, with every credential among `values` masked in its code and text.

    `scrub` masks the values of named fields (`client_secret=…`); an identity provider, or a
    gateway in front of it, may also quote a credential back bare ("the secret X is not
    valid"), which only the provider, knowing what it sent, can recognise. Values shorter
    than 8 characters are left alone: masking them would garble ordinary words."""
    code, description = exc.code, exc.description
    for value in values:
        text = value.reveal() if value is not None else ""
        if len(text) >= _MIN_MASKED:
            code, description = code.replace(text, "****"), description.replace(text, "****")
    if (code, description) == (exc.code, exc.description):
        return exc
    return type(exc)(code, description)


def _describe(body: Mapping[str, Any]) -> str:
    description = str(body.get("error_description") or "")
    description = _TRACE.sub("", description.replace("\r\n", "\n").split("\n", 1)[0])
    codes = body.get("error_codes")
    if isinstance(codes, list) and codes and "AADSTS" not in description:
        description = f"AADSTS{codes[0]}: {description}".rstrip(": ")
    return scrub(description)


def from_oauth_error(body: Mapping[str, Any], status: int | None = None) -> TokenError:
    """The error for an OAuth 2.0 error response (`{"error": ..., ...}`)."""
    code = str(body.get("error") or (f"http_{status}" if status else "unknown_error"))
    description = _describe(body)
    code = scrub(code)[:64]
    if code in TEMPORARY_CODES:
        return TemporaryTokenError(code, description)
    if code in PERMANENT_CODES:
        return PermanentTokenError(code, description)
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return PermanentTokenError(code, description)
    return TemporaryTokenError(code, description)


def from_http(status: int, text: str) -> TokenError:
    """The error for a non-2xx answer, JSON or not."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error") and status < 500:
        return from_oauth_error(body, status)
    detail = _describe(body) if isinstance(body, dict) else scrub(text)
    if status >= 500 or status in (408, 429):
        code = "server_error" if status >= 500 else "throttled"
        return TemporaryTokenError(code, f"HTTP {status} {detail}".strip())
    return PermanentTokenError(f"http_{status}", detail)


def from_exception(exc: BaseException) -> TokenError:
    """The error for a transport failure; only the exception's type is kept, since the
    messages of requests/urllib3 can include full URLs and request bodies."""
    if isinstance(exc, TokenError):
        return exc
    cause: BaseException | None = exc
    while cause is not None:  # google-auth wraps requests' exceptions in TransportError
        if isinstance(cause, requests.exceptions.Timeout | TimeoutError):
            return TemporaryTokenError("timeout", "no answer from the token endpoint in time")
        if isinstance(cause, requests.exceptions.SSLError):
            return TemporaryTokenError("tls", "TLS handshake with the token endpoint failed")
        if isinstance(cause, requests.exceptions.ConnectionError | ConnectionError):
            return TemporaryTokenError("connection", "cannot connect to the token endpoint")
        cause = cause.__cause__ or cause.__context__
    return TemporaryTokenError("transport", type(exc).__name__)


def from_token_response(body: Any) -> tuple[str, float, str | None]:
    """(access token, expires_in, refresh token) from a successful response body."""
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        if isinstance(body, dict) and body.get("error"):
            raise from_oauth_error(body)
        raise TemporaryTokenError("bad_response", "token response without access_token")
    try:
        expires_in = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        expires_in = 3600.0  # RFC 6749 makes expires_in optional; assume an hour
    refresh = body.get("refresh_token")
    return body["access_token"], expires_in, refresh if isinstance(refresh, str) else None

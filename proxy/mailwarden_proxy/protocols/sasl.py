"""Pure SASL encoders and decoders: PLAIN (local side), XOAUTH2 and OAUTHBEARER (upstream).

References: RFC 4616 (PLAIN), RFC 7628 (OAUTHBEARER), Google's and Microsoft's XOAUTH2
documentation. Results are raw bytes; callers base64-encode them for the wire.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from mailwarden_proxy.config.model import Mechanism
from mailwarden_proxy.protocols.errors import SaslError

# Statuses in an error challenge after which a freshly fetched token may succeed.
RETRYABLE_STATUSES = frozenset({"400", "401", "invalid_token"})


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def b64decode_strict(data: bytes) -> bytes:
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("response is not valid base64") from exc


def decode_plain(response: bytes) -> tuple[str, str]:
    """Decode a base64 SASL PLAIN response into (username, password).

    The authorization identity must be empty or equal to the username: the proxy logs
    one mailbox in and cannot act as another.
    """
    raw = b64decode_strict(response)
    parts = raw.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN response must hold authzid NUL authcid NUL password")
    authzid, authcid, password = parts
    try:
        user, authz, secret = authcid.decode(), authzid.decode(), password.decode()
    except UnicodeDecodeError as exc:
        raise SaslError("PLAIN response is not UTF-8") from exc
    if not user:
        raise SaslError("PLAIN response has an empty username")
    if authz and authz != user:
        raise SaslError("PLAIN authorization identity differs from the username")
    return user, secret


def xoauth2_response(username: str, token: str) -> bytes:
    return f"user={username}\x01auth=Bearer {token}\x01\x01".encode()


def _saslname(username: str) -> str:
    # RFC 5801 gs2 saslname: "," and "=" must be escaped
    return username.replace("=", "=3D").replace(",", "=2C")


def oauthbearer_response(username: str, token: str, host: str, port: int) -> bytes:
    return (
        f"n,a={_saslname(username)},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    ).encode()


def initial_response(
    mechanism: Mechanism, username: str, token: str, host: str, port: int
) -> bytes:
    if mechanism is Mechanism.OAUTHBEARER:
        return oauthbearer_response(username, token, host, port)
    return xoauth2_response(username, token)


def mechanism_name(mechanism: Mechanism) -> str:
    return mechanism.value.upper()


def error_challenge_reply(mechanism: Mechanism) -> bytes:
    """What the client sends after an error challenge so the server can finish the exchange.

    XOAUTH2 wants an empty response; OAUTHBEARER wants the single byte 0x01 (RFC 7628 §3.2.3).
    Both already base64-encoded, without line terminator.
    """
    return b"AQ==" if mechanism is Mechanism.OAUTHBEARER else b""


@dataclass(frozen=True)
class ErrorChallenge:
    status: str  # "401", "400", "invalid_token", ... or "" if absent/unparseable
    scope: str = ""
    schemes: str = ""
    detail: str = ""  # the whole challenge as compact JSON (ASCII, capped), for diagnostics

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE_STATUSES


def parse_error_challenge(data: bytes) -> ErrorChallenge:
    """Parse the base64 JSON a server sends instead of success; never raises."""
    try:
        payload = json.loads(base64.b64decode(data.strip() or b"e30=", validate=False))
    except (ValueError, binascii.Error):
        return ErrorChallenge(status="")
    if not isinstance(payload, dict):
        return ErrorChallenge(status="")
    return ErrorChallenge(
        status=str(payload.get("status", "")),
        scope=str(payload.get("scope", "")),
        schemes=str(payload.get("schemes", "")),
        detail=json.dumps(payload, separators=(",", ":"))[:300],
    )

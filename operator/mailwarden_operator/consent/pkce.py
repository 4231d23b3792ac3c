"""PKCE (RFC 7636) with the S256 method only.

`plain` is never offered: it protects nothing against an attacker who can read the
authorization request, which is the case PKCE exists for.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

METHOD = "S256"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def challenge_for(verifier: str) -> str:
    """BASE64URL(SHA256(ASCII(verifier))), RFC 7636 §4.2."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str
    method: str = METHOD

    @classmethod
    def new(cls) -> Pkce:
        # 32 random bytes -> 43 characters, the minimum length RFC 7636 §4.1 allows and
        # 256 bits of entropy, which is what the RFC recommends
        verifier = _b64url(secrets.token_bytes(32))
        return cls(verifier, challenge_for(verifier))

    def __repr__(self) -> str:  # the verifier is a one-time secret: keep it out of logs
        return f"Pkce(challenge={self.challenge!r}, method={self.method!r})"

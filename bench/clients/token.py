"""What a direct client does first: a client-credentials token request."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.parse
import urllib.request

from bench.servers import ClientCredentials


def fetch_token(credentials: ClientCredentials, ca_path: str) -> str:
    body = urllib.parse.urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret,
            "scope": credentials.scope,
        }
    ).encode()
    context = ssl.create_default_context(cafile=ca_path)
    with urllib.request.urlopen(credentials.token_url, body, timeout=30, context=context) as reply:
        token: str = json.load(reply)["access_token"]
    return token


def xoauth2(username: str, token: str) -> bytes:
    """The SASL XOAUTH2 initial response, base64-encoded."""
    return base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())

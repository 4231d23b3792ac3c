"""The HTTP session every token provider uses.

`requests` lets `REQUESTS_CA_BUNDLE` / `CURL_CA_BUNDLE` from the environment replace a
session's `verify=` whenever a call passes no `verify` itself (msal's and google-auth's
calls don't), so a stray variable would silently swap the CA that guards our token
endpoint. The session therefore ignores the environment (`trust_env = False`); proxy
settings, which deployments do legitimately set there, are resolved once for the token
URL's host (honouring `NO_PROXY`) and pinned on the session.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.utils import get_environ_proxies

from mailwarden_proxy.tokens.base import DEFAULT_TIMEOUT, TemporaryTokenError
from mailwarden_proxy.tokens.errors import from_exception, from_http

__all__ = ["DEFAULT_TIMEOUT", "TokenSession", "make_session", "post_token_request"]


class TokenSession(requests.Session):
    """A session with a default timeout: neither msal nor google-auth always pass one."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.default_timeout
        return super().request(method, url, *args, **kwargs)


def make_session(url: str, ca_file: str | None, timeout: float = DEFAULT_TIMEOUT) -> TokenSession:
    """A session for talking to `url`'s host, trusting `ca_file` or the system store."""
    session = TokenSession(timeout)
    session.trust_env = False
    session.verify = ca_file or True
    session.proxies.update(get_environ_proxies(url))
    return session


def post_token_request(session: requests.Session, url: str, data: dict[str, str]) -> Any:
    """POST a form to a token endpoint and return its JSON body; raises TokenError.

    Errors are raised unchained: the request (and so the exception's context) holds the
    credentials or the authorization code.
    """
    try:
        response = session.post(url, data=data, headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise from_exception(exc) from None
    if response.status_code != 200:
        raise from_http(response.status_code, response.text)
    try:
        return response.json()
    except ValueError:
        raise TemporaryTokenError("bad_response", "token response is not JSON") from None

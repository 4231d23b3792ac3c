"""Microsoft identity platform flows through msal.

Imported only when an account uses the microsoft provider: msal (with requests, PyJWT,
cryptography) costs a bare process about 25 MB. The broker (`tokens.cache`) owns caching
and retries, so msal's own layers are switched off where they would get in the way: its
access-token cache is emptied before client-credential calls (otherwise a forced refresh
after an upstream 401 would get the rejected token back), and its HTTP throttling cache
(which replays a 5xx for 5-60 s and a 400 for 60 s) is replaced by one that stores nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

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
    upstream_login,
)
from mailwarden_proxy.tokens.http import DEFAULT_TIMEOUT, make_session

log = logging.getLogger(__name__)

MICROSOFT_HOSTS = frozenset({"login.microsoftonline.com", "login.microsoft.com"})
_RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access"})  # msal adds them itself
# ROPC is deprecated for public clients; the configuration asked for it, say so once there
warnings.filterwarnings("ignore", "This API has been deprecated", DeprecationWarning, "msal")


@dataclass(frozen=True)
class DeviceCodePrompt:
    """What a person must do to finish a device code sign-in."""

    user_code: str
    verification_uri: str
    expires_at: float
    message: str


DeviceCodeHook = Callable[[str, DeviceCodePrompt], None]
"""Called as `hook(account_username, prompt)` when a new device code is issued."""


@dataclass
class _DeviceFlow:
    flow: dict[str, Any]
    prompt: DeviceCodePrompt
    started: float
    result: dict[str, Any] | None = None
    error: TokenError | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _NoHttpCache(MutableMapping[str, Any]):
    """Stores nothing: disables msal's response replay (see the module docstring)."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        pass

    def __delitem__(self, key: str) -> None:
        pass

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def authority_from_token_url(token_url: str) -> str:
    """`https://host/tenant/oauth2/v2.0/token` → `https://host/tenant`."""
    parts = urlsplit(token_url)
    segments = [s for s in parts.path.split("/") if s]
    if "oauth2" in segments:
        segments = segments[: segments.index("oauth2")]
    if not segments:
        raise ValueError(f"token_url {token_url!r} names no tenant")
    return f"{parts.scheme}://{parts.netloc}/{'/'.join(segments)}"


class MsalProvider:
    """Client credentials (secret or certificate), refresh token, device code and ROPC."""

    SUPPORTED = frozenset(
        {
            Flow.CLIENT_CREDENTIALS,
            Flow.REFRESH_TOKEN,
            Flow.AUTHORIZATION_CODE,
            Flow.DEVICE_CODE,
            Flow.PASSWORD,
        }
    )

    def __init__(
        self,
        account: Account,
        *,
        on_refresh_token: RefreshTokenHook | None = None,
        on_device_code: DeviceCodeHook | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        oauth2 = account.oauth2
        if oauth2.flow not in self.SUPPORTED:
            raise ValueError(f"the microsoft provider has no {oauth2.flow} flow")
        self._account = account
        self._oauth2 = oauth2
        self._authority = authority_from_token_url(oauth2.token_url)
        self._scopes = [s for s in oauth2.scopes if s.lower() not in _RESERVED_SCOPES]
        self._session = make_session(oauth2.token_url, oauth2.ca_file, timeout)
        self._on_device_code = on_device_code
        self.refresh_token = RotatingRefreshToken(
            account.username, oauth2.refresh_token, on_refresh_token
        )
        self._app: Any = None
        self._lock = threading.Lock()
        self._device: _DeviceFlow | None = None

    @property
    def pending_device_code(self) -> DeviceCodePrompt | None:
        device = self._device
        return device.prompt if device is not None and not device.done.is_set() else None

    def fetch(self, username: str) -> AccessToken:
        return fetch_masking_credentials(self._fetch, username, self._oauth2, self.refresh_token)

    def _fetch(self, username: str) -> AccessToken:
        started = time.time()
        try:
            result = self._acquire(username)
        except TokenError:
            raise
        except requests.RequestException as exc:
            raise from_exception(exc) from None
        except Exception as exc:
            raise _from_msal_exception(exc) from None
        return self._token_from(result, started)

    def close(self) -> None:
        device = self._device
        if device is not None:
            device.flow["expires_at"] = 0  # msal's polling loop checks this every second
        self._session.close()

    # -- internals -------------------------------------------------------------------
    def _application(self) -> Any:
        with self._lock:
            if self._app is None:
                self._app = self._build_application()
            return self._app

    def _build_application(self) -> Any:
        import msal  # lazy on purpose, see the module docstring

        oauth2 = self._oauth2
        credential: Any = oauth2.client_secret.reveal() if oauth2.client_secret else None
        if oauth2.client_certificate_path and oauth2.client_key_path:
            # msal derives the SHA-256 thumbprint and x5c from the certificate (PS256)
            credential = {
                "private_key": Path(oauth2.client_key_path).read_text(),
                "public_certificate": Path(oauth2.client_certificate_path).read_text(),
            }
        host = (urlsplit(self._authority).hostname or "").lower()
        options: dict[str, Any] = {
            "authority": self._authority,
            "http_client": self._session,
            "http_cache": _NoHttpCache(),
            # instance discovery asks login.microsoftonline.com whether the host is a
            # Microsoft cloud: pointless (and unreachable) for any other host
            "instance_discovery": None if host in MICROSOFT_HOSTS else False,
        }
        if host not in MICROSOFT_HOSTS:
            # ROPC first asks https://<host>/common/userrealm/ (dropping any port) whether
            # the user is federated; only Microsoft's hosts answer that. msal keeps this
            # class-level set for hosts found to lack the endpoint.
            msal.authority.Authority._domains_without_user_realm_discovery.add(host)
        if credential is not None:
            return msal.ConfidentialClientApplication(
                oauth2.client_id, client_credential=credential, **options
            )
        return msal.PublicClientApplication(oauth2.client_id, **options)

    def _acquire(self, username: str) -> dict[str, Any]:
        app = self._application()
        flow = self._oauth2.flow
        if flow is Flow.CLIENT_CREDENTIALS:
            app.remove_tokens_for_client()  # force a round trip: the broker is the cache
            result: dict[str, Any] = app.acquire_token_for_client(self._scopes)
            return result
        if flow is Flow.PASSWORD:
            password = require(self._oauth2.password, "no_password", "the upstream password")
            login = upstream_login(self._account, username)
            result = app.acquire_token_by_username_password(login, password, self._scopes)
            return result
        current = self.refresh_token.current
        if flow is Flow.DEVICE_CODE and current is None:
            return self._device_result(app)
        refresh = require(current, "consent_required", "a refresh token")
        result = app.acquire_token_by_refresh_token(refresh, self._scopes)
        if flow is Flow.DEVICE_CODE and result.get("error") == "invalid_grant":
            # the consent was revoked or expired: only a person can help, so ask again
            log.warning(
                "%s: refresh token refused, starting a new device code sign-in",
                self._account.username,
            )
            self.refresh_token.clear(current)
            return self._device_result(app)
        return result

    def _device_result(self, app: Any) -> dict[str, Any]:
        """Starts a device code sign-in or reports on the running one; never blocks."""
        with self._lock:
            device = self._device
            if device is None:
                device = self._device = self._start_device_flow(app)
            if not device.done.is_set():
                prompt = device.prompt
                raise TemporaryTokenError(
                    "authorization_pending",
                    f"waiting for a person to enter the code {prompt.user_code} "
                    f"at {prompt.verification_uri}",
                )
            self._device = None  # finished: a later failure starts a new sign-in
        if device.error is not None:
            raise device.error
        return device.result or {}

    def _start_device_flow(self, app: Any) -> _DeviceFlow:
        flow = app.initiate_device_flow(scopes=self._scopes)
        if "user_code" not in flow:
            raise from_oauth_error(flow)
        prompt = DeviceCodePrompt(
            user_code=str(flow["user_code"]),
            verification_uri=str(flow.get("verification_uri") or flow.get("verification_url")),
            expires_at=float(flow["expires_at"]),
            message=str(flow.get("message", "")),
        )
        # a person must act: WARNING so it shows with default logging
        log.warning(
            "%s: to authorize mail access, open %s and enter the code %s",
            self._account.username,
            prompt.verification_uri,
            prompt.user_code,
        )
        device = _DeviceFlow(flow, prompt, time.time())
        threading.Thread(
            target=self._poll_device, args=(app, device), daemon=True, name="msal-device-code"
        ).start()
        if self._on_device_code is not None:
            try:
                self._on_device_code(self._account.username, prompt)
            except Exception:
                log.exception("device code hook failed for %s", self._account.username)
        return device

    @staticmethod
    def _poll_device(app: Any, device: _DeviceFlow) -> None:
        try:  # msal polls at the server's interval until success, refusal or expiry
            device.result = app.acquire_token_by_device_flow(device.flow)
        except requests.RequestException as exc:
            device.error = from_exception(exc)
        except Exception as exc:
            device.error = _from_msal_exception(exc)
        finally:
            device.done.set()

    def _token_from(self, result: dict[str, Any], started: float) -> AccessToken:
        token = result.get("access_token")
        if not isinstance(token, str):
            raise from_oauth_error(result)
        self.refresh_token.update(result.get("refresh_token"))
        expires_in = float(result.get("expires_in") or 3600)
        return AccessToken(Secret(token), started + expires_in)


def _from_msal_exception(exc: Exception) -> TokenError:
    """msal raises for a 5xx (MsalServiceError), a non-JSON body (ValueError) and a failed
    authority discovery (ValueError, carrying the response text: scrubbed)."""
    name = type(exc).__name__
    if name == "MsalServiceError":
        return TemporaryTokenError("server_error", scrub(str(exc)))
    if name == "JSONDecodeError":
        return TemporaryTokenError("bad_response", "token endpoint answered without JSON")
    if isinstance(exc, ValueError) and "authority" in str(exc).lower():
        return PermanentTokenError("invalid_authority", scrub(str(exc)))
    if isinstance(exc, OSError):
        return from_exception(exc)
    return TemporaryTokenError("msal_error", f"{name}: {scrub(str(exc))}")

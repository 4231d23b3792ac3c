"""The one module of the operator that talks to the Kubernetes API (kopf aside).

A small async client on aiohttp. Credentials come from kopf's own minimal login functions
(:func:`kopf.login_with_service_account`, else :func:`kopf.login_with_kubeconfig`), so the
operator and kopf's watchers authenticate identically; on a 401 the client logs in again
once, which picks up a rotated (bound, short-lived) ServiceAccount token.

Objects are plain JSON dicts, as the API returns them: the operator only reads a few fields
and a typed model would be larger than the code using it. Errors are :class:`KubeError` and
its subclasses, built from the API's ``Status`` object with the message truncated, because
response bodies end up in logs, Events and conditions. Secret ``data`` is never logged.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import socket
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import kopf

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]

GROUP = "mailwarden.io"
VERSION = "v1alpha1"
MAILACCOUNTS = f"/apis/{GROUP}/{VERSION}"
MAX_BODY_IN_MESSAGE = 300
EVENT_MESSAGE_LIMIT = 1024  # the apiserver refuses longer core/v1 Event messages
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
COMPONENT = "mailwarden-operator"
LIST_PAGE = 500


class KubeError(Exception):
    """An API request failed: HTTP ``status``, the API's ``reason`` (e.g. ``NotFound``)
    and a human ``message`` (truncated, never carrying Secret data)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    """404: the object (or its namespace) does not exist."""


class Conflict(KubeError):
    """409: AlreadyExists on create, or a stale resourceVersion on update/patch."""


class Forbidden(KubeError):
    """403: RBAC does not allow it (or the namespace is terminating)."""


class Invalid(KubeError):
    """422: the object failed validation (schema, CEL rules, immutable fields)."""


_ERRORS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 403: Forbidden, 422: Invalid}


def _truncate(text: str, limit: int = MAX_BODY_IN_MESSAGE) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _error(status: int, body: object, text: str) -> KubeError:
    reason, message = "", ""
    if isinstance(body, dict) and body.get("kind") == "Status":
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
    cls = _ERRORS.get(status, KubeError)
    return cls(status, reason or cls.__name__, _truncate(message or text))


def decode_data(secret: Mapping[str, Any]) -> dict[str, bytes]:
    """A Secret's ``data`` decoded from base64 (``stringData`` is write-only, never read)."""
    data = secret.get("data") or {}
    return {key: base64.b64decode(value) for key, value in data.items()}


def encode_data(data: Mapping[str, str | bytes]) -> dict[str, str]:
    """Values for a Secret's ``data`` field. Using ``data`` rather than ``stringData`` lets
    the desired object be compared with the stored one byte for byte."""
    out: dict[str, str] = {}
    for key, value in data.items():
        raw = value.encode() if isinstance(value, str) else value
        out[key] = base64.b64encode(raw).decode("ascii")
    return out


def login() -> kopf.ConnectionInfo:
    """In-cluster ServiceAccount if mounted, else the kubeconfig (``$KUBECONFIG`` or
    ``~/.kube/config``): the same order as the operator's kopf login handler."""
    settings = kopf.OperatorSettings()
    info = kopf.login_with_service_account(settings=settings) or kopf.login_with_kubeconfig(
        settings=settings
    )
    if info is None:
        raise kopf.LoginError("no ServiceAccount token mounted and no kubeconfig found")
    return info


class KubeClient:
    """Async client for the few API calls the operator makes. Use ``async with`` or call
    :meth:`close`. ``relogin`` (default: :func:`login`) is called after a 401."""

    def __init__(
        self,
        info: kopf.ConnectionInfo,
        *,
        relogin: Callable[[], kopf.ConnectionInfo] | None = login,
    ) -> None:
        self._relogin = relogin
        self._info = info
        self._session = self._new_session(info)

    @staticmethod
    def _new_session(info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=20)
        return aiohttp.ClientSession(
            connector=connector,
            headers=info.as_http_headers(),
            timeout=REQUEST_TIMEOUT,
            # kopf's default: ignore HTTP(S)_PROXY unless the kubeconfig asks for it.
            trust_env=info.trust_env,
        )

    @property
    def default_namespace(self) -> str | None:
        return self._info.default_namespace

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- transport

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        """One API call; returns the decoded JSON object or raises :class:`KubeError`."""
        if self._session.closed:
            # At shutdown kopf may run cleanup (which closes us) while daemons still
            # finish a step: give them the error they handle, not aiohttp's RuntimeError.
            raise KubeError(0, "ClientClosed", "the operator is shutting down")
        for attempt in (1, 2):
            status, payload, text = await self._send(method, path, body, params, content_type)
            if status == 401 and attempt == 1 and self._relogin is not None:
                log.info("API answered 401 to %s %s; logging in again", method, path)
                await self._reconnect(self._relogin())
                continue
            break
        log.debug("%s %s -> %s", method, path, status)
        if status >= 400:
            raise _error(status, payload, text)
        if not isinstance(payload, dict):
            raise KubeError(status, "BadResponse", f"not a JSON object: {_truncate(text)}")
        return payload

    async def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        params: Mapping[str, str] | None,
        content_type: str,
    ) -> tuple[int, object, str]:
        url = self._info.server.rstrip("/") + path
        headers = {"Content-Type": content_type} if body is not None else {}
        try:
            async with self._session.request(
                method, url, json=body, params=params, headers=headers
            ) as resp:
                text = await resp.text()
                try:
                    payload: object = await resp.json(content_type=None) if text else {}
                except ValueError:
                    payload = None
                return resp.status, payload, text
        except (aiohttp.ClientError, TimeoutError) as exc:
            # 0 = no HTTP answer; callers treat it like any other transient KubeError.
            raise KubeError(0, type(exc).__name__, _truncate(str(exc))) from exc

    async def _reconnect(self, info: kopf.ConnectionInfo) -> None:
        old, self._session, self._info = self._session, self._new_session(info), info
        await old.close()

    # -- Secrets

    @staticmethod
    def _secrets(namespace: str, name: str = "") -> str:
        base = f"/api/v1/namespaces/{quote(namespace)}/secrets"
        return f"{base}/{quote(name)}" if name else base

    async def get_secret(self, namespace: str, name: str) -> JsonObject:
        return await self.request("GET", self._secrets(namespace, name))

    async def create_secret(self, namespace: str, secret: Mapping[str, Any]) -> JsonObject:
        return await self.request("POST", self._secrets(namespace), body=secret)

    async def patch_secret(self, namespace: str, name: str, patch: Mapping[str, Any]) -> JsonObject:
        """JSON merge patch (RFC 7386): ``None`` deletes a key; a
        ``metadata.resourceVersion`` in the patch makes it conditional."""
        return await self.request(
            "PATCH",
            self._secrets(namespace, name),
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def replace_secret(
        self, namespace: str, name: str, secret: Mapping[str, Any]
    ) -> JsonObject:
        return await self.request("PUT", self._secrets(namespace, name), body=secret)

    async def delete_secret(self, namespace: str, name: str, *, uid: str | None = None) -> None:
        """Delete; with ``uid`` only that incarnation of the Secret (409 otherwise)."""
        body = {"preconditions": {"uid": uid}} if uid else None
        await self.request("DELETE", self._secrets(namespace, name), body=body)

    # -- MailAccounts

    @staticmethod
    def _mailaccounts(namespace: str, name: str = "", sub: str = "") -> str:
        path = f"{MAILACCOUNTS}/namespaces/{quote(namespace)}/mailaccounts"
        if name:
            path += f"/{quote(name)}"
        return path + (f"/{sub}" if sub else "")

    async def get_mailaccount(self, namespace: str, name: str) -> JsonObject:
        return await self.request("GET", self._mailaccounts(namespace, name))

    async def list_mailaccounts(self, namespace: str) -> list[JsonObject]:
        result = await self.request("GET", self._mailaccounts(namespace))
        return list(result.get("items") or [])

    async def patch_mailaccount_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        *,
        resource_version: str | None = None,
    ) -> JsonObject:
        """Merge-patch ``status`` through the status subresource. Lists (``conditions``)
        are replaced whole, so pass ``resource_version`` of the object the new list was
        computed from: a concurrent writer then causes :class:`Conflict`, not a lost
        update."""
        patch: JsonObject = {"status": dict(status)}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        return await self.request(
            "PATCH",
            self._mailaccounts(namespace, name, "status"),
            body=patch,
            content_type="application/merge-patch+json",
        )

    # -- Events and Pods

    async def create_event(
        self,
        obj: Mapping[str, Any],
        *,
        reason: str,
        message: str,
        type: str = "Normal",
    ) -> JsonObject:
        """A core/v1 Event about ``obj`` (a full object with apiVersion/kind/metadata)."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": _truncate(message, EVENT_MESSAGE_LIMIT),
            "type": type,
            "count": 1,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "source": {"component": COMPONENT},
            "reportingComponent": f"{GROUP}/operator",
            "reportingInstance": socket.gethostname()[:128],
        }
        path = f"/api/v1/namespaces/{quote(meta['namespace'])}/events"
        return await self.request("POST", path, body=event)

    async def list_pods(
        self,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        annotation: tuple[str, str | None] | None = None,
    ) -> list[JsonObject]:
        """Pods matching a label selector, in ``namespace`` or (``None``) all namespaces,
        fetched in pages so a large cluster doesn't make one huge response.
        ``annotation=(key, value)`` filters further on the client side (the API has no
        annotation selectors); value ``None`` matches any value."""
        path = f"/api/v1/namespaces/{quote(namespace)}/pods" if namespace else "/api/v1/pods"
        pods: list[JsonObject] = []
        params = {"limit": str(LIST_PAGE)}
        if label_selector:
            params["labelSelector"] = label_selector
        while True:
            result = await self.request("GET", path, params=params)
            pods += result.get("items") or []
            token = (result.get("metadata") or {}).get("continue")
            if not token:
                break
            params["continue"] = token
        if annotation is not None:
            key, value = annotation
            pods = [p for p in pods if _annotated(p, key, value)]
        return pods


def _annotated(obj: Mapping[str, Any], key: str, value: str | None) -> bool:
    notes = (obj.get("metadata") or {}).get("annotations") or {}
    return key in notes if value is None else notes.get(key) == value


async def connect() -> KubeClient:
    """A client logged in the default way (see :func:`login`)."""
    return KubeClient(login())

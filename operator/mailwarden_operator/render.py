"""MailAccount spec + Secret data -> the rendered proxy Secret `<ma>-proxy` (pure: no I/O).

Who calls what (handlers/mailaccount.py):

1. `spec.parse_spec(body["spec"])`, then fetch every Secret in `spec.secret_refs()`
   (a missing one is simply absent from `RenderInput.secrets`).
2. Read the existing `<ma>-proxy` Secret; `local_password` is its `local-password` value,
   or `new_local_password()` when there is none yet. Callers may always pass
   `existing or new_local_password()`: with `spec.local.passwordSecretRef` render ignores it.
3. `refresh_token` is the `refresh-token` key of `<ma>-oauth2-token`, if that Secret exists.
4. `render(...)`; compare `annotations[CONFIG_HASH_ANNOTATION]` with the existing Secret's
   and write only when it differs, so an unchanged generation changes nothing.

Randomness lives only in `new_local_password`, so `render` is a function of its input:
the same input gives the same bytes and the same hash.

deviceCode and authorizationCode: a proxy in a pod cannot ask a person to sign in, so
the operator runs those flows and stores the refresh token in `<ma>-oauth2-token`. The
proxy is then given `flow: refreshToken` with that token (plus the client secret of a
confidential client). Until there is a token, render raises `RenderError("ConsentRequired")`
and no Secret is written: the handler sets ConfigRendered=False with that reason, and
re-renders when the token Secret appears.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets as _secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from mailwarden_operator.spec import MailAccountSpec, SecretKeyRef
from mailwarden_proxy.config import native
from mailwarden_proxy.config.common import check_service_account_key
from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    Metrics,
    OAuth2,
    ProxyConfig,
    Upstream,
)
from mailwarden_proxy.config.render import to_native
from mailwarden_proxy.secret import Secret

MOUNT_PATH = "/etc/mailwarden"
CONFIG_KEY = "proxy.yaml"
PASSWORD_KEY = "local-password"
USERNAME_KEY = "username"
# Present only with spec.oauth2.clientCertificateRef: the proxy reads them from the mount.
CLIENT_CERTIFICATE_KEY = "client.crt"
CLIENT_KEY_KEY = "client.key"
TOKEN_SECRET_SUFFIX = "-oauth2-token"
TOKEN_KEY = "refresh-token"
# on <ma>-oauth2-token: the sha256 of the user-given refresh token ours was rotated from
SEED_ANNOTATION = "mailwarden.io/refresh-token-seed-sha256"
# on a MailAccount: a new value asks the operator to check the credentials again
CHECK_ANNOTATION = "mailwarden.io/check-credentials"
PROXY_SECRET_SUFFIX = "-proxy"
CONFIG_HASH_ANNOTATION = "mailwarden.io/config-hash"
MAILACCOUNT_LABEL = "mailwarden.io/mailaccount"
MANAGED_BY_LABELS = {"app.kubernetes.io/managed-by": "mailwarden"}
API_VERSION = "mailwarden.io/v1alpha1"
KIND = "MailAccount"
LISTEN_ADDRESS = "127.0.0.1"  # the app shares the pod's network namespace
# kubelet probes (/healthz, /readyz) and Prometheus reach the pod IP, not loopback; the
# endpoint serves no secrets.
METRICS_ADDRESS = "0.0.0.0"  # noqa: S104
_MAX_NAME = 253 - len(TOKEN_SECRET_SUFFIX)  # the longest derived Secret name must fit
_MAX_LABEL = 63
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----")
_PEM_KEY = re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")

REASONS = frozenset(
    {"SecretNotFound", "SecretKeyNotFound", "InvalidSecret", "InvalidSpec", "ConsentRequired"}
)


class RenderError(Exception):
    """The Secret cannot be rendered; `reason` becomes the ConfigRendered condition's.

    Messages name Secrets and keys, never their values.
    """

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True)
class RenderInput:
    name: str
    namespace: str
    uid: str
    # Carried for the caller's bookkeeping (observedGeneration) but deliberately not
    # rendered: a spec edit that changes nothing in the output must leave the Secret alone.
    generation: int
    spec: MailAccountSpec
    secrets: Mapping[str, Mapping[str, bytes]]  # Secret name -> decoded data
    local_password: str | None = None
    refresh_token: str | None = None
    # sha256 of the user's refreshTokenRef value that `refresh_token` was rotated from
    # (annotation SEED_ANNOTATION on <ma>-oauth2-token), for the refreshToken flow
    refresh_token_seed_sha256: str | None = None


@dataclass(frozen=True)
class RenderedSecret:
    name: str
    namespace: str
    string_data: Mapping[str, str]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    owner_reference: Mapping[str, Any]
    # the proxy loader's non-fatal findings (e.g. a misspelt scope), for Events
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def config_hash(self) -> str:
        return self.annotations[CONFIG_HASH_ANNOTATION]

    def manifest(self) -> dict[str, Any]:
        """The Secret object to create or patch."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": dict(self.labels),
                "annotations": dict(self.annotations),
                "ownerReferences": [dict(self.owner_reference)],
            },
            "stringData": dict(self.string_data),
        }


def rendered_secret_name(ma_name: str) -> str:
    return f"{ma_name}{PROXY_SECRET_SUFFIX}"


def token_secret_name(ma_name: str) -> str:
    return f"{ma_name}{TOKEN_SECRET_SUFFIX}"


def new_local_password() -> str:
    """A fresh local password (192 bits); called once per MailAccount by the handler."""
    return _secrets.token_urlsafe(24)


def label_value(name: str) -> str:
    """`name` as a label value: object names may be 253 characters, label values 63."""
    if len(name) <= _MAX_LABEL:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: _MAX_LABEL - 9].rstrip('-.')}-{digest}"


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def config_hash(string_data: Mapping[str, str]) -> str:
    """sha256 over the canonical JSON of the data, so equal content gives an equal hash.

    It is a hash of secret values: fine next to them on the Secret, but not to be copied
    where less trusted readers look (pod templates), as a weak value could be guessed."""
    canonical = json.dumps(dict(string_data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _where(ref: SecretKeyRef) -> str:
    return f"Secret {ref.name!r} key {ref.key!r}"


class _Values:
    """Reads referenced Secret keys as text, with errors that name and never show them."""

    def __init__(self, inp: RenderInput) -> None:
        self.secrets = inp.secrets
        refs = inp.spec.secret_refs()
        missing = sorted({r.name for r in refs if r.name not in inp.secrets})
        if missing:
            names = ", ".join(repr(n) for n in missing)
            raise RenderError(
                "SecretNotFound", f"Secret{'s' if len(missing) > 1 else ''} {names} not found"
            )
        gone = [r for r in refs if r.key not in inp.secrets[r.name]]
        if gone:
            raise RenderError(
                "SecretKeyNotFound", "; ".join(f"{_where(r)} not found" for r in gone)
            )

    def raw(self, ref: SecretKeyRef) -> str:
        try:
            return bytes(self.secrets[ref.name][ref.key]).decode("utf-8")
        except UnicodeDecodeError:
            raise RenderError("InvalidSecret", f"{_where(ref)} is not UTF-8 text") from None

    def text(self, ref: SecretKeyRef) -> str:
        """Like the proxy's `*File` keys: one trailing newline (from `echo` or a file) goes."""
        value = self.raw(ref)
        value = value[:-2] if value.endswith("\r\n") else value.removesuffix("\n")
        if not value:
            raise RenderError("InvalidSecret", f"{_where(ref)} is empty")
        return value


def _client_secret(values: _Values, ref: SecretKeyRef, client_id: str | None) -> str:
    """The client secret, or the one inside Google's downloaded client JSON
    (`{"web": {"client_id": …, "client_secret": …}}`, or `"installed"` for desktop apps)."""
    text = values.text(ref)
    if not text.lstrip().startswith("{"):
        return text
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise RenderError("InvalidSecret", f"{_where(ref)} starts like JSON but is not") from None
    section = None
    if isinstance(data, dict):
        section = data.get("web", data.get("installed"))
    secret = section.get("client_secret") if isinstance(section, dict) else None
    if not isinstance(secret, str) or not secret:
        raise RenderError(
            "InvalidSecret",
            f"{_where(ref)} is JSON but not a Google client file "
            '({"web": {...}} or {"installed": {...}} with client_secret)',
        )
    assert isinstance(section, dict)
    if client_id is not None and section.get("client_id") not in (None, client_id):
        raise RenderError(
            "InvalidSecret",
            f"{_where(ref)} is the client file of another client than spec.oauth2.clientId",
        )
    return secret


def _local_password(inp: RenderInput, values: _Values) -> str:
    ref = inp.spec.local.password_secret_ref
    if ref is not None:
        password, where = values.text(ref), _where(ref)
    elif inp.local_password is not None:
        password = inp.local_password
        where = f"Secret {rendered_secret_name(inp.name)!r} key {PASSWORD_KEY!r}"
    else:
        raise ValueError("render needs local_password (existing or new_local_password())")
    # every protocol sends it on one line; a line break or NUL could never be typed in
    if not password or any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise RenderError("InvalidSecret", f"{where} is empty or holds control characters")
    return password


def seed_sha256(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


def _refresh_token(inp: RenderInput, values: _Values) -> str | None:
    o = inp.spec.oauth2
    # The operator's own token (from a consent) is newer than any seed the user gave.
    if o.needs_consent and inp.refresh_token:
        return inp.refresh_token
    if o.refresh_token_ref is not None:
        seed = values.text(o.refresh_token_ref)
        # The operator's keep-alive rotates the user's token; an IdP with single-use refresh
        # tokens has retired the seed by then. Our rotation wins while it descends from the
        # seed the user still references; a new seed from the user wins over it.
        if inp.refresh_token and inp.refresh_token_seed_sha256 == seed_sha256(seed):
            return inp.refresh_token
        return seed
    if o.needs_consent:
        raise RenderError(
            "ConsentRequired",
            f"waiting for consent: the {o.flow} flow needs a person to sign in once; the "
            f"refresh token will be stored in Secret {token_secret_name(inp.name)!r}",
        )
    return None


def _oauth2(inp: RenderInput, values: _Values) -> OAuth2:
    spec, o = inp.spec, inp.spec.oauth2
    client_secret = None
    if o.client_secret_ref is not None:
        client_secret = Secret(_client_secret(values, o.client_secret_ref, o.client_id))
    sa_key = None
    if o.service_account_key_ref is not None:
        sa_key = Secret(values.text(o.service_account_key_ref))
        try:
            check_service_account_key(sa_key, "key", source="")
        except ConfigError as exc:
            message = f"{_where(o.service_account_key_ref)} {exc.message}"
            raise RenderError("InvalidSecret", message) from None
    cert = o.client_certificate_ref
    if cert is not None:
        # msal only reads these files at the first token request; check the shape now.
        for ref, pem, what in (
            (cert.certificate, _PEM_CERTIFICATE, "certificate"),
            (cert.private_key, _PEM_KEY, "private key"),
        ):
            if not pem.search(values.raw(ref)):
                raise RenderError("InvalidSecret", f"{_where(ref)} is not a PEM {what}")
    refresh_token = _refresh_token(inp, values)
    return OAuth2(
        provider=spec.provider,
        flow=Flow.REFRESH_TOKEN if o.needs_consent else o.flow,
        token_url=o.token_url,
        client_id=o.client_id or "",
        client_secret=client_secret,
        scopes=o.scopes,
        tenant_id=o.tenant_id,
        client_certificate_path=f"{MOUNT_PATH}/{CLIENT_CERTIFICATE_KEY}" if cert else None,
        client_key_path=f"{MOUNT_PATH}/{CLIENT_KEY_KEY}" if cert else None,
        service_account_key=sa_key,
        subject=o.subject,
        refresh_token=Secret(refresh_token) if refresh_token is not None else None,
        password=Secret(values.text(o.password_ref)) if o.password_ref else None,
    )


def _config(inp: RenderInput, values: _Values, local_password: str) -> ProxyConfig:
    spec = inp.spec
    listeners = tuple(
        Listener(
            name=f"{native.LISTENER_PREFIX[s.protocol]}-{spec.local.port_for(s.protocol)}",
            protocol=s.protocol,
            upstream=Upstream(s.host, s.port, s.tls, allow_insecure=s.allow_insecure),
            local_address=LISTEN_ADDRESS,
            local_port=spec.local.port_for(s.protocol),
        )
        for s in spec.servers()
    )
    account = Account(
        username=spec.username,
        oauth2=_oauth2(inp, values),
        local_password=Secret(local_password),
        mechanism=spec.mechanism,
    )
    return ProxyConfig(
        listeners=listeners,
        accounts=(account,),
        metrics=Metrics(address=METRICS_ADDRESS, port=spec.local.metrics_port),
    )


def _validate(text: str, inp: RenderInput) -> ProxyConfig:
    """Load the text back exactly as the sidecar will, so a config the proxy would refuse
    is reported here, on the MailAccount, instead of in a crash-looping sidecar."""
    data = yaml.safe_load(text)
    oauth2 = data["accounts"][0]["oauth2"]
    if oauth2.pop("clientCertificateFile", None) is not None:
        # The certificate files are keys of the Secret being rendered: they exist only
        # once it is mounted. Their PEM content was checked above; the loader checks the
        # paths in the pod. A stand-in secret keeps its "secret or certificate" rule happy.
        oauth2.pop("clientKeyFile", None)
        oauth2.setdefault("clientSecret", "certificate")
    try:
        return native.from_dict(data, source="")
    except ConfigError as exc:
        where = f"Secret {rendered_secret_name(inp.name)!r} key {CONFIG_KEY!r}"
        raise RenderError(
            "InvalidSpec", f"the proxy refuses the rendered {where}: {exc.field}: {exc.message}"
        ) from None


def render(inp: RenderInput) -> RenderedSecret:
    """The `<ma>-proxy` Secret for `inp`, or RenderError (see the module docstring)."""
    if len(inp.name) > _MAX_NAME:
        raise RenderError(
            "InvalidSpec", f"metadata.name: at most {_MAX_NAME} characters (Secret names derive)"
        )
    values = _Values(inp)
    local_password = _local_password(inp, values)
    config = _config(inp, values, local_password)
    text = yaml.safe_dump(to_native(config, mask=False), sort_keys=False)
    loaded = _validate(text, inp)
    string_data = {CONFIG_KEY: text, PASSWORD_KEY: local_password, USERNAME_KEY: inp.spec.username}
    cert = inp.spec.oauth2.client_certificate_ref
    if cert is not None:
        string_data[CLIENT_CERTIFICATE_KEY] = values.raw(cert.certificate)
        string_data[CLIENT_KEY_KEY] = values.raw(cert.private_key)
    return RenderedSecret(
        name=rendered_secret_name(inp.name),
        namespace=inp.namespace,
        string_data=string_data,
        labels={**MANAGED_BY_LABELS, MAILACCOUNT_LABEL: label_value(inp.name)},
        annotations={CONFIG_HASH_ANNOTATION: config_hash(string_data)},
        owner_reference=owner_reference(inp.name, inp.uid),
        warnings=loaded.warnings,
    )

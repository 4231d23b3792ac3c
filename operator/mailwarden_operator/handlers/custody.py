"""Token custody for `handlers.authorization` and the consent server: building the proxy
Account of a MailAccount, fetching a token with it, keeping the refresh token in
`<ma>-oauth2-token`, and writing the status fields the authorization side owns
(`Authorized`, `authorization`, `tokenExpiresAt`, `lastRefreshTime`, plus derived `Ready`).

The Account is built by `render.render` itself and loaded back with the proxy's own loader,
so a credential check exercises exactly the configuration the sidecar will get.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mailwarden_operator import conditions, render
from mailwarden_operator.handlers import Runtime
from mailwarden_operator.kube import Conflict, JsonObject, KubeError, NotFound, decode_data
from mailwarden_operator.kube import encode_data as _encode
from mailwarden_operator.spec import MailAccountSpec, SpecError, parse_spec
from mailwarden_proxy.catalogue import diagnose_token_error
from mailwarden_proxy.config import native
from mailwarden_proxy.config.model import Account, Flow
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens.base import TokenError
from mailwarden_proxy.tokens.factory import provider_for

AUTHORIZED = conditions.AUTHORIZED
REFRESH_FLOWS = frozenset({Flow.REFRESH_TOKEN, Flow.DEVICE_CODE, Flow.AUTHORIZATION_CODE})
# render refuses consent flows without a refresh token; to build the Account used to run
# the consent itself, it gets this stand-in, which is replaced before any use.
_NO_TOKEN_YET = "mailwarden-consent-pending"
ATTEMPTS = 5


@dataclass(frozen=True)
class Verdict:
    """The Authorized condition to write."""

    status: bool | None
    reason: str
    message: str


@dataclass
class Loaded:
    """A MailAccount with everything needed to get a token for it."""

    ma: JsonObject
    spec: MailAccountSpec | None = None
    account: Account | None = field(default=None, repr=False)
    problem: str | None = None  # why there is no account (spec or render error)
    stored_token: str | None = field(default=None, repr=False)
    files: Mapping[str, str] = field(default_factory=dict, repr=False)  # certificate PEMs
    fingerprint: str = ""
    _seed: str | None = field(default=None, repr=False)

    @property
    def namespace(self) -> str:
        return str(self.ma["metadata"]["namespace"])

    @property
    def name(self) -> str:
        return str(self.ma["metadata"]["name"])

    @property
    def uid(self) -> str:
        return str(self.ma["metadata"]["uid"])

    @property
    def flow(self) -> Flow | None:
        return self.spec.oauth2.flow if self.spec is not None else None

    def condition(self, type: str) -> JsonObject:
        found = conditions.get_condition(self.status.get("conditions") or [], type)
        return dict(found or {})

    @property
    def status(self) -> JsonObject:
        return dict(self.ma.get("status") or {})

    def seed_hash(self) -> str | None:
        """sha256 of the refresh token the user gave (refreshToken flow only)."""
        seed = self._seed if self.flow is Flow.REFRESH_TOKEN else None
        return render.seed_sha256(seed) if seed else None


async def _get_secret(rt: Runtime, namespace: str, name: str) -> JsonObject | None:
    try:
        return await rt.kube.get_secret(namespace, name)
    except NotFound:
        return None


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


async def load(rt: Runtime, namespace: str, name: str, ca_file: str | None) -> Loaded | None:
    """The MailAccount and its Account, or None if it is gone or being deleted."""
    try:
        ma = await rt.kube.get_mailaccount(namespace, name)
    except NotFound:
        return None
    if ma["metadata"].get("deletionTimestamp"):
        return None
    loaded = Loaded(ma)
    try:
        spec = loaded.spec = parse_spec(ma.get("spec") or {})
    except SpecError as exc:
        loaded.problem = str(exc)
        return loaded
    secrets: dict[str, Mapping[str, bytes]] = {}
    for secret_name in sorted({ref.name for ref in spec.secret_refs()}):
        found = await _get_secret(rt, namespace, secret_name)
        if found is not None:
            secrets[secret_name] = decode_data(found)
    token_secret = await _get_secret(rt, namespace, render.token_secret_name(name))
    seed_of_stored = None
    if token_secret is not None and _owned_by(token_secret, loaded.uid):
        value = decode_data(token_secret).get(render.TOKEN_KEY, b"").decode() or None
        loaded.stored_token = value
        seed_of_stored = (token_secret["metadata"].get("annotations") or {}).get(
            render.SEED_ANNOTATION
        )
    needs_consent = spec.oauth2.needs_consent
    try:
        rendered = render.render(
            render.RenderInput(
                name=name,
                namespace=namespace,
                uid=loaded.uid,
                generation=int(ma["metadata"].get("generation", 0)),
                spec=spec,
                secrets=secrets,
                local_password=render.new_local_password(),  # unused: no config is written
                refresh_token=(loaded.stored_token or _NO_TOKEN_YET) if needs_consent else None,
            )
        )
    except render.RenderError as exc:
        loaded.problem = f"{exc.reason}: {exc.message}"
        return loaded
    data = yaml.safe_load(rendered.string_data[render.CONFIG_KEY])
    oauth2 = data["accounts"][0]["oauth2"]
    if oauth2.pop("clientCertificateFile", None) is not None:
        # the PEMs are keys of the rendered Secret, mounted only in the pod: written to a
        # private temporary directory for the duration of a token request instead
        oauth2.pop("clientKeyFile", None)
        oauth2.setdefault("clientSecret", "certificate")
        loaded.files = {
            k: rendered.string_data[k]
            for k in (render.CLIENT_CERTIFICATE_KEY, render.CLIENT_KEY_KEY)
        }
    account = native.from_dict(data).accounts[0]
    o = account.oauth2
    refresh = o.refresh_token.reveal() if o.refresh_token else None
    if needs_consent:
        refresh = loaded.stored_token
    elif spec.oauth2.flow is Flow.REFRESH_TOKEN:
        loaded._seed = refresh
        if loaded.stored_token and seed_of_stored == loaded.seed_hash():
            refresh = loaded.stored_token  # our rotation of the same seed is the newer token
    loaded.account = dataclasses.replace(
        account,
        oauth2=dataclasses.replace(
            o,
            client_secret=None if loaded.files else o.client_secret,
            refresh_token=Secret(refresh) if refresh else None,
            authorize_url=spec.oauth2.authorize_url,
            use_pkce=spec.oauth2.use_pkce,
            ca_file=ca_file,
        ),
    )
    # What a credential check depends on, without the refresh token: rotating it must not
    # look like a change that calls for another check.
    basis = {k: v for k, v in oauth2.items() if k not in ("refreshToken",)}
    basis["seed"] = loaded.seed_hash()
    # `kubectl annotate ma NAME mailwarden.io/check-credentials=$(date +%s) --overwrite`
    basis["asked"] = (loaded.ma["metadata"].get("annotations") or {}).get(render.CHECK_ANNOTATION)
    basis["files"] = dict(loaded.files)
    digest = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode())
    loaded.fingerprint = digest.hexdigest()
    return loaded


@dataclass(frozen=True)
class Fetched:
    expires_at: float
    refresh_token: Secret | None = field(repr=False)  # set when the IdP rotated it


def fetch_token(account: Account, files: Mapping[str, str], timeout: float) -> Fetched:
    """Blocking (run it in a thread): one token for `account`; raises TokenError."""
    rotated: list[Secret] = []
    with tempfile.TemporaryDirectory(prefix="mailwarden-") as tmp:
        if files:
            cert, key = Path(tmp, "client.crt"), Path(tmp, "client.key")
            cert.write_text(files[render.CLIENT_CERTIFICATE_KEY])
            key.touch(mode=0o600)
            key.write_text(files[render.CLIENT_KEY_KEY])
            oauth2 = dataclasses.replace(
                account.oauth2, client_certificate_path=str(cert), client_key_path=str(key)
            )
            account = dataclasses.replace(account, oauth2=oauth2)
        provider = provider_for(
            account, on_refresh_token=lambda _user, token: rotated.append(token), timeout=timeout
        )
        try:
            token = provider.fetch(account.username)
        finally:
            close = getattr(provider, "close", None)
            if close is not None:
                close()
    return Fetched(token.expires_at, rotated[-1] if rotated else None)


def verdict_for(error: TokenError, flow: Flow | None, host: str, username: str = "") -> Verdict:
    """Authorized=False with a reason from the IdP's error code and a message that starts
    with the error catalogue's reason code, cause and fix (what `kubectl describe ma`
    should show), then the IdP's code and description (which the proxy's error mapping
    already scrubbed of secrets). The condition reason stays the coarse one the operator
    acts on (ConsentRequired restarts the consent); the catalogue code is the precise one."""
    code = error.code
    if error.temporary:
        reason = "IdentityProviderUnavailable"
    elif code in ("invalid_grant", "interaction_required", "consent_required") and (
        flow in REFRESH_FLOWS
    ):
        reason = "ConsentRequired"
    elif code.startswith("http_") or not code.replace("_", "").isalnum():
        reason = "AuthorizationFailed"
    else:
        reason = "".join(part.capitalize() for part in code.split("_"))
    detail = f"{code}: {error.description}" if error.description else code
    entry = diagnose_token_error(code, error.description, username=username).entry
    return Verdict(
        False,
        reason,
        f"{entry.reason}: {entry.cause} Fix: {entry.fix} (token endpoint {host} refused: {detail})",
    )


def iso(timestamp: float) -> str:
    return conditions.timestamp(dt.datetime.fromtimestamp(timestamp, dt.UTC))


def parse_iso(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None


async def store_refresh_token(rt: Runtime, loaded: Loaded, token: Secret) -> None:
    """Create or update `<ma>-oauth2-token` (owned by the MailAccount, key refresh-token)."""
    name = render.token_secret_name(loaded.name)
    annotations = {render.SEED_ANNOTATION: loaded.seed_hash()} if loaded.seed_hash() else {}
    body: JsonObject = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": loaded.namespace,
            "labels": {
                **render.MANAGED_BY_LABELS,
                render.MAILACCOUNT_LABEL: render.label_value(loaded.name),
            },
            "annotations": annotations,
            "ownerReferences": [render.owner_reference(loaded.name, loaded.uid)],
        },
        "data": _encode({render.TOKEN_KEY: token.reveal()}),
    }
    for _ in range(ATTEMPTS):
        existing = await _get_secret(rt, loaded.namespace, name)
        try:
            if existing is None:
                await rt.kube.create_secret(loaded.namespace, body)
            else:
                # replace, not patch: a Secret left by an earlier MailAccount of this name
                # gets our owner reference instead of keeping a stale one
                body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                await rt.kube.replace_secret(loaded.namespace, name, body)
            loaded.stored_token = token.reveal()
            return
        except Conflict:
            continue
    raise KubeError(409, "Conflict", f"Secret {name} kept changing while being written")


async def forget_refresh_token(rt: Runtime, loaded: Loaded) -> None:
    """Delete a refused (dead) stored token, so that nothing keeps using it."""
    existing = await _get_secret(rt, loaded.namespace, render.token_secret_name(loaded.name))
    if existing is not None and _owned_by(existing, loaded.uid):
        with contextlib.suppress(NotFound, Conflict):
            await rt.kube.delete_secret(
                loaded.namespace, existing["metadata"]["name"], uid=existing["metadata"]["uid"]
            )
    loaded.stored_token = None


async def write_status(
    rt: Runtime,
    *,
    namespace: str,
    name: str,
    uid: str,
    verdict: Verdict | None,
    fields: Mapping[str, Any] | None = None,
) -> JsonObject | None:
    """Set Authorized (and derived Ready) and `fields` (None deletes one) if anything
    differs; one Event per Authorized/Ready change. Retries on conflicting writers."""
    fields = dict(fields or {})
    for _ in range(ATTEMPTS):
        try:
            ma = await rt.kube.get_mailaccount(namespace, name)
        except NotFound:
            return None
        meta = ma["metadata"]
        if meta["uid"] != uid:
            return None
        status = ma.get("status") or {}
        old = list(status.get("conditions") or [])
        new = old
        now = dt.datetime.now(dt.UTC)
        generation = int(meta.get("generation", 0))
        if verdict is not None:
            new = conditions.record(
                old,
                type=AUTHORIZED,
                status=verdict.status,
                reason=verdict.reason,
                message=verdict.message,
                generation=generation,
                now=now,
            )
        desired: JsonObject = {"conditions": new, **fields}
        if not any(conditions.changed(status.get(k), v) for k, v in desired.items()):
            return ma
        try:
            await rt.kube.patch_mailaccount_status(
                namespace, name, desired, resource_version=meta["resourceVersion"]
            )
        except Conflict:
            continue
        ready = conditions.get_condition(new, conditions.READY) or {}
        rt.metrics.observe_ready(namespace, name, ready.get("status"))
        await _events(rt, ma, old, new)
        return ma
    raise KubeError(409, "Conflict", f"status of MailAccount {name} kept changing")


async def _events(rt: Runtime, ma: JsonObject, old: list[Any], new: list[Any]) -> None:
    for kind in (AUTHORIZED, conditions.READY):
        before = conditions.get_condition(old, kind) or {}
        after = conditions.get_condition(new, kind) or {}
        if not after:
            continue
        same = (before.get("status"), before.get("reason")) == (
            after.get("status"),
            after.get("reason"),
        )
        # a failure that turned into another one (a new catalogue reason, another IdP
        # error) under the same condition reason still deserves its Warning Event
        refailed = (
            kind == AUTHORIZED
            and after.get("status") == "False"
            and before.get("message") != after.get("message")
            and "(token endpoint " in str(after.get("message"))  # from `verdict_for`
        )
        if same and not refailed:
            continue
        await event(
            rt,
            ma,
            str(after.get("reason") or kind),
            f"{kind}={after['status']}: {after.get('message', '')}",
            warning=after["status"] != "True",
        )


async def event(
    rt: Runtime, ma: Mapping[str, Any], reason: str, message: str, *, warning: bool
) -> None:
    with contextlib.suppress(KubeError):  # a courtesy: the condition already says it
        await rt.kube.create_event(
            ma, reason=reason, message=message, type="Warning" if warning else "Normal"
        )

"""Reconcile a MailAccount into its ``<ma>-proxy`` Secret and the ConfigRendered condition.

read (MailAccount, referenced Secrets, ``<ma>-oauth2-token``, the existing ``<ma>-proxy``)
-> :func:`mailwarden_operator.render.render` (pure) -> create or patch ``<ma>-proxy`` only
if it differs -> status (ConfigRendered, Ready, configSecretName, observedGeneration) only
if it differs -> one Event per condition change.

Idempotent by construction: every write is preceded by a comparison with what is stored,
so re-running a reconcile for an unchanged generation writes nothing and the
resourceVersions of the MailAccount and its Secret stay put (the integration test
checks exactly that). The function re-reads the MailAccount itself instead of trusting
the body kopf passed, because it is also called from the Secret watcher and because a
reconcile queued behind the per-object lock must see the newest object.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from mailwarden_operator import conditions, render
from mailwarden_operator.handlers import Runtime
from mailwarden_operator.kube import (
    Conflict,
    JsonObject,
    KubeClient,
    KubeError,
    NotFound,
    decode_data,
    encode_data,
)
from mailwarden_operator.spec import SpecError, parse_spec

CONFIG_RENDERED = conditions.CONFIG_RENDERED
READY = conditions.READY
ATTEMPTS = 3  # optimistic-concurrency retries before giving the reconcile back to kopf
RETRY_DELAY = 10.0


@dataclass(frozen=True)
class Outcome:
    """What the render step concluded, as the ConfigRendered condition will say it."""

    ok: bool
    reason: str
    message: str
    secret_name: str | None = None
    warnings: tuple[str, ...] = field(default=())  # the proxy loader's, for an Event


# --------------------------------------------------------------------------- entry points


async def reconcile(rt: Runtime, namespace: str, name: str, logger: kopf.Logger) -> None:
    """Bring ``<name>-proxy`` and the status in line with the MailAccount. Raises
    :class:`kopf.TemporaryError` on API failures so kopf retries."""
    async with rt.lock(namespace, name):
        started = time.monotonic()
        result = "error"
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    result = await _reconcile_once(rt, namespace, name, logger)
                    break
                except Conflict as exc:
                    # Someone wrote in between (kopf's annotations, the authorization
                    # handler's status, a user): read again and recompute.
                    logger.info("conflict (attempt %d): %s", attempt, exc.message)
            else:
                raise kopf.TemporaryError("kept conflicting with other writers", RETRY_DELAY)
        except KubeError as exc:
            raise kopf.TemporaryError(f"API request failed: {exc}", RETRY_DELAY) from exc
        finally:
            if result != "gone":
                rt.metrics.reconciles.labels(result).inc()
                rt.metrics.reconcile_duration.observe(time.monotonic() - started)


async def secret_changed(
    rt: Runtime,
    *,
    event_type: str | None,
    namespace: str,
    name: str,
    index: Mapping[tuple[str, str], Any],
    logger: kopf.Logger,
) -> None:
    """A Secret was added, modified or deleted: reconcile every MailAccount using it."""
    if event_type is None:
        return  # the initial listing at start-up; the resume handlers cover that case
    for mailaccount in sorted(set(index.get((namespace, name), ()))):
        logger.info("Secret %s %s: reconciling MailAccount %s", name, event_type, mailaccount)
        try:
            await reconcile(rt, namespace, mailaccount, logger)
        except kopf.TemporaryError as exc:
            # Event handlers get no retries: say so; the next change or restart converges.
            logger.warning("reconcile of MailAccount %s failed: %s", mailaccount, exc)


def is_referenced(index: Mapping[tuple[str, str], Any], namespace: str, name: str) -> bool:
    """Whether some MailAccount reads Secret ``namespace/name``."""
    return (namespace, name) in index


def index_secret_refs(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[Any, str]:
    """Index entries ``(namespace, secret name) -> MailAccount name`` for every Secret the
    MailAccount reads, including its own token Secret (written by the consent flows)."""
    names = {render.token_secret_name(name)}
    # An InvalidSpec doesn't depend on any Secret; fixing the spec triggers on.update.
    with contextlib.suppress(SpecError):
        names.update(ref.name for ref in parse_spec(spec).secret_refs())
    return {(namespace, secret): name for secret in names}


async def delete(rt: Runtime, body: Mapping[str, Any], logger: kopf.Logger) -> None:
    """Finalizer: delete the Secrets this MailAccount owns (never the user's)."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    async with rt.lock(namespace, name):
        for secret_name in (render.rendered_secret_name(name), render.token_secret_name(name)):
            existing = await _get_secret(rt.kube, namespace, secret_name)
            if existing is None:
                continue
            if not _owned_by(existing, uid):
                logger.info("keeping Secret %s: not owned by this MailAccount", secret_name)
                continue
            with contextlib.suppress(NotFound):
                await rt.kube.delete_secret(namespace, secret_name, uid=existing["metadata"]["uid"])
            logger.info("deleted Secret %s", secret_name)
    rt.metrics.observe_ready(namespace, name, None)
    rt.forget(namespace, name)


# --------------------------------------------------------------------------- the steps


async def _reconcile_once(rt: Runtime, namespace: str, name: str, logger: kopf.Logger) -> str:
    try:
        ma = await rt.kube.get_mailaccount(namespace, name)
    except NotFound:
        return "gone"
    if ma["metadata"].get("deletionTimestamp"):
        return "gone"  # the finalizer owns it now; don't re-create what it deletes
    outcome = await _render_and_apply(rt.kube, ma, logger)
    ready = await _write_status(rt.kube, ma, outcome, logger)
    rt.metrics.observe_ready(namespace, name, ready)
    return "success" if outcome.ok else "failure"


async def _render_and_apply(kube: KubeClient, ma: JsonObject, logger: kopf.Logger) -> Outcome:
    meta = ma["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = parse_spec(ma.get("spec") or {})
    except SpecError as exc:
        return Outcome(False, "InvalidSpec", str(exc))

    secrets: dict[str, Mapping[str, bytes]] = {}
    for secret_name in sorted({ref.name for ref in spec.secret_refs()}):
        found = await _get_secret(kube, namespace, secret_name)
        if found is not None:  # absent ones: render names them in SecretNotFound
            secrets[secret_name] = decode_data(found)
    token = await _get_secret(kube, namespace, render.token_secret_name(name))
    refresh_token = seed_sha256 = None
    if token is not None and _owned_by(token, meta["uid"]):
        refresh_token = decode_data(token).get(render.TOKEN_KEY, b"").decode() or None
        seed_sha256 = (token["metadata"].get("annotations") or {}).get(render.SEED_ANNOTATION)

    proxy_name = render.rendered_secret_name(name)
    existing = await _get_secret(kube, namespace, proxy_name)
    if existing is not None and not _may_manage(existing, meta):
        return Outcome(
            False,
            "SecretConflict",
            f"Secret {proxy_name} exists and is not owned by this MailAccount; rename or delete it",
        )
    local_password = None
    if existing is not None:
        local_password = decode_data(existing).get(render.PASSWORD_KEY, b"").decode() or None
    # Generated once: kept in <ma>-proxy from then on (render ignores it when the spec
    # names a passwordSecretRef).
    local_password = local_password or render.new_local_password()

    try:
        rendered = render.render(
            render.RenderInput(
                name=name,
                namespace=namespace,
                uid=meta["uid"],
                generation=meta.get("generation", 0),
                spec=spec,
                secrets=secrets,
                local_password=local_password,
                refresh_token=refresh_token,
                refresh_token_seed_sha256=seed_sha256,
            )
        )
    except render.RenderError as exc:
        return Outcome(False, exc.reason, exc.message)

    written = await _apply_secret(kube, namespace, rendered, existing)
    if written:
        logger.info("Secret %s written", rendered.name)
    return Outcome(
        True,
        "Rendered",
        f"proxy configuration in Secret {rendered.name}",
        rendered.name,
        warnings=rendered.warnings if written else (),
    )


async def _apply_secret(
    kube: KubeClient,
    namespace: str,
    rendered: render.RenderedSecret,
    existing: JsonObject | None,
) -> bool:
    """Create or patch the rendered Secret; False (and no request) if already so."""
    data = encode_data(rendered.string_data)
    owner = dict(rendered.owner_reference)
    if existing is None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": rendered.name,
                "namespace": namespace,
                "labels": dict(rendered.labels),
                "annotations": dict(rendered.annotations),
                "ownerReferences": [owner],
            },
            "data": data,
        }
        await kube.create_secret(namespace, body)  # 409 if raced: the retry re-reads
        return True

    meta = existing["metadata"]
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    # Other controllers' owner references stay; a MailAccount's is replaced by ours.
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") != owner["kind"]]
    current = existing.get("data") or {}
    if (
        current == data
        and all(labels.get(k) == v for k, v in rendered.labels.items())
        and all(annotations.get(k) == v for k, v in rendered.annotations.items())
        and any(r.get("uid") == owner["uid"] for r in meta.get("ownerReferences") or [])
    ):
        return False
    patch = {
        "metadata": {
            "resourceVersion": meta["resourceVersion"],  # conditional: no lost update
            "labels": dict(rendered.labels),
            "annotations": dict(rendered.annotations),
            "ownerReferences": [*refs, owner],
        },
        # Merge patch keeps keys it doesn't mention: delete the ones render dropped.
        "data": {**{k: None for k in current if k not in data}, **data},
    }
    await kube.patch_secret(namespace, rendered.name, patch)
    return True


async def _write_status(
    kube: KubeClient, ma: JsonObject, outcome: Outcome, logger: kopf.Logger
) -> str:
    """Patch status if it differs; emit an Event per changed condition. Returns the
    Ready status."""
    meta = ma["metadata"]
    generation = int(meta.get("generation", 0))
    status = ma.get("status") or {}
    old = list(status.get("conditions") or [])
    now = dt.datetime.now(dt.UTC)
    new = conditions.record(
        old,
        type=CONFIG_RENDERED,
        status=outcome.ok,
        reason=outcome.reason,
        message=outcome.message,
        generation=generation,
        now=now,
    )
    desired: JsonObject = {"conditions": new, "observedGeneration": generation}
    secret_name = outcome.secret_name or status.get("configSecretName")
    if secret_name:
        desired["configSecretName"] = secret_name
    if any(conditions.changed(status.get(key), value) for key, value in desired.items()):
        await kube.patch_mailaccount_status(
            meta["namespace"], meta["name"], desired, resource_version=meta["resourceVersion"]
        )
        await _emit_events(kube, ma, old, new, logger)
    for warning in outcome.warnings:
        await _event(kube, ma, "ConfigWarning", warning, "Warning", logger=logger)
    return str(_condition(new, READY).get("status", "Unknown"))


async def _emit_events(
    kube: KubeClient,
    ma: JsonObject,
    old: list[JsonObject],
    new: list[JsonObject],
    logger: kopf.Logger,
) -> None:
    for kind in (CONFIG_RENDERED, READY):
        before, after = _condition(old, kind), _condition(new, kind)
        if not after or (before.get("status"), before.get("reason")) == (
            after.get("status"),
            after.get("reason"),
        ):
            continue
        message = f"{kind}={after['status']}: {after.get('message', '')}"
        kind_of = "Normal" if after["status"] == "True" else "Warning"
        await _event(kube, ma, after.get("reason") or kind, message, kind_of, logger=logger)


async def _event(
    kube: KubeClient, ma: JsonObject, reason: str, message: str, type: str, *, logger: kopf.Logger
) -> None:
    try:
        await kube.create_event(ma, reason=reason, message=message, type=type)
    except KubeError as exc:
        # An Event is a courtesy; the condition already says it. Don't fail for it.
        logger.warning("could not post Event %s: %s", reason, exc)


# --------------------------------------------------------------------------- helpers


def _condition(items: list[JsonObject], kind: str) -> JsonObject:
    return next((c for c in items if c.get("type") == kind), {})


async def _get_secret(kube: KubeClient, namespace: str, name: str) -> JsonObject | None:
    try:
        return await kube.get_secret(namespace, name)
    except NotFound:
        return None


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


def _may_manage(secret: Mapping[str, Any], ma_meta: Mapping[str, Any]) -> bool:
    """Ours, or left by an earlier MailAccount of the same name (nothing garbage-collects
    it if that one's finalizer was removed by hand): adopt it then. Anything else is a
    Secret of the user's, which the operator never overwrites."""
    if _owned_by(secret, ma_meta["uid"]):
        return True
    return any(
        r.get("kind") == "MailAccount" and r.get("name") == ma_meta["name"]
        for r in secret["metadata"].get("ownerReferences") or []
    )

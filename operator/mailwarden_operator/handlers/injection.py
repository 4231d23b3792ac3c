"""Sidecar injection at admission, and the periodic check for pods that missed it.

:func:`mutate` (wrapped by ``main.inject_proxy``, kopf serves it at ``/inject-proxy``)
reads the MailAccounts a pod names and lets the pure :mod:`mailwarden_operator.injection`
decide. A refusal is an admission error under ``MAILWARDEN_WEBHOOK_FAILURE_POLICY=Fail``;
under ``Ignore`` the pod is admitted without the sidecar and with a warning, because the
webhook configuration's failurePolicy only covers a webhook that can't answer, never a
refusal it sends. Either way a Warning Event goes to the pod's namespace (on its
controller if it has one, so ``kubectl describe job/replicaset`` shows it).

Pods can still start without the sidecar: created while the webhook was down under
failurePolicy Ignore, or before it existed. :class:`NotInjectedCheck` lists annotated pods
without ``mailwarden.io/status: injected`` every ``MAILWARDEN_INJECTION_CHECK_INTERVAL``,
posts one ``NotInjected`` Event per pod and publishes
``mailwarden_operator_pods_not_injected{namespace}``. It is an asyncio task rather than a
kopf timer: a timer is per object and would make kopf watch every pod of the cluster,
and its interval is fixed at import time, before the settings are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf

from mailwarden_operator import injection, render
from mailwarden_operator.handlers import Runtime
from mailwarden_operator.injection import Account, InjectionRefused, Options
from mailwarden_operator.kube import JsonObject, KubeError, NotFound
from mailwarden_operator.settings import OperatorSettings
from mailwarden_operator.spec import SpecError, parse_spec

WEBHOOK_ID = "inject-proxy"  # kopf serves a handler at /<id>: the chart's path
WARNING_LIMIT = 250  # the apiserver may truncate admission warnings past 256 characters
Logger = logging.Logger | logging.LoggerAdapter[Any]


def default_options(settings: OperatorSettings) -> Options:
    return Options(
        image=settings.proxy_image,
        pull_policy=settings.proxy_image_pull_policy,
        cpu=settings.proxy_cpu,
        memory=settings.proxy_memory,
    )


# --------------------------------------------------------------------------- admission


async def mutate(
    rt: Runtime,
    *,
    body: Mapping[str, Any],
    patch: kopf.Patch,
    warnings: list[str],
    dryrun: bool,
    logger: Logger,
) -> None:
    """The ``inject-proxy`` mutating webhook for one Pod CREATE."""
    pod = dict(body)
    if injection.is_injected(pod):  # re-created from a dump, or a reinvocation
        rt.metrics.injections.labels("unchanged").inc()
        return
    namespace = str((pod.get("metadata") or {}).get("namespace") or "")
    try:
        ops, notes = await plan(rt, namespace, pod)
    except InjectionRefused as exc:
        rt.metrics.injections.labels("refused").inc()
        await _refused(rt, namespace, pod, exc.message, dryrun=dryrun, logger=logger)
        if rt.settings.webhook_failure_policy == "Fail":
            raise kopf.AdmissionError(exc.message, code=403) from None
        warnings.append(_short(f"mail proxy NOT injected: {exc.message}"))
        return
    warnings.extend(_short(note) for note in notes)

    def apply(doc: Any) -> None:
        # kopf diffs the mutated copy against the request's object to build its JSON
        # patch, so applying ours here is how our ops reach the response.
        injection.apply_ops(doc, ops)

    patch.fns.append(apply)
    rt.metrics.injections.labels("injected").inc()
    logger.info(
        "mail proxy injected for %s", injection.pod_annotations(pod)[injection.INJECT_ANNOTATION]
    )


async def plan(rt: Runtime, namespace: str, pod: Mapping[str, Any]) -> tuple[list[Any], list[str]]:
    """(JSON-patch ops, warnings) for ``pod``, or :class:`InjectionRefused`."""
    injection.check_pod(namespace, pod)
    if rt.settings.namespaces and namespace not in rt.settings.namespaces:
        raise InjectionRefused(
            f"namespace {namespace} is not watched by the mailwarden operator, "
            "so its MailAccounts are never rendered"
        )
    names = injection.requested_accounts(pod)
    options = injection.pod_options(pod, default_options(rt.settings))
    accounts: list[Account] = []
    notes: list[str] = []
    for name in names:
        account, note = await _account(rt, namespace, name)
        accounts.append(account)
        notes += [note] if note else []
    ops = injection.patch_ops(pod, accounts, options)
    return ops, notes + injection.advisories(pod, options)


async def _account(rt: Runtime, namespace: str, name: str) -> tuple[Account, str | None]:
    try:
        ma = await rt.kube.get_mailaccount(namespace, name)
    except NotFound:
        raise InjectionRefused(
            f"MailAccount {name!r} not found in namespace {namespace!r} "
            f"(annotation {injection.INJECT_ANNOTATION})"
        ) from None
    except KubeError as exc:
        raise InjectionRefused(f"cannot read MailAccount {namespace}/{name}: {exc}") from None
    try:
        spec = parse_spec(ma.get("spec") or {})
    except SpecError as exc:
        raise InjectionRefused(f"MailAccount {name!r} is invalid: {exc}") from None
    secret = render.rendered_secret_name(name)
    # The status says whether the Secret was rendered; no need to read the Secret. The
    # kubelet waits for a missing Secret, so it is a warning, not a refusal.
    rendered = _condition(ma, "ConfigRendered")
    note = None
    if rendered is None or rendered.get("status") != "True":
        why = f": {rendered.get('reason')}: {rendered.get('message')}" if rendered else ""
        note = (
            f"Secret {secret} of MailAccount {name} is not rendered yet, the pod waits for it{why}"
        )
    return Account(name=name, spec=spec, secret_name=secret), note


def _condition(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def _short(text: str) -> str:
    return text if len(text) <= WARNING_LIMIT else text[: WARNING_LIMIT - 1] + "…"


def event_subject(namespace: str, pod: Mapping[str, Any]) -> JsonObject:
    """What a refusal's Event is about: the pod's controller (it exists, and users
    describe it), else the pod by name (it may never exist, or exist uninjected)."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            owner_meta = {"name": ref["name"], "namespace": namespace, "uid": ref.get("uid")}
            return {"apiVersion": ref["apiVersion"], "kind": ref["kind"], "metadata": owner_meta}
    name = meta.get("name") or str(meta.get("generateName") or "pod").rstrip("-.") or "pod"
    pod_meta = {"name": name, "namespace": namespace, "uid": meta.get("uid")}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta}


async def _refused(
    rt: Runtime,
    namespace: str,
    pod: Mapping[str, Any],
    message: str,
    *,
    dryrun: bool,
    logger: Logger,
) -> None:
    logger.warning("mail proxy not injected: %s", message)
    if dryrun or not namespace:  # sideEffects: NoneOnDryRun
        return
    fail = rt.settings.webhook_failure_policy == "Fail"
    reason = "InjectionRefused" if fail else "NotInjected"
    text = ("pod refused: " if fail else "pod admitted WITHOUT the mail proxy: ") + message
    try:
        await rt.kube.create_event(
            event_subject(namespace, pod), reason=reason, message=text, type="Warning"
        )
    except KubeError as exc:  # the answer to the apiserver matters more than the Event
        logger.warning("could not post the Event: %s", exc)


# --------------------------------------------------------------------------- periodic check


class NotInjectedCheck:
    """Finds running pods that asked for the sidecar and don't have it."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self._reported: set[str] = set()  # pod uids with an Event, this operator run

    async def run(self, logger: Logger) -> None:
        while True:
            try:
                await self.check(logger)
            except KubeError as exc:
                logger.warning("checking for pods without the mail proxy failed: %s", exc)
            except Exception:  # a bug must not end the check for the rest of the run
                logger.exception("checking for pods without the mail proxy failed")
            await asyncio.sleep(self.rt.settings.injection_check_interval)

    async def check(self, logger: Logger) -> list[JsonObject]:
        """One round: Events for newly found pods, the gauge for all; returns them."""
        pods: list[JsonObject] = []
        for namespace in self.rt.settings.namespaces or (None,):
            pods += await self.rt.kube.list_pods(
                namespace, annotation=(injection.INJECT_ANNOTATION, None)
            )
        missing = [p for p in pods if _runs_without_sidecar(p)]
        counts = Counter({ns: 0 for ns in self.rt.settings.namespaces})
        counts.update(p["metadata"]["namespace"] for p in missing)
        self.rt.metrics.observe_not_injected(dict(counts))
        for pod in missing:
            meta = pod["metadata"]
            if meta.get("uid") in self._reported:
                continue
            wanted = injection.pod_annotations(pod)[injection.INJECT_ANNOTATION]
            message = (
                f"pod runs WITHOUT the mail proxy it asked for ({injection.INJECT_ANNOTATION}: "
                f"{wanted}): it was created while the webhook was unreachable or refused it; "
                "re-create the pod once the webhook works"
            )
            logger.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
            try:
                await self.rt.kube.create_event(
                    {**pod, "apiVersion": "v1", "kind": "Pod"},
                    reason="NotInjected",
                    message=message,
                    type="Warning",
                )
            except KubeError as exc:
                logger.warning("could not post the Event: %s", exc)
                continue
            self._reported.add(meta.get("uid"))
        self._reported &= {p["metadata"].get("uid") for p in missing}
        return missing


def _runs_without_sidecar(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    finished = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
    return not injection.is_injected(pod) and not meta.get("deletionTimestamp") and not finished


# --------------------------------------------------------------------------- lifecycle


class _NoWebhookServer:
    """Stands in for kopf's server when injection is off: kopf refuses to start with
    admission handlers but no ``settings.admission.server``; this one never serves."""

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        await asyncio.Event().wait()
        yield kopf.WebhookClientConfig()


def configure_admission(
    kopf_settings: kopf.OperatorSettings, ours: OperatorSettings, logger: Logger
) -> None:
    """kopf's admission server from our settings (called at start-up)."""
    if ours.webhook_cert_file is None and ours.webhook_managed is None:
        logger.info(
            "no MAILWARDEN_WEBHOOK_CERT_FILE/KEY_FILE: "
            "no admission webhook, sidecar injection is off"
        )
        kopf_settings.admission.server = _NoWebhookServer()
        return
    kopf_settings.admission.server = kopf.WebhookServer(
        addr=ours.webhook_host,
        port=ours.webhook_port,
        certfile=ours.webhook_cert_file,
        pkeyfile=ours.webhook_key_file,
    )
    if ours.webhook_managed:
        kopf_settings.admission.managed = ours.webhook_managed
    logger.info(
        "admission webhook on https://%s:%s/%s (failurePolicy %s)",
        ours.webhook_host,
        ours.webhook_port,
        WEBHOOK_ID,
        ours.webhook_failure_policy,
    )


async def startup(
    rt: Runtime, kopf_settings: kopf.OperatorSettings, memo: Any, logger: Logger
) -> None:
    configure_admission(kopf_settings, rt.settings, logger)
    memo.injection_check = asyncio.create_task(NotInjectedCheck(rt).run(logger))


async def cleanup(memo: Any) -> None:
    task = getattr(memo, "injection_check", None)
    if isinstance(task, asyncio.Task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

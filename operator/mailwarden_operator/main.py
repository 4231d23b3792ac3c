"""The operator's kopf entry point: thin ``@kopf.on.*`` wrappers, nothing else.

Run it with kopf's CLI, naming the namespaces to watch (or ``-A`` for all)::

    kopf run --standalone -m mailwarden_operator.main -n mail -n other
    kopf run --standalone -m mailwarden_operator.main -A

or let ``MAILWARDEN_NAMESPACES`` decide (see :mod:`mailwarden_operator.settings`)::

    python -m mailwarden_operator.main

``--standalone``: one replica, no KopfPeering objects needed (the Deployment runs one
replica with the ``Recreate`` strategy). Behaviour lives in ``handlers/``; these wrappers
only unpack kopf's kwargs.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from mailwarden_operator import handlers
from mailwarden_operator.handlers import injection, mailaccount
from mailwarden_operator.injection import INJECT_ANNOTATION
from mailwarden_operator.kube import GROUP, VERSION
from mailwarden_operator.settings import OperatorSettings

MAILACCOUNTS = (GROUP, VERSION, "mailaccounts")


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod the ServiceAccount; elsewhere $KUBECONFIG / ~/.kube/config. kopf's own
    # login would also try the kubernetes/pykube clients, which we don't ship.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(
    *, settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    configure(settings)
    rt = await handlers.startup(memo, logger)
    await injection.startup(rt, settings, memo, logger)
    if rt.health is not None:
        rt.health.ready = True


@kopf.on.cleanup()
async def cleanup(*, memo: kopf.Memo, **_: Any) -> None:
    await injection.cleanup(memo)
    await handlers.cleanup(memo)


@kopf.index(*MAILACCOUNTS)
def mailaccounts_by_secret(
    *, namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[Any, str]:
    return mailaccount.index_secret_refs(namespace or "", name, spec)


@kopf.on.resume(*MAILACCOUNTS)
@kopf.on.create(*MAILACCOUNTS)
@kopf.on.update(*MAILACCOUNTS)
async def reconcile_mailaccount(
    *, namespace: str | None, name: str, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    await mailaccount.reconcile(handlers.runtime(memo), namespace or "", name, logger)


@kopf.on.delete(*MAILACCOUNTS)
async def delete_mailaccount(
    *, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    await mailaccount.delete(handlers.runtime(memo), body, logger)


def secret_is_referenced(*, namespace: str | None, name: str, **kwargs: Any) -> bool:
    # A filter, so the many unrelated Secrets of a cluster don't each run (and log) a
    # handler. kopf passes indices to filters too.
    return mailaccount.is_referenced(kwargs["mailaccounts_by_secret"], namespace or "", name)


@kopf.on.event("", "v1", "secrets", when=secret_is_referenced)
async def secret_event(
    *,
    type: str | None,
    namespace: str | None,
    name: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    # Indices arrive as kwargs named after the index function; kopf's WatchingFn
    # protocol doesn't know that name, so it is taken from **kwargs.
    index: kopf.Index[Any, str] = kwargs["mailaccounts_by_secret"]
    await mailaccount.secret_changed(
        handlers.runtime(memo),
        event_type=type,
        namespace=namespace or "",
        name=name,
        index=index,
        logger=logger,
    )


@kopf.on.mutate(
    "",
    "v1",
    "pods",
    id=injection.WEBHOOK_ID,
    operations=["CREATE"],
    annotations={INJECT_ANNOTATION: kopf.PRESENT},
    # Read only by kopf's own configuration (MAILWARDEN_WEBHOOK_MANAGED, development):
    # an operator that is down must not block every pod of the cluster.
    ignore_failures=True,
)
async def inject_proxy(
    *,
    body: kopf.Body,
    patch: kopf.Patch,
    warnings: list[str],
    dryrun: bool,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    await injection.mutate(
        handlers.runtime(memo),
        body=body,
        patch=patch,
        warnings=warnings,
        dryrun=dryrun,
        logger=logger,
    )


# Registered after startup() above on purpose: kopf runs start-up handlers in
# registration order, and the authorization handlers' start-up needs the Runtime.
import mailwarden_operator.handlers.authorization  # noqa: E402, F401  (registers handlers)


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf settings: own annotation prefix and finalizer name; no ``status.kopf``
    (the CRD's structural schema would prune it, and users read status)."""
    settings.peering.standalone = True
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our Events come from handlers (one per condition change); kopf's log lines stay
    # logs. Explicit kopf.info()/warn() calls are still posted.
    settings.posting.loggers = False
    settings.posting.level = logging.INFO


def main() -> None:
    """``python -m mailwarden_operator.main``: kopf with the namespaces from settings."""
    ours = OperatorSettings.from_env()
    kopf.configure(verbose=False)
    kopf.run(
        standalone=True,
        clusterwide=ours.clusterwide,
        namespaces=ours.namespaces,
    )


if __name__ == "__main__":
    main()

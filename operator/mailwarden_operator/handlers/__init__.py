"""The operator's behaviour, called by the thin ``@kopf.on.*`` wrappers in ``main.py``.

Everything a handler needs lives in one :class:`Runtime`, made by the start-up handler
and kept in kopf's operator-wide ``memo`` (``memo.runtime``), which kopf passes to every
handler. A ``Runtime`` belongs to one operator run: ``kopf.testing.KopfRunner`` restarts the
operator in the same process with a new event loop, so nothing loop-bound (the aiohttp
session, locks) may live at module level.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from mailwarden_operator.kube import KubeClient, connect
from mailwarden_operator.metrics import HealthServer, OperatorMetrics
from mailwarden_operator.settings import OperatorSettings


@dataclass
class Runtime:
    kube: KubeClient
    settings: OperatorSettings
    metrics: OperatorMetrics
    health: HealthServer | None = None
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        """One lock per MailAccount: kopf serialises handlers per object, but a Secret
        change reconciles the MailAccount from the Secret's handler, concurrently."""
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)


def runtime(memo: Any) -> Runtime:
    """The :class:`Runtime` from kopf's ``memo`` kwarg."""
    rt = getattr(memo, "runtime", None)
    if not isinstance(rt, Runtime):
        raise RuntimeError("operator runtime missing: the start-up handler did not run")
    return rt


async def startup(memo: Any, logger: logging.Logger | logging.LoggerAdapter[Any]) -> Runtime:
    """Read settings, connect to the API, start the metrics/health server."""
    settings = OperatorSettings.from_env()
    metrics = OperatorMetrics()
    kube = await connect()
    health = None
    if settings.metrics_port:
        health = HealthServer(metrics, settings.metrics_host, settings.metrics_port)
        await health.start()
    rt = Runtime(kube=kube, settings=settings, metrics=metrics, health=health)
    memo.runtime = rt
    logger.info(
        "mailwarden operator started: %s",
        "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces),
    )
    return rt


async def cleanup(memo: Any) -> None:
    rt = getattr(memo, "runtime", None)
    if isinstance(rt, Runtime):
        if rt.health is not None:
            await rt.health.stop()
        await rt.kube.close()

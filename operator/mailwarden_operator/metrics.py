"""Operator metrics and the /metrics, /healthz, /readyz endpoints (aiohttp).

An own :class:`~prometheus_client.CollectorRegistry` per :class:`OperatorMetrics`, so
tests can make as many as they like and nothing from the default registry (or a library
that registers there) leaks into the operator's endpoint.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)

READY_VALUES = ("True", "False", "Unknown")
RESULTS = ("success", "failure", "error")
INJECTION_RESULTS = ("injected", "unchanged", "refused")


class OperatorMetrics:
    """``mailwarden_operator_*`` metrics.

    - ``reconciles_total{result}``: ``success`` (config rendered), ``failure`` (the
      MailAccount or its Secrets are at fault: ConfigRendered=False), ``error`` (the
      operator or the API failed; kopf retries).
    - ``reconcile_duration_seconds``: wall time of one reconcile.
    - ``mailaccounts{ready}``: MailAccounts by their Ready condition's status.
    - ``injections_total{result}``: admission requests for annotated pods: ``injected``,
      ``unchanged`` (already injected), ``refused`` (refused, or admitted without the
      sidecar under failurePolicy Ignore).
    - ``pods_not_injected{namespace}``: pods that asked for the sidecar but run without
      it, as of the last periodic check.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "mailwarden_operator_reconciles",
            "MailAccount reconciles by result.",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "mailwarden_operator_reconcile_duration_seconds",
            "Wall time of one MailAccount reconcile.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.mailaccounts = Gauge(
            "mailwarden_operator_mailaccounts",
            "MailAccounts by the status of their Ready condition.",
            ["ready"],
            registry=self.registry,
        )
        self.injections = Counter(
            "mailwarden_operator_injections",
            "Admission requests for pods asking for the mail proxy sidecar, by result.",
            ["result"],
            registry=self.registry,
        )
        self.pods_not_injected = Gauge(
            "mailwarden_operator_pods_not_injected",
            "Pods annotated mailwarden.io/inject running without the sidecar (last check).",
            ["namespace"],
            registry=self.registry,
        )
        for result in RESULTS:  # zero series exist before the first reconcile
            self.reconciles.labels(result)
        for result in INJECTION_RESULTS:
            self.injections.labels(result)
        self._not_injected: set[str] = set()
        self._ready: dict[tuple[str, str], str] = {}
        self._publish()

    def observe_ready(self, namespace: str, name: str, ready: str | None) -> None:
        """Record a MailAccount's Ready status; ``None`` forgets it (deleted)."""
        key = (namespace, name)
        if ready is None:
            self._ready.pop(key, None)
        else:
            self._ready[key] = ready if ready in READY_VALUES else "Unknown"
        self._publish()

    def observe_not_injected(self, counts: dict[str, int]) -> None:
        """Publish one check's pods-not-injected counts by namespace. Namespaces that had
        some and have none now go to 0 (not absent), so alerts resolve visibly."""
        for namespace in self._not_injected - counts.keys():
            self.pods_not_injected.labels(namespace).set(0)
        for namespace, count in counts.items():
            self.pods_not_injected.labels(namespace).set(count)
        self._not_injected |= counts.keys()

    def _publish(self) -> None:
        tally = Tally(self._ready.values())
        for value in READY_VALUES:
            self.mailaccounts.labels(value).set(tally[value])

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """/metrics, /healthz (the event loop answers) and /readyz (start-up finished)."""

    def __init__(self, metrics: OperatorMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.ready = False
        self._runner: web.AppRunner | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def _metrics(self, _: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self._runner.addresses:  # the real port when asked for port 0 (tests)
            self.port = int(self._runner.addresses[0][1])
        log.info("metrics and health on http://%s:%s/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

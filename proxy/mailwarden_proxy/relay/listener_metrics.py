"""A listener's metric children, looked up once per listener rather than per event."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailwarden_proxy.config.model import Listener
from mailwarden_proxy.metrics import ProxyMetrics

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge


class ListenerMetrics:
    """A listener's metric children, looked up once: `labels()` per session and event
    showed up in the SMTP profile (bench/README.md)."""

    def __init__(self, metrics: ProxyMetrics, listener: Listener) -> None:
        name, protocol = listener.name, listener.protocol.value
        self._metrics = metrics
        self._name = name
        self._protocol = protocol
        self.connections: Counter = metrics.connections.labels(name, protocol)
        self.active: Gauge = metrics.active_connections.labels(name, protocol)
        self.relayed_up: Counter = metrics.relayed_bytes.labels(name, "upstream")
        self.relayed_down: Counter = metrics.relayed_bytes.labels(name, "downstream")
        self._logins: dict[str, Counter] = {}
        self._upstream_errors: dict[str, Counter] = {}
        self._timeouts: dict[str, Counter] = {}
        self._refused: dict[str, Counter] = {}

    def login(self, result: str) -> Counter:
        return _child(self._logins, self._metrics.logins, self._name, self._protocol, result)

    def timeout(self, phase: str) -> Counter:
        timeouts = self._metrics.session_timeouts
        return _child(self._timeouts, timeouts, self._name, self._protocol, phase)

    def refused(self, reason: str) -> Counter:
        refused = self._metrics.connections_refused
        return _child(self._refused, refused, self._name, self._protocol, reason)

    def upstream_error(self, kind: str) -> Counter:
        return _child(self._upstream_errors, self._metrics.upstream_errors, self._name, kind)


def _child(cache: dict[str, Counter], family: Counter, *labels: str) -> Counter:
    """`family.labels(*labels)`, kept in `cache` by the last label; created on first use,
    so results that never happen stay out of /metrics."""
    child = cache.get(labels[-1])
    if child is None:
        child = cache[labels[-1]] = family.labels(*labels)
    return child

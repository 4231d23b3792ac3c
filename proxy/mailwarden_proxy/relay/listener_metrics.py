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
        child = self._logins.get(result)
        if child is None:  # created on first use, so unused results stay out of /metrics
            child = self._logins[result] = self._metrics.logins.labels(
                self._name, self._protocol, result
            )
        return child

    def timeout(self, phase: str) -> Counter:
        child = self._timeouts.get(phase)
        if child is None:
            child = self._timeouts[phase] = self._metrics.session_timeouts.labels(
                self._name, self._protocol, phase
            )
        return child

    def refused(self, reason: str) -> Counter:
        child = self._refused.get(reason)
        if child is None:
            child = self._refused[reason] = self._metrics.connections_refused.labels(
                self._name, self._protocol, reason
            )
        return child

    def upstream_error(self, kind: str) -> Counter:
        child = self._upstream_errors.get(kind)
        if child is None:
            child = self._upstream_errors[kind] = self._metrics.upstream_errors.labels(
                self._name, kind
            )
        return child

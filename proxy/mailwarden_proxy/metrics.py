"""Prometheus metrics of the proxy, in base units with the `mailwarden_` prefix.

One `ProxyMetrics` per process owns its own registry (tests start several proxies in
one interpreter). Label values are listener names, protocols, account names and short
result words: never tokens, passwords or free-form error text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Token endpoints answer in tens to hundreds of milliseconds; timeouts go to 30 s.
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.token_expiry = Gauge(
            "mailwarden_token_expiry_timestamp_seconds",
            "When the cached access token of an account expires (Unix time).",
            ["account"],
            registry=r,
        )
        self.token_requests = Counter(
            "mailwarden_token_requests_total",
            "Token requests to the identity provider by result (ok, or the IdP's error code).",
            ["account", "result"],
            registry=r,
        )
        self.token_request_duration = Histogram(
            "mailwarden_token_request_duration_seconds",
            "Duration of token requests to the identity provider.",
            ["account"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.logins = Counter(
            "mailwarden_logins_total",
            "Client logins by protocol and result.",
            ["listener", "protocol", "result"],
            registry=r,
        )
        self.active_connections = Gauge(
            "mailwarden_active_connections",
            "Client connections currently open.",
            ["listener", "protocol"],
            registry=r,
        )
        self.connections = Counter(
            "mailwarden_connections_total",
            "Client connections accepted.",
            ["listener", "protocol"],
            registry=r,
        )
        self.relayed_bytes = Counter(
            "mailwarden_relayed_bytes_total",
            "Bytes relayed after login, by direction (upstream: client to server).",
            ["listener", "direction"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "mailwarden_upstream_errors_total",
            "Failures talking to the upstream mail server, by kind.",
            ["listener", "kind"],
            registry=r,
        )
        self.login_failures = Counter(
            "mailwarden_login_failures_total",
            "Failed client logins by the error catalogue's reason code (docs/troubleshooting.md).",
            ["listener", "reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "mailwarden_connections_refused_total",
            "Client connections refused at accept, by reason (max_connections).",
            ["listener", "protocol", "reason"],
            registry=r,
        )
        self.session_timeouts = Counter(
            "mailwarden_session_timeouts_total",
            "Sessions closed by a timeout, by phase (login: the pre-login dialogue took "
            "too long; idle: no traffic after login).",
            ["listener", "protocol", "phase"],
            registry=r,
        )
        self.listener_info = Gauge(
            "mailwarden_listener_info",
            "Bound listeners (always 1); loopback=false means reachable from other hosts.",
            ["listener", "protocol", "address", "loopback"],
            registry=r,
        )
        self.config_reloads = Counter(
            "mailwarden_config_reloads_total",
            "Configuration reloads (SIGHUP) by result.",
            ["result"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # The token cache reports through these (see tokens.cache.TokenObserver).
    def token_request(self, account: str, result: str, seconds: float) -> None:
        self.token_requests.labels(account, result).inc()
        self.token_request_duration.labels(account).observe(seconds)

    def token_expiry_set(self, account: str, expires_at: float) -> None:
        self.token_expiry.labels(account).set(expires_at)

"""Run the proxy: listeners, token broker, health endpoint, signals.

SIGHUP re-reads the configuration file (a bad file is refused and the old one stays in
force). The file is also watched: in a pod it is a mounted Secret that the kubelet
replaces when the operator re-renders it, and nobody can send the sidecar a signal.
SIGTERM and SIGINT stop accepting and let live sessions finish for the drain period, as
Kubernetes expects during its termination grace period.

Nothing is written to disk unless a cache store is given (`tokens.store`, opened by the
CLI): a read-only configuration mount must work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import resource
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from mailwarden_proxy.config.errors import ConfigError
from mailwarden_proxy.config.load import load_config
from mailwarden_proxy.config.model import ProxyConfig
from mailwarden_proxy.health import HealthServer
from mailwarden_proxy.metrics import ProxyMetrics
from mailwarden_proxy.relay.server import ProxyServer
from mailwarden_proxy.tokens.cache import TokenBroker

if TYPE_CHECKING:
    from mailwarden_proxy.tokens.store import TokenStore

log = logging.getLogger("mailwarden")


def ensure_file_descriptors(config: ProxyConfig) -> None:
    """Raise the soft open-files limit (up to the hard one) to what the connection caps
    need: two descriptors per session, plus some slack. A proxy that runs out of
    descriptors cannot even accept a connection to say "try again later" (Go raises
    this limit the same way at start-up)."""
    needed = 2 * config.limits.max_connections * len(config.listeners) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warning(
            "open-files limit %d is below the %d that %d listeners x %d connections "
            "(limits.maxConnectionsPerListener) need; past it, clients are refused "
            "without a reply",
            soft,
            needed,
            len(config.listeners),
            config.limits.max_connections,
        )


def install_event_loop() -> None:
    """Use uvloop where it is installed: less CPU and ~45 KB instead of ~290 KB per TLS session."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class ProxyApp:
    """The proxy process: what `mailwarden-proxy --config` runs, and what tests start."""

    def __init__(
        self,
        config: ProxyConfig,
        config_path: Path | None = None,
        *,
        token_store: TokenStore | None = None,
    ) -> None:
        self.config_path = config_path
        self.metrics = ProxyMetrics()
        self.token_store = token_store
        factory = None
        if token_store is not None:
            from mailwarden_proxy.tokens.factory import stored_provider_factory

            factory = stored_provider_factory(token_store)
        self.tokens = TokenBroker(factory, observer=self.metrics)
        # the store is opened once, at start; a reload that names another one is reported
        self._cache_store_setting = config.cache_store
        self.server = ProxyServer(config, self.tokens, self.metrics)
        self.health: HealthServer | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for warning in self.server.config.warnings:
            log.warning("configuration: %s", warning)
        if self.token_store is not None:
            log.info("refresh tokens are kept in the cache store %s", self.token_store.path)
        ensure_file_descriptors(self.server.config)
        await self.server.start()
        metrics = self.server.config.metrics
        if metrics.port:
            self.health = HealthServer(
                self.metrics, lambda: self.server.ready, metrics.address, metrics.port
            )
            await self.health.start()

    async def reload(self) -> bool:
        if self.config_path is None:
            return False
        try:
            config = load_config(self.config_path)
        except (ConfigError, OSError) as exc:
            self.metrics.config_reloads.labels("error").inc()
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False
        previous = set(self.server.config.accounts)
        if config.cache_store != self._cache_store_setting:
            self._cache_store_setting = config.cache_store
            log.warning(
                "configuration: cacheStore changed; the cache store is chosen at start "
                "(--cache-store overrides it)"
            )
        ensure_file_descriptors(config)
        await self.server.reload(config)
        # an account whose settings changed (say, a rotated client secret) is a new key:
        # drop the old one's tokens and background refresh instead of letting them idle out
        for account in previous - set(config.accounts):
            self.tokens.invalidate(account)
        self.metrics.config_reloads.labels("ok").inc()
        return True

    def request_stop(self) -> None:
        self._stop.set()

    async def stop(self, grace: float = 0.0) -> None:
        await self.server.drain(grace)
        if self.health is not None:
            await self.health.stop()
        await self.tokens.close()

    def _fingerprint(self) -> str:
        assert self.config_path is not None
        try:
            return hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            return ""  # mid-swap or gone: try again next round

    async def watch_config(self, interval: float) -> None:
        """Reload when the file's content changes (mtimes lie on Secret volumes)."""
        seen = self._fingerprint()
        while True:
            await asyncio.sleep(interval)
            current = self._fingerprint()
            if current and current != seen:
                seen = current
                log.info("configuration file changed; reloading")
                await self.reload()

    async def serve_until_signalled(self, grace: float, watch_interval: float = 0) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        await self.start()
        watcher = (
            loop.create_task(self.watch_config(watch_interval))
            if watch_interval > 0 and self.config_path is not None
            else None
        )
        await self._stop.wait()
        log.info("stopping")
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self.stop(grace)


async def run(
    config_path: Path,
    grace: float,
    watch_interval: float = 0,
    *,
    config: ProxyConfig | None = None,
    token_store: TokenStore | None = None,
) -> None:
    loaded = config if config is not None else load_config(config_path)
    app = ProxyApp(loaded, config_path, token_store=token_store)
    await app.serve_until_signalled(grace, watch_interval)

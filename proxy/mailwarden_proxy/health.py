"""`/metrics`, `/healthz` and `/readyz` on one small HTTP port.

A hand-rolled HTTP/1.0 responder on asyncio: three fixed GET routes don't justify a web
framework in the sidecar's memory footprint. Requests are bounded (one line of at
most 8 KiB, headers ignored, 5 s to send them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mailwarden_proxy.metrics import ProxyMetrics

log = logging.getLogger("mailwarden.health")

_MAX_REQUEST = 8192
_TEXT = "text/plain; charset=utf-8"
_PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(
        self, metrics: ProxyMetrics, ready: Callable[[], bool], address: str, port: int
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self.address = address
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.address, self.port, limit=_MAX_REQUEST
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%s/metrics", self.address, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"method not allowed\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, _PROMETHEUS, self._metrics.render()
        if path in ("/healthz", "/livez"):
            return 200, _TEXT, b"ok\n"
        if path == "/readyz":
            if self._ready():
                return 200, _TEXT, b"ready\n"
            return 503, _TEXT, b"not ready\n"
        return 404, _TEXT, b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            if len(parts) < 2:
                status, ctype, body = 400, _TEXT, b"bad request\n"
            else:
                status, ctype, body = self._route(parts[0], parts[1])
            reason = {
                200: "OK",
                400: "Bad Request",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }[status]
            head = (
                f"HTTP/1.0 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head if parts[:1] == ["HEAD"] else head + body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError):
            pass  # a slow, oversized or vanished scraper gets nothing
        finally:
            writer.close()

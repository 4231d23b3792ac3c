"""Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol.

Just enough of CDP for the consent tests: open a URL, evaluate JavaScript, click a link
and wait for the page that the redirects end on. The websocket is aiohttp's client, so no
browser-automation package is needed. The test identity provider's certificate is trusted
by its public key only (`--ignore-certificate-errors-spki-list`), not by switching
certificate checks off.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def spki_hash(host: str, port: int) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of the certificate a TLS server presents."""
    pem = ssl.get_server_certificate((host, port))
    key = x509.load_pem_x509_certificate(pem.encode()).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Chromium:
    """One headless browser process; use as a context manager."""

    def __init__(self, binary: str, *, trusted_spki: tuple[str, ...] = ()) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="mailwarden-chromium-"))
        args = [
            binary,
            "--headless",
            "--no-sandbox",  # runs as root in CI containers
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ]
        if trusted_spki:
            args.append(f"--ignore-certificate-errors-spki-list={','.join(trusted_spki)}")
        args.append("about:blank")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.browser_ws = self._wait_for_endpoint()
        self.log: list[str] = []

    def _wait_for_endpoint(self, timeout: float = 30) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode(errors="replace")
            if not line and self.proc.poll() is not None:
                break
            seen.append(line)
            match = _LISTENING.search(line)
            if match:
                return match.group(1)
        self.close()
        raise RuntimeError("chromium did not start:\n" + "".join(seen[-20:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)


class Page:
    """A tab, over its own DevTools websocket session (flattened target attach)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session_id: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids) + 1000
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if self.session_id:  # browser-level commands go without one
            message["sessionId"] = self.session_id
        await self.ws.send_json(message)
        while True:
            answer = json.loads((await self.ws.receive(timeout=30)).data)
            if answer.get("id") == ident:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result") or {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return (result.get("result") or {}).get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for(f"location.href.startsWith({json.dumps(url[:20])})")
        await self.wait_for("document.readyState === 'complete'")

    async def wait_for(self, expression: str, seconds: float = 30) -> Any:
        deadline = time.monotonic() + seconds
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
            except RuntimeError:  # the context is being replaced by a navigation
                last = None
            if last:
                return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression!r} (last: {last!r})")


async def open_page(browser_ws: str) -> tuple[aiohttp.ClientSession, Page]:
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(browser_ws, max_msg_size=0)
    page = Page(ws, "")
    target = await page.send("Target.createTarget", url="about:blank")
    attached = await page.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    page.session_id = attached["sessionId"]
    await page.send("Page.enable")
    await page.send("Runtime.enable")
    return session, page

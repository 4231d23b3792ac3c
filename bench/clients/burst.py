"""Cold burst: many clients log in at the same instant, one thread each.

The direct path has no proxy to be cold: its client fetches one token (inside the
timing) and then all its clients log in with it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from bench.clients.imap import ImapClient
from bench.clients.token import fetch_token
from bench.paths import Endpoint


def burst(endpoint: Endpoint, clients: int, timeout: float) -> dict[str, Any]:
    finished: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients + 1)

    def one(target: Endpoint, started: list[float]) -> None:
        gate.wait()
        try:
            client = ImapClient(target, timeout=timeout)
            client.login()
            done = time.perf_counter()
            client.logout()
            with lock:
                finished.append(done - started[0])
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:120])

    started = [0.0]
    target = endpoint
    threads: list[threading.Thread] = []
    if endpoint.credentials is not None:
        started[0] = time.perf_counter()
        assert endpoint.ca_path is not None
        token = fetch_token(endpoint.credentials, endpoint.ca_path)
        target = dataclasses.replace(endpoint, token=token, credentials=None)
    threads = [
        threading.Thread(target=one, args=(target, started), daemon=True) for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    if endpoint.credentials is None:
        started[0] = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join(timeout + 5)
    return {
        "ok": len(finished),
        "failed": clients - len(finished),
        "last_login_s": max(finished) if finished else None,
        "errors": sorted(set(errors))[:5],
    }

"""One long-lived client process for the workloads.

The IdP (threads) and aiosmtpd (an asyncio thread) live in the main process; a client
in the same interpreter would take turns with them on the GIL and measure that instead.
The worker is spawned once and reused, so no figure pays for an interpreter start.
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from bench.procstat import raise_nofile

T = TypeVar("T")


def _initialise() -> None:
    raise_nofile()  # the cold burst opens 100 sockets at once, the CI soft limit is 1,024
    warnings.simplefilter("ignore")


class Worker:
    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_initialise,
        )

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = 600) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""What every scenario gets: sizes, the running servers, the paths and the worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bench.paths import PATHS, PathEndpoints, PathName
from bench.proxies import ProxyProcess
from bench.results import Value
from bench.servers import ClientCredentials, Upstreams
from bench.worker import Worker

T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """How big each figure's workload is (`full` is what issue 6 asks for)."""

    name: str
    fetch_messages: int
    message_size: int
    fetch_reps: int
    logins: int  # per path, split over `login_rounds` interleaved rounds
    login_rounds: int
    burst_clients: int
    burst_reps: int
    burst_timeout: float
    idle_sessions: int
    idle_budget: float  # seconds to open them; emailproxy needs ~0.2 s of CPU per login
    smtp_each: int  # one message per connection, per path, split over rounds
    smtp_each_rounds: int
    smtp_many: int  # messages on one connection, per repetition
    smtp_many_reps: int
    smtp_size: int = 10 * 1024


FULL = Profile(
    name="full",
    fetch_messages=200, message_size=506_000, fetch_reps=9,
    logins=200, login_rounds=5,
    burst_clients=100, burst_reps=2, burst_timeout=60.0,
    idle_sessions=1000, idle_budget=150.0,
    smtp_each=100, smtp_each_rounds=5,
    smtp_many=500, smtp_many_reps=3,
)  # fmt: skip

QUICK = Profile(
    name="quick",
    fetch_messages=10, message_size=506_000, fetch_reps=2,
    logins=20, login_rounds=2,
    burst_clients=20, burst_reps=1, burst_timeout=10.0,
    idle_sessions=50, idle_budget=20.0,
    smtp_each=10, smtp_each_rounds=2,
    smtp_many=50, smtp_many_reps=2,
)  # fmt: skip


@dataclass
class Bench:
    profile: Profile
    upstreams: Upstreams
    worker: Worker
    endpoints: dict[PathName, PathEndpoints]
    proxies: dict[PathName, ProxyProcess]
    direct_credentials: ClientCredentials
    skipped: dict[PathName, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", flush=True)

    def paths(self) -> list[PathName]:
        """The paths that can run, in the interleaving order."""
        return [p for p in PATHS if p not in self.skipped]

    def missing(self, path: PathName) -> Value:
        return Value(None, "skipped", self.skipped[path])

    def attempt(
        self, path: PathName, failures: dict[PathName, str], what: str, fn: Callable[[], T]
    ) -> T | None:
        """Run one measurement; a failure is recorded for the path, not raised, so one
        broken path (say, emailproxy stuck at its fd limit) can't lose the others' figures."""
        if path in failures:
            return None
        try:
            return fn()
        except Exception as exc:
            failures[path] = f"{what}: {type(exc).__name__}: {exc}"[:300]
            self.log(f"{path}: {failures[path]}")
            proxy = self.proxies.get(path)
            if proxy is not None:
                self.log(f"{path} log tail:\n{proxy.log_tail()}")
            return None

    def finish(
        self, failures: dict[PathName, str], samples: dict[PathName, list[float]], **extra: object
    ) -> dict[PathName, Value]:
        """Per path: the median of its samples, or why there are none."""
        values: dict[PathName, Value] = {}
        for path in PATHS:
            if path in self.skipped:
                values[path] = self.missing(path)
            elif path in failures and not samples.get(path):
                values[path] = Value(None, "failed", failures[path])
            else:
                values[path] = Value.median_of(samples.get(path, []), **extra)
        return values

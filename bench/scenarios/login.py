"""Connection setup: connect + login + logout, one after another, token cached.

The logins of each path are split into rounds (A/B/C/A/B/C...) so a slow minute of the
machine is shared by all paths; the percentiles are over all of a path's logins.
"""

from __future__ import annotations

import statistics
from functools import partial

from bench.clients import imap
from bench.context import Bench
from bench.paths import PATHS, PathName
from bench.results import NOT_APPLICABLE, Figure, Goal, Value, ok

WARM_UP = 3  # the first login fetches the token and (mailwarden) loads the provider


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[98]


def _added_goal(values: dict[PathName, Value]) -> bool | None:
    added = ok(values, PathName.MAILWARDEN)
    return None if added is None else added <= 1.0


def run(bench: Bench) -> list[Figure]:
    profile = bench.profile
    per_round = max(1, profile.logins // profile.login_rounds)
    failures: dict[PathName, str] = {}
    times: dict[PathName, list[float]] = {p: [] for p in PATHS}
    cpu_ms: dict[PathName, list[float]] = {p: [] for p in PATHS}

    def series(path: PathName, count: int, record: bool) -> None:
        proxy = bench.proxies.get(path)
        before = proxy.cpu_seconds() if proxy else 0.0
        seconds = bench.worker.call(imap.login_series, bench.endpoints[path].imap, count)
        if record:
            times[path].extend(s * 1000 for s in seconds)
            if proxy is not None:
                cpu_ms[path].append((proxy.cpu_seconds() - before) * 1000 / count)

    for path in bench.paths():
        bench.attempt(path, failures, "warm-up login", partial(series, path, WARM_UP, False))
    for round_ in range(profile.login_rounds):
        for path in bench.paths():
            bench.attempt(
                path, failures, f"login round {round_ + 1}",
                partial(series, path, per_round, True),
            )  # fmt: skip
        bench.log(
            f"login round {round_ + 1}: "
            + ", ".join(f"{p} p50 {statistics.median(times[p]):.1f} ms" for p in PATHS if times[p])
        )

    def per_path(stat: str) -> dict[PathName, Value]:
        values = bench.finish(failures, times)
        for path, value in values.items():
            if value.status == "ok":
                samples = times[path]
                value.value = statistics.median(samples) if stat == "p50" else _p99(samples)
                value.samples = []  # the raw logins are many; keep the JSON readable
                value.extra = {"logins": len(samples)}
        return values

    p50, p99 = per_path("p50"), per_path("p99")
    added: dict[PathName, Value] = {PathName.DIRECT: Value(0.0)}  # the reference
    direct = ok(p50, PathName.DIRECT)
    for path in (PathName.MAILWARDEN, PathName.EMAILPROXY):
        mine = ok(p50, path)
        added[path] = (
            Value(mine - direct)
            if mine is not None and direct is not None
            else Value(None, p50[path].status, p50[path].note or "no direct reference")
        )
    cpu = bench.finish(failures, cpu_ms)
    cpu[PathName.DIRECT] = NOT_APPLICABLE
    return [
        Figure("login_p50", "connect+login+logout p50", "ms", False, p50),
        Figure("login_p99", "connect+login+logout p99", "ms", False, p99),
        Figure(
            "login_added_p50", "login p50 added over direct", "ms", False, added,
            goal=Goal("mailwarden adds <= 1 ms", _added_goal), ratios=False,
        ),
        Figure("proxy_cpu_per_login", "proxy CPU per login", "ms", False, cpu),
    ]  # fmt: skip

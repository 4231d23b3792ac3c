"""IMAP bulk: LOGIN, SELECT, FETCH 1:* (BODY.PEEK[]) of the whole mailbox; and the proxy
CPU each gigabyte costs, measured on the same transfers."""

from __future__ import annotations

from functools import partial

from bench.clients import imap
from bench.context import Bench
from bench.paths import PATHS, PathName
from bench.results import NOT_APPLICABLE, Figure, Goal, Value, ok
from bench.servers import seed_mailbox


def _fetch_goal(values: dict[PathName, Value]) -> bool | None:
    mine, direct = ok(values, PathName.MAILWARDEN), ok(values, PathName.DIRECT)
    return None if mine is None or direct is None else mine >= 0.90 * direct


def run(bench: Bench) -> list[Figure]:
    profile = bench.profile
    stored = seed_mailbox(bench.upstreams.dovecot, profile.fetch_messages, profile.message_size)
    bench.log(f"fetch: {profile.fetch_messages} messages, {stored / 1e6:.1f} MB stored")
    failures: dict[PathName, str] = {}
    throughput: dict[PathName, list[float]] = {p: [] for p in PATHS}
    cpu_per_gb: dict[PathName, list[float]] = {p: [] for p in PATHS}

    def once(path: PathName, record: bool) -> None:
        proxy = bench.proxies.get(path)
        before = proxy.cpu_seconds() if proxy else 0.0
        size, seconds = bench.worker.call(imap.fetch_all, bench.endpoints[path].imap)
        if not record:
            return
        throughput[path].append(size / seconds / 1e6)
        if proxy is not None:
            cpu_per_gb[path].append((proxy.cpu_seconds() - before) / (size / 1e9))

    # untimed: Dovecot builds its index, the page cache fills, proxies warm up
    for path in bench.paths():
        bench.attempt(path, failures, "warm-up fetch", partial(once, path, False))
    for rep in range(profile.fetch_reps):
        for path in bench.paths():
            bench.attempt(path, failures, f"fetch {rep + 1}", partial(once, path, True))
        bench.log(
            f"fetch round {rep + 1}: "
            + ", ".join(f"{p} {throughput[p][-1]:.0f} MB/s" for p in PATHS if throughput[p])
        )
    fetch = Figure(
        "imap_fetch",
        f"IMAP FETCH 1:* of {stored / 1e6:.0f} MB",
        "MB/s",
        higher_is_better=True,
        values=bench.finish(failures, throughput, bytes=stored),
        goal=Goal("mailwarden >= 0.90 x direct", _fetch_goal),
    )
    cpu_values = bench.finish(failures, cpu_per_gb)
    cpu_values[PathName.DIRECT] = NOT_APPLICABLE
    cpu = Figure(
        "proxy_cpu_per_gb",
        "proxy CPU per GB fetched (user+sys)",
        "s/GB",
        higher_is_better=False,
        values=cpu_values,
    )
    return [fetch, cpu]

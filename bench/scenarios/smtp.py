"""SMTP submission of 10 KB messages: one per connection, and many on one connection."""

from __future__ import annotations

from functools import partial

from bench.clients import smtp
from bench.context import Bench
from bench.paths import PATHS, PathName
from bench.results import Figure, Goal, Value, ok


def _goal(values: dict[PathName, Value]) -> bool | None:
    mine, direct = ok(values, PathName.MAILWARDEN), ok(values, PathName.DIRECT)
    return None if mine is None or direct is None else mine >= 0.85 * direct


def run(bench: Bench) -> list[Figure]:
    profile = bench.profile
    size = profile.smtp_size
    per_round = max(1, profile.smtp_each // profile.smtp_each_rounds)
    failures: dict[PathName, str] = {}
    each: dict[PathName, list[float]] = {p: [] for p in PATHS}
    many: dict[PathName, list[float]] = {p: [] for p in PATHS}

    def send_each(path: PathName, count: int, record: bool) -> None:
        seconds = bench.worker.call(
            smtp.one_per_connection, bench.endpoints[path].smtp, count, size
        )
        if record:
            each[path].append(count / seconds)

    def send_many(path: PathName) -> None:
        seconds = bench.worker.call(
            smtp.many_on_one_connection, bench.endpoints[path].smtp, profile.smtp_many, size
        )
        many[path].append(profile.smtp_many / seconds)

    for path in bench.paths():
        bench.attempt(path, failures, "warm-up send", partial(send_each, path, 2, False))
    for round_ in range(profile.smtp_each_rounds):
        for path in bench.paths():
            bench.attempt(
                path, failures, f"send round {round_ + 1}",
                partial(send_each, path, per_round, True),
            )  # fmt: skip
    bench.log("smtp one per connection: " + _summary(each))
    for rep in range(profile.smtp_many_reps):
        for path in bench.paths():
            bench.attempt(path, failures, f"many on one {rep + 1}", partial(send_many, path))
    bench.log(f"smtp {profile.smtp_many} on one connection: " + _summary(many))
    bench.upstreams.smtpd.reset()  # the server keeps every message in memory
    goal = Goal("mailwarden >= 0.85 x direct", _goal)
    return [
        Figure("smtp_one_per_connection", f"SMTP {size // 1024} KB, one per connection",
               "msg/s", True, bench.finish(failures, each), goal=goal),
        Figure("smtp_many_per_connection",
               f"SMTP {size // 1024} KB, {profile.smtp_many} on one connection",
               "msg/s", True, bench.finish(failures, many), goal=goal),
    ]  # fmt: skip


def _summary(samples: dict[PathName, list[float]]) -> str:
    return ", ".join(f"{p} {max(s):.0f}/s" for p, s in samples.items() if s)

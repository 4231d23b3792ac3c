"""Idle sessions: N authenticated IMAP connections held open in IDLE.

Per proxy: its RSS with all sessions open, and (RSS then - RSS before) / sessions. The
direct path has no proxy; it shows that Dovecot itself holds N sessions.
"""

from __future__ import annotations

import time

from bench.clients.idle import hold_idle
from bench.context import Bench
from bench.paths import PATHS, PathName
from bench.procstat import rss_bytes, thread_count
from bench.results import NOT_APPLICABLE, Figure, Goal, Value

SETTLE = 3.0  # seconds for Dovecot to end the previous path's sessions


def run(bench: Bench) -> list[Figure]:
    profile = bench.profile
    sessions = profile.idle_sessions
    opened: dict[PathName, Value] = {}
    total: dict[PathName, Value] = {}
    each: dict[PathName, Value] = {}
    for path in PATHS:
        if path in bench.skipped:
            opened[path] = total[path] = each[path] = bench.missing(path)
            continue
        proxy = bench.proxies.get(path)
        baseline = proxy.rss_bytes() if proxy else 0

        def measure(pid: int | None = proxy.pid if proxy else None) -> dict[str, float]:
            if pid is None:
                return {}
            return {"rss": rss_bytes(pid), "threads": thread_count(pid)}

        try:
            result = hold_idle(bench.endpoints[path].imap, sessions, profile.idle_budget, measure)
        except Exception as exc:
            failed = Value(None, "failed", f"{type(exc).__name__}: {exc}"[:300])
            opened[path] = total[path] = each[path] = failed
            continue
        note = "" if result.opened == sessions else (
            f"{result.opened} of {sessions} opened in {result.seconds:.0f} s; "
            f"{'; '.join(sorted(set(result.errors))[:3])}"
        )  # fmt: skip
        bench.log(f"idle {path}: {result.opened}/{sessions} in {result.seconds:.1f}s {note}")
        opened[path] = Value(result.opened, note=note, extra={"seconds": result.seconds})
        if proxy is None or result.opened == 0:
            total[path] = each[path] = (
                NOT_APPLICABLE if proxy is None else Value(None, "failed", note)
            )
        else:
            rss = result.measured["rss"]
            extra = {"baseline_mb": baseline / 1e6, "threads": result.measured["threads"]}
            total[path] = Value(rss / 1e6, note=note, extra=extra)
            each[path] = Value((rss - baseline) / result.opened / 1e3, note=note, extra=extra)
        time.sleep(SETTLE)

    def goal(values: dict[PathName, Value]) -> bool | None:
        mine = values.get(PathName.MAILWARDEN)
        if sessions < 1000 or mine is None or mine.value is None or mine.note:
            return None  # the goal is stated for 1,000 sessions
        return mine.value <= 80

    return [
        Figure("idle_sessions", f"idle IMAP sessions opened (of {sessions})", "sessions", True,
               opened, ratios=False),
        Figure("idle_rss_total", f"proxy RSS with {sessions} idle sessions", "MB", False, total,
               goal=Goal("mailwarden <= 80 MB at 1,000 sessions", goal)),
        Figure("idle_rss_per_session", "proxy RSS per idle session", "KB", False, each),
    ]  # fmt: skip

"""Cold burst: N clients log in at once on a freshly started proxy.

Reported: time from the start to the last successful login, how many succeeded, and
how many token requests the IdP saw (counted from before the proxy's restart, so a
token fetched at start-up counts too).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from bench.clients.burst import burst
from bench.context import Bench
from bench.paths import PATHS, PathName
from bench.results import Figure, Goal, Value, ok


def run(bench: Bench) -> list[Figure]:
    profile = bench.profile
    clients = profile.burst_clients
    failures: dict[PathName, str] = {}
    last: dict[PathName, list[float]] = {p: [] for p in PATHS}
    succeeded: dict[PathName, list[float]] = {p: [] for p in PATHS}
    tokens: dict[PathName, list[float]] = {p: [] for p in PATHS}
    errors: dict[PathName, list[str]] = {p: [] for p in PATHS}

    def once(path: PathName) -> None:
        proxy = bench.proxies.get(path)
        endpoint = bench.endpoints[path].imap
        before = bench.upstreams.token_requests()
        if proxy is not None:
            proxy.restart()
        else:
            endpoint = dataclasses.replace(
                endpoint, token=None, credentials=bench.direct_credentials
            )
        result: dict[str, Any] = bench.worker.call(
            burst, endpoint, clients, profile.burst_timeout, timeout=profile.burst_timeout + 60
        )
        tokens[path].append(bench.upstreams.token_requests() - before)
        succeeded[path].append(result["ok"])
        errors[path].extend(result["errors"])
        if result["ok"] == clients:
            last[path].append(result["last_login_s"])
        bench.log(
            f"burst {path}: {result['ok']}/{clients} ok, last at {result['last_login_s']}, "
            f"{tokens[path][-1]} token request(s) {result['errors'][:2]}"
        )

    for rep in range(profile.burst_reps):
        for path in bench.paths():
            bench.attempt(path, failures, f"burst {rep + 1}", partial(once, path))

    last_values = bench.finish(failures, last)
    for path, value in last_values.items():
        if value.status == "failed" and succeeded[path]:
            value.note = f"not all {clients} logins succeeded within {profile.burst_timeout:.0f} s"
            value.extra = {"errors": sorted(set(errors[path]))[:5]}
    ok_values = bench.finish(failures, succeeded)
    for value in ok_values.values():
        if value.status == "ok":
            value.value = min(value.samples)  # the worst repetition: all must succeed
    token_values = bench.finish(failures, tokens)
    for value in token_values.values():
        if value.status == "ok":
            value.value = max(value.samples)

    def goal(_: dict[PathName, Value]) -> bool | None:
        done, asked = ok(ok_values, PathName.MAILWARDEN), ok(token_values, PathName.MAILWARDEN)
        return None if done is None or asked is None else done == clients and asked == 1

    return [
        Figure(
            "burst_last_login", f"cold burst of {clients}: time to last login", "s", False,
            last_values,
        ),
        Figure(
            "burst_logins_ok", f"cold burst of {clients}: logins that succeeded (worst)",
            "logins", True, ok_values, ratios=False,
            goal=Goal(f"mailwarden: all {clients} succeed with exactly 1 token request", goal),
        ),
        Figure(
            "burst_token_requests", f"cold burst of {clients}: token requests (most)",
            "requests", False, token_values, ratios=False,
        ),
    ]  # fmt: skip

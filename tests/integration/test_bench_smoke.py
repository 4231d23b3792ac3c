"""The benchmark's small version runs to the end and reports every figure.

Benchmarks are not tests: nothing here looks at a timing. This only keeps `bench/` from
rotting: the one command still starts every server and both proxies, runs every
scenario, and writes a figure for each path. emailproxy comes from PyPI; without network
its path is skipped, and the JSON must then say why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.fixtures.dovecot import require_binary

REPO = Path(__file__).resolve().parents[2]
FIGURES = {
    "imap_fetch",
    "proxy_cpu_per_gb",
    "login_p50",
    "login_p99",
    "login_added_p50",
    "proxy_cpu_per_login",
    "smtp_one_per_connection",
    "smtp_many_per_connection",
    "idle_sessions",
    "idle_rss_total",
    "idle_rss_per_session",
    "burst_last_login",
    "burst_logins_ok",
    "burst_token_requests",
}
PROXY_ONLY = {"proxy_cpu_per_gb", "proxy_cpu_per_login", "idle_rss_total", "idle_rss_per_session"}


@pytest.mark.dovecot
@pytest.mark.timeout(300)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    require_binary("dovecot", "/usr/sbin")
    out = tmp_path / "bench.json"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=280, check=False, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    document = json.loads(out.read_text())
    figures = document["figures"]
    assert set(figures) == FIGURES

    for key, figure in figures.items():
        for path in ("direct", "mailwarden"):
            value = figure["paths"][path]
            if path == "direct" and key in PROXY_ONLY:
                assert value["status"] == "n/a", (key, value)
                continue
            assert value["status"] == "ok", (key, path, value)
            assert isinstance(value["value"], int | float), (key, path, value)

    emailproxy = document["meta"]["emailproxy"]
    statuses = {figure["paths"]["emailproxy"]["status"] for figure in figures.values()}
    if "skipped" in emailproxy:
        # no network to install it: allowed, never silent
        assert emailproxy["skipped"], "a skipped emailproxy path must say why"
        assert statuses == {"skipped"}
        assert all(f["paths"]["emailproxy"]["note"] for f in figures.values())
        warnings.warn(f"emailproxy path skipped: {emailproxy['skipped']}", stacklevel=1)
    else:
        # measured, or failed with a reason (its burst can fail: that is a finding)
        assert emailproxy["version"]
        assert statuses <= {"ok", "failed"}
    print(f"bench --quick took {elapsed:.1f} s")

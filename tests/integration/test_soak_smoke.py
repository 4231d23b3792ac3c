"""The soak's small version (`bench/soak.py --quick`) runs to the end and reports.

Like the benchmark smoke test, nothing here looks at a timing or at the RSS verdict (30 s
on a shared machine proves nothing about flatness): only that the load ran, made
requests of every kind, refreshed tokens, that the proxy's file descriptors came back to
the baseline once the clients had gone, and that the JSON is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.dovecot import require_binary

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.dovecot
@pytest.mark.timeout(240)
def test_quick_soak_runs_and_fds_return_to_baseline(tmp_path: Path) -> None:
    require_binary("dovecot", "/usr/sbin")
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=220, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "verdict: RSS" in result.stdout

    document = json.loads(out.read_text())
    assert set(document) == {"meta", "summary", "verdict", "baseline", "after", "samples"}
    assert document["meta"]["command"].startswith("python bench/soak.py --quick")

    summary = document["summary"]
    ops = summary["operations"]
    for op in ("imap_logins", "imap_fetches", "idle_cycles", "smtp_logins", "smtp_messages"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert summary["errors"] == {}, summary["last_errors"]
    assert summary["token_refreshes"] >= 1
    assert summary["client_threads_not_stopped"] == 0
    assert summary["proxy_log"]["tracebacks"] == 0
    assert summary["proxy_log"]["secret_markers"] == 0

    samples = document["samples"]
    assert len(samples) >= 5
    for sample in samples:
        assert {"t", "rss_mb", "fds", "threads", "cpu_s", "token_requests", "ops"} <= set(sample)
        assert sample["rss_mb"] > 0 and sample["fds"] > 0
    # the load really held connections open, and they were all closed again
    assert max(s["fds"] for s in samples) > document["baseline"]["fds"]
    verdict = document["verdict"]
    assert verdict["fds_back_to_baseline"] is True, verdict
    assert verdict["fds_after"] <= verdict["fds_baseline"]
    assert isinstance(verdict["rss_flat"], bool)
    assert isinstance(verdict["rss_growth"], float)

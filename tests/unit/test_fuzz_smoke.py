"""The atheris harness (fuzz/) in smoke mode: every target for a small fixed budget.

`python -m fuzz.run --target all --runs 1500 --seconds 10` runs each target in its own
process from its seed corpus (the unit tests' scenarios); any crash or broken rule makes
it exit 1. Longer runs are by hand: `python -m fuzz.run --target all --seconds 300`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz import run, seeds, targets

ROOT = Path(__file__).resolve().parents[2]


def test_every_target_has_seeds_that_pass() -> None:
    """The seed corpus is valid input for its target (replayed without atheris)."""
    assert set(targets.TARGETS) == set(run.NAMES)
    with targets.hermetic_config():
        for name in run.NAMES:
            found = seeds.seeds(name)
            assert len(found) >= 10, name
            for data in found:
                targets.TARGETS[name](data)


def test_all_targets_run_without_crashing(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            "--target",
            "all",
            "--runs",
            "1500",
            "--seconds",
            "10",  # a cap for a loaded machine; 1,500 runs take about 1 s per target
            "--corpus-dir",
            str(tmp_path / "corpus"),
            "--crash-dir",
            str(tmp_path / "crashes"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = {
        m[1]: (int(m[2]), int(m[3]))
        for m in re.finditer(
            r"^(\w+)\s+(\d+)\s+[\d.]+\s+\d+\s+\d+\s+\d+\s+(\d+)", proc.stdout, re.M
        )
    }
    assert set(rows) >= set(run.NAMES), proc.stdout
    for name in run.NAMES:
        executions, crashes = rows[name]
        assert executions > 0 and crashes == 0, (name, proc.stdout)
    assert not any((tmp_path / "crashes").rglob("crash-*"))

"""The linters and the type checker are part of the test suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_check() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_proxy_never_imports_the_operator() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "proxy").rglob("*.py")
        if any(
            word in path.read_text()
            for word in ("import kopf", "mailwarden_operator", "import kubernetes")
        )
    ]
    assert offenders == []


def test_protocol_cores_are_sans_io() -> None:
    cores = (ROOT / "proxy" / "mailwarden_proxy" / "protocols").glob("*.py")
    offenders = [
        path.name
        for path in cores
        if any(word in path.read_text() for word in ("import asyncio", "import socket"))
    ]
    assert offenders == []

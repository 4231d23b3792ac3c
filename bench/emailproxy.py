"""The incumbent: `emailproxy` from PyPI, in its own virtualenv, run headless.

The venv lives in the user's cache (`~/.cache/mailwarden/bench/emailproxy-venv`) and is
reused; without network it can't be made, and the benchmark then reports the path as
skipped with pip's reason instead of failing.

emailproxy keeps its tokens in its configuration file (encrypted with the first login's
password), so it gets a writable copy; a cold restart writes a fresh one. It checks TLS
with Python's default context, both towards the servers and the token endpoint, so
`SSL_CERT_FILE` pointing at the local CA is how it trusts our upstreams.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from bench.proxies import HOST, ProxyProcess

VERSION = os.environ.get("MAILWARDEN_BENCH_EMAILPROXY_VERSION", "2026.7.3")
CACHE = Path(
    os.environ.get("MAILWARDEN_BENCH_CACHE", Path.home() / ".cache" / "mailwarden" / "bench")
)
VENV = CACHE / "emailproxy-venv"
PIP_TIMEOUT = 300


class EmailproxyUnavailable(Exception):
    """Why the emailproxy path can't run (recorded in the results, not raised to the user)."""


def _installed_version(python: Path) -> str | None:
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('emailproxy'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv() -> tuple[Path, str]:
    """The venv's `emailproxy` script and its version; installs it on first use."""
    python = VENV / "bin" / "python"
    if python.exists() and _installed_version(python) == VERSION:
        return VENV / "bin" / "emailproxy", VERSION
    try:
        if not python.exists():
            subprocess.run(
                [sys.executable, "-m", "venv", str(VENV)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"emailproxy=={VERSION}"],
            check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise EmailproxyUnavailable(
            f"pip install emailproxy=={VERSION} failed: {lines[-1] if lines else exc}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise EmailproxyUnavailable(
            f"pip install emailproxy=={VERSION} took over {PIP_TIMEOUT}s"
        ) from exc
    return VENV / "bin" / "emailproxy", VERSION


class EmailProxy(ProxyProcess):
    """`emailproxy --no-gui --config-file emailproxy.config` for the same upstreams."""

    script: Path = Path("emailproxy")

    def write_config(self) -> None:
        dovecot, smtpd = self.upstreams.dovecot, self.upstreams.smtpd
        creds = self.credentials
        text = textwrap.dedent(f"""\
            [IMAP-{self.imap_port}]
            server_address = {dovecot.host}
            server_port = {dovecot.imaps_port}
            local_address = {HOST}

            [SMTP-{self.smtp_port}]
            server_address = {HOST}
            server_port = {smtpd.port}
            server_starttls = True
            local_address = {HOST}

            [{self.upstreams_mailbox}]
            token_url = {creds.token_url}
            oauth2_scope = {creds.scope}
            oauth2_flow = client_credentials
            client_id = {creds.client_id}
            client_secret = {creds.client_secret}
            """)
        # a fresh file on every (re)start: a cold proxy holds no cached token
        (self.workdir / "emailproxy.config").write_text(text)

    @property
    def upstreams_mailbox(self) -> str:
        return self.endpoints().imap.username

    def command(self) -> list[str]:
        return [
            str(self.script), "--no-gui",
            "--config-file", str(self.workdir / "emailproxy.config"),
            "--log-file", str(self.workdir / "emailproxy.log"),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SSL_CERT_FILE"] = str(self.upstreams.ca.ca_path)
        env.pop("SSL_CERT_DIR", None)
        return env

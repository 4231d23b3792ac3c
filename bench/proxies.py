"""The two proxies as separate processes, so /proc shows their own CPU and memory.

Both are configured for the same upstreams and the same client-credentials app at the
local IdP, each with its own client registration (token requests can then be counted per
proxy). `restart()` gives a cold proxy: no token, no warm connections.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tests.fixtures.dovecot import free_ports, stop_process, tail, wait_for_ports

from bench.paths import Endpoint, PathEndpoints
from bench.procstat import cpu_seconds, raise_nofile, rss_bytes
from bench.servers import MAILBOX, TENANT, ClientCredentials, Upstreams

HOST = "127.0.0.1"
LOCAL_PASSWORD = "bench-local-password"


@dataclass
class ProxyProcess:
    """A proxy started from `command`; subclasses write its configuration."""

    name: str
    workdir: Path
    upstreams: Upstreams
    credentials: ClientCredentials
    imap_port: int = 0
    smtp_port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.imap_port, self.smtp_port = free_ports(2)
        self.log_path = self.workdir / "proxy.log"

    # -- what subclasses provide -------------------------------------------------------
    def write_config(self) -> None:
        raise NotImplementedError

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def start(self) -> None:
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self.workdir,
            # 1,000 idle sessions need ~2,000 descriptors; a CI runner's soft limit is 1,024
            preexec_fn=raise_nofile,  # noqa: PLW1509 - no threads touch the fork here
            start_new_session=True,
        )
        log.close()
        wait_for_ports([self.imap_port, self.smtp_port], self.process, self.log_path)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=5)
            self.process = None

    def restart(self) -> None:
        """A cold proxy: a new process with a fresh configuration (no cached token)."""
        self.stop()
        self.start()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self) -> str:
        return tail(self.log_path, 30)

    def endpoints(self) -> PathEndpoints:
        def plain(port: int) -> Endpoint:
            return Endpoint(HOST, port, MAILBOX, "none", password=LOCAL_PASSWORD)

        return PathEndpoints(imap=plain(self.imap_port), smtp=plain(self.smtp_port))


class MailwardenProxy(ProxyProcess):
    """`mailwarden-proxy --config proxy.yaml` with a native configuration."""

    def write_config(self) -> None:
        ca = str(self.upstreams.ca.ca_path)
        dovecot, smtpd = self.upstreams.dovecot, self.upstreams.smtpd
        config = {
            "version": 1,
            "listeners": [
                {
                    "protocol": "imap",
                    "local": {"address": HOST, "port": self.imap_port},
                    "upstream": {
                        "host": dovecot.host,
                        "port": dovecot.imaps_port,
                        "tls": "implicit",
                        "caFile": ca,
                    },
                },
                {
                    "protocol": "smtp",
                    "local": {"address": HOST, "port": self.smtp_port},
                    "upstream": {
                        "host": HOST,
                        "port": smtpd.port,
                        "tls": "starttls",
                        "caFile": ca,
                    },
                },
            ],
            "accounts": [
                {
                    "username": MAILBOX,
                    "localPassword": LOCAL_PASSWORD,
                    "oauth2": {
                        # what a Microsoft 365 app-only deployment looks like (msal)
                        "provider": "microsoft",
                        "flow": "clientCredentials",
                        "tenantId": TENANT,
                        "tokenUrl": self.credentials.token_url,
                        "clientId": self.credentials.client_id,
                        "clientSecret": self.credentials.client_secret,
                        "scopes": [self.credentials.scope],
                        "caFile": ca,
                    },
                }
            ],
            "metrics": {"port": 0},
        }
        (self.workdir / "proxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mailwarden_proxy.cli",
            "--config", str(self.workdir / "proxy.yaml"),
            "--watch-interval", "0", "--drain-seconds", "0",
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        # msal honours REQUESTS_CA_BUNDLE over its own CA file; the config's caFile rules
        env = {k: v for k, v in os.environ.items() if k != "REQUESTS_CA_BUNDLE"}
        repo = Path(__file__).resolve().parents[1]
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(repo / "proxy"), env.get("PYTHONPATH", "")) if p
        )
        return env

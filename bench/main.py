"""Start the upstreams and both proxies, run the scenarios, print and save the results."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import machine, report
from bench.clients.token import fetch_token
from bench.context import FULL, QUICK, Bench
from bench.emailproxy import EmailProxy, EmailproxyUnavailable, ensure_venv
from bench.paths import Endpoint, PathEndpoints, PathName
from bench.procstat import raise_nofile
from bench.proxies import HOST, MailwardenProxy, ProxyProcess
from bench.results import Figure
from bench.scenarios import burst, fetch, idle, login, smtp
from bench.servers import MAILBOX, Upstreams, start_upstreams
from bench.worker import Worker

# In this order: the cold burst restarts the proxies, so it goes last.
SCENARIOS: dict[str, Callable[[Bench], list[Figure]]] = {
    "fetch": fetch.run,
    "login": login.run,
    "smtp": smtp.run,
    "idle": idle.run,
    "burst": burst.run,
}
REPO = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="mailwarden against a direct XOAUTH2 client and against emailproxy, "
        "on loopback, interleaved; prints a table and writes JSON.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke, < 60 s)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--only", choices=sorted(SCENARIOS), action="append", help="run only this scenario"
    )
    return parser


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip() or "unknown"


def _direct(upstreams: Upstreams) -> tuple[PathEndpoints, Any]:
    """The direct client's endpoints, with one token fetched now and reused ("cached")."""
    credentials = upstreams.register_app("direct")
    ca = str(upstreams.ca.ca_path)
    token = fetch_token(credentials, ca)
    dovecot, smtpd = upstreams.dovecot, upstreams.smtpd
    return (
        PathEndpoints(
            imap=Endpoint(dovecot.host, dovecot.imaps_port, MAILBOX, "implicit", ca, token=token),
            smtp=Endpoint(HOST, smtpd.port, MAILBOX, "starttls", ca, token=token),
        ),
        credentials,
    )


def _start_emailproxy(upstreams: Upstreams, workdir: Path) -> tuple[EmailProxy | None, str]:
    """The running incumbent and its version, or None and why not."""
    try:
        script, version = ensure_venv()
    except EmailproxyUnavailable as exc:
        return None, str(exc)
    proxy = EmailProxy("emailproxy", workdir, upstreams, upstreams.register_app("emailproxy"))
    proxy.script = script
    try:
        proxy.start()
    except RuntimeError as exc:
        return None, f"emailproxy {version} did not start: {str(exc)[:300]}"
    return proxy, version


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = QUICK if args.quick else FULL
    selected = args.only or list(SCENARIOS)
    nofile = raise_nofile()
    # aiosmtpd logs a deprecation warning on every AUTH about an API the demo server uses
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    command = " ".join(["python", "bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "commit": _commit(),
        "profile": asdict(profile),
        "machine": machine.describe(),
        "open_files_limit": nofile,
    }
    figures: list[Figure] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="mailwarden-bench-") as tmp,
        start_upstreams(Path(tmp)) as upstreams,
        Worker() as worker,
    ):
        workdir = Path(tmp)
        direct, direct_credentials = _direct(upstreams)
        proxies: dict[PathName, ProxyProcess] = {}
        endpoints = {PathName.DIRECT: direct}
        skipped: dict[PathName, str] = {}
        mailwarden = MailwardenProxy(
            "mailwarden", workdir / "mailwarden", upstreams, upstreams.register_app("mailwarden")
        )
        mailwarden.start()
        proxies[PathName.MAILWARDEN] = mailwarden
        endpoints[PathName.MAILWARDEN] = mailwarden.endpoints()
        emailproxy, version_or_reason = _start_emailproxy(upstreams, workdir / "emailproxy")
        if emailproxy is None:
            skipped[PathName.EMAILPROXY] = version_or_reason
            meta["emailproxy"] = {"skipped": version_or_reason}
        else:
            proxies[PathName.EMAILPROXY] = emailproxy
            endpoints[PathName.EMAILPROXY] = emailproxy.endpoints()
            meta["emailproxy"] = {"version": version_or_reason}
        bench = Bench(profile, upstreams, worker, endpoints, proxies, direct_credentials, skipped)
        bench.log(f"profile {profile.name}; paths: {', '.join(bench.paths())}")
        for name, reason in skipped.items():
            bench.log(f"{name} SKIPPED: {reason}")
        try:
            for name in selected:
                figures.extend(SCENARIOS[name](bench))
        finally:
            for proxy in proxies.values():
                proxy.stop()
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["load_average_at_end"] = os.getloadavg()
    print()
    print(report.table(figures))
    for line in report.notes(figures):
        print(f"  * {line}")
    print(f"\n{meta['seconds']} s; load average at end {meta['load_average_at_end']}")
    if args.json is not None:
        report.write_json(args.json, meta, figures)
        print(f"wrote {args.json}")
    return 0

"""Soak: mailwarden under steady mixed load for a bounded time; are RSS and fds flat?

    python bench/soak.py                        # 600 s (~11 minutes with set-up)
    python bench/soak.py --seconds 30           # or --quick: the CI smoke version
    python bench/soak.py --json soak.json --interval 5

The same upstreams as `bench/run.py` (local IdP, Dovecot, aiosmtpd; bench/servers.py) and
`mailwarden-proxy` as its own process (bench/proxies.py), but with a delegated account: a
refresh token from the IdP, which issues access tokens for `--token-lifetime` seconds
(default 90, so the proxy's proactive refresh, 30 s before expiry, runs every minute) and
rotates the refresh token each time. Client threads, all through the proxy:

- `--idle` IMAP sessions (default 10): LOGIN, SELECT, then cycles of IDLE (held 5-30 s),
  DONE and a FETCH of flags and one message; LOGOUT after 1-4 cycles, and again;
- `--churn` threads (default 2): connect, LOGIN, SELECT, FETCH one message, LOGOUT, every
  0.5 s — connections opening and closing all the time;
- `--smtp` threads (default 1): connect, AUTH, 1-3 messages of 5 KB, QUIT, every second.

Every `--interval` seconds it samples the proxy's RSS, open file descriptors and threads
(/proc/<pid>/status and /proc/<pid>/fd) and CPU time. The baseline is taken after one
warm-up login per protocol, with no client connected; after the load, the fds are
sampled again once every client has closed (waiting up to 30 s for the count to settle).
The verdict: RSS flat if the mean of the last third of the samples is within 10 % of the
first third's; fds back to the baseline. It prints a table and the verdict, and writes
every sample with `--json`. Exit status 0 when the run completed (whatever the verdict),
1 when it could not run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import shutil
import smtplib
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

# Run as a script from anywhere, like bench/run.py.
_REPO = Path(__file__).resolve().parents[1]
for _entry in (str(_REPO / "proxy"), str(_REPO)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

from tests.fixtures.dovecot import free_ports  # noqa: E402

from bench import machine  # noqa: E402
from bench.clients.imap import ImapClient, ImapError  # noqa: E402
from bench.clients.smtp import RECIPIENT, message  # noqa: E402
from bench.paths import Endpoint  # noqa: E402
from bench.procstat import cpu_seconds, raise_nofile, rss_bytes, thread_count  # noqa: E402
from bench.proxies import HOST, LOCAL_PASSWORD, MailwardenProxy  # noqa: E402
from bench.servers import MAILBOX, Upstreams, seed_mailbox, start_upstreams  # noqa: E402
from mailwarden_proxy.demo.idp_grants import SECRET_MARKER  # noqa: E402

RSS_TOLERANCE = 0.10  # last third vs first third
SETTLE_SECONDS = 30.0
DELEGATED_SCOPES = [
    "https://outlook.office365.com/IMAP.AccessAsUser.All",
    "https://outlook.office365.com/SMTP.Send",
    "offline_access",
]


@dataclass(frozen=True)
class Profile:
    seconds: float
    interval: float
    idle: int
    churn: int
    smtp: int
    token_lifetime: int
    idle_hold: tuple[float, float]  # seconds an IDLE is held, min..max


def _profile(args: argparse.Namespace) -> Profile:
    quick = args.quick
    return Profile(
        seconds=args.seconds if args.seconds is not None else (30 if quick else 600),
        interval=args.interval if args.interval is not None else (2 if quick else 5),
        idle=args.idle if args.idle is not None else (4 if quick else 10),
        churn=args.churn if args.churn is not None else (1 if quick else 2),
        smtp=args.smtp if args.smtp is not None else 1,
        token_lifetime=args.token_lifetime or (10 if quick else 90),
        idle_hold=(1.0, 4.0) if quick else (5.0, 30.0),
    )


# ----------------------------------------------------------------------------- the proxy


class SoakProxy(MailwardenProxy):
    """The benchmark's mailwarden process, with a delegated (refresh-token) account and
    /metrics on, so the soak exercises refresh-token rotation and can read the counters."""

    metrics_port = 0

    def write_config(self) -> None:
        super().write_config()
        path = self.workdir / "proxy.yaml"
        config = yaml.safe_load(path.read_text())
        oauth2 = config["accounts"][0]["oauth2"]
        refresh = self.upstreams.idp.issue_refresh_token(
            MAILBOX, oauth2["clientId"], " ".join(DELEGATED_SCOPES)
        )
        oauth2.update(flow="refreshToken", refreshToken=refresh, scopes=DELEGATED_SCOPES)
        if not self.metrics_port:
            [self.metrics_port] = free_ports(1)
        config["metrics"] = {"address": HOST, "port": self.metrics_port}
        path.write_text(yaml.safe_dump(config, sort_keys=False))

    def metrics(self) -> dict[str, float]:
        """`name{labels}` -> value, from the proxy's /metrics."""
        text = requests.get(f"http://{HOST}:{self.metrics_port}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---------------------------------------------------------------------------- the load


@dataclass
class Load:
    imap: Endpoint
    smtp: Endpoint
    profile: Profile
    stop: threading.Event = field(default_factory=threading.Event)
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    last_error: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def count(self, op: str) -> None:
        with self.lock:
            self.ops[op] += 1

    def failed(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[kind] += 1
            self.last_error[kind] = f"{type(exc).__name__}: {exc}"[:300]

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.ops)

    # -- the client loops

    def _login(self) -> ImapClient:
        client = ImapClient(self.imap, timeout=60)
        client.login()
        self.count("imap_logins")
        reply, _ = client.command("SELECT INBOX")
        if b" OK" not in reply[:16]:
            raise ImapError(f"SELECT: {reply[:100]!r}")
        return client

    def _fetch(self, client: ImapClient) -> None:
        reply, _ = client.command("FETCH 1:* (FLAGS)")
        number = random.randint(1, 20)
        reply2, size = client.command(f"FETCH {number} (BODY.PEEK[])")
        if b" OK" not in reply[:16] or b" OK" not in reply2[:16] or size < 1000:
            raise ImapError(f"FETCH: {reply[:80]!r} / {reply2[:80]!r}")
        self.count("imap_fetches")

    def _idle(self, client: ImapClient, seconds: float) -> None:
        client._tags += 1
        tag = f"b{client._tags}".encode()
        client.sock.sendall(tag + b" IDLE\r\n")
        line = client._readline()
        if not line.startswith(b"+"):
            raise ImapError(f"IDLE: {line[:100]!r}")
        self.stop.wait(seconds)
        client.sock.sendall(b"DONE\r\n")
        reply, _ = client._until_tagged(tag)
        if b" OK" not in reply[:16]:
            raise ImapError(f"IDLE end: {reply[:100]!r}")
        self.count("idle_cycles")

    def idle_session(self) -> None:
        low, high = self.profile.idle_hold
        while not self.stop.is_set():
            try:
                client = self._login()
                try:
                    for _ in range(random.randint(1, 4)):
                        if self.stop.is_set():
                            break
                        self._idle(client, random.uniform(low, high))
                        self._fetch(client)
                    client.command("LOGOUT")
                finally:
                    client.close()
            except (OSError, ImapError) as exc:
                self.failed("imap_idle", exc)
                self.stop.wait(1)

    def churn(self) -> None:
        while not self.stop.is_set():
            try:
                client = self._login()
                try:
                    self._fetch(client)
                    client.command("LOGOUT")
                finally:
                    client.close()
            except (OSError, ImapError) as exc:
                self.failed("imap_churn", exc)
            self.stop.wait(0.5)

    def smtp_sender(self) -> None:
        content = message(5_000)
        while not self.stop.is_set():
            try:
                with smtplib.SMTP(self.smtp.host, self.smtp.port, timeout=60) as client:
                    client.login(self.smtp.username, self.smtp.password or "")
                    self.count("smtp_logins")
                    for _ in range(random.randint(1, 3)):
                        client.sendmail(self.smtp.username, [RECIPIENT], content)
                        self.count("smtp_messages")
            except (OSError, smtplib.SMTPException) as exc:
                self.failed("smtp", exc)
            self.stop.wait(1.0)

    def start(self) -> None:
        targets = (
            [self.idle_session] * self.profile.idle
            + [self.churn] * self.profile.churn
            + [self.smtp_sender] * self.profile.smtp
        )
        for index, target in enumerate(targets):
            name = f"soak-{target.__name__}-{index}"
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self, timeout: float = 90) -> int:
        """Stop the clients; returns how many threads did not end in time."""
        self.stop.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return sum(thread.is_alive() for thread in self.threads)


# ---------------------------------------------------------------------------- sampling


def sample(
    proxy: SoakProxy, started: float, load: Load | None, upstreams: Upstreams
) -> dict[str, Any]:
    pid = proxy.pid
    return {
        "t": round(time.monotonic() - started, 1),
        "rss_mb": round(rss_bytes(pid) / 1e6, 2),
        "fds": open_fds(pid),
        "threads": thread_count(pid),
        "cpu_s": round(cpu_seconds(pid), 2),
        "token_requests": upstreams.idp.request_count("refresh_token"),
        "ops": load.snapshot() if load is not None else {},
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def verdict(
    samples: list[dict[str, Any]], baseline: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    rss = [s["rss_mb"] for s in samples]
    third = max(1, len(rss) // 3)
    first, last = _mean(rss[:third]), _mean(rss[-third:])
    growth = (last - first) / first if first else 0.0
    return {
        "rss_first_third_mb": round(first, 2),
        "rss_last_third_mb": round(last, 2),
        "rss_growth": round(growth, 4),
        "rss_flat": growth <= RSS_TOLERANCE,
        "fds_baseline": baseline["fds"],
        "fds_after": after["fds"],
        "fds_back_to_baseline": after["fds"] <= baseline["fds"],
    }


def table(samples: list[dict[str, Any]], rows: int = 24) -> str:
    step = max(1, len(samples) // rows)
    shown = samples[::step]
    if samples and shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    lines = [
        f"{'t (s)':>7} {'RSS MB':>8} {'fds':>5} {'thr':>4} {'CPU s':>7} {'tokens':>6} "
        f"{'logins':>7} {'fetches':>7} {'idles':>6} {'mails':>6}"
    ]
    for s in shown:
        ops = s["ops"]
        lines.append(
            f"{s['t']:>7.0f} {s['rss_mb']:>8.1f} {s['fds']:>5} {s['threads']:>4} "
            f"{s['cpu_s']:>7.1f} {s['token_requests']:>6} "
            f"{ops.get('imap_logins', 0) + ops.get('smtp_logins', 0):>7} "
            f"{ops.get('imap_fetches', 0):>7} {ops.get('idle_cycles', 0):>6} "
            f"{ops.get('smtp_messages', 0):>6}"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python bench/soak.py",
        description="mailwarden-proxy under steady IMAP IDLE/FETCH, connection churn, SMTP "
        "and token refreshes; samples RSS and fds; prints a table and a verdict.",
    )
    parser.add_argument("--seconds", type=float, default=None, help="load duration (600)")
    parser.add_argument("--quick", action="store_true", help="30 s, small load (CI smoke)")
    parser.add_argument("--interval", type=float, default=None, help="sampling period (5 s)")
    parser.add_argument("--idle", type=int, default=None, help="IMAP IDLE sessions (10)")
    parser.add_argument("--churn", type=int, default=None, help="connect/fetch/logout loops (2)")
    parser.add_argument("--smtp", type=int, default=None, help="SMTP sender loops (1)")
    parser.add_argument(
        "--token-lifetime", type=int, default=None, help="access-token lifetime at the IdP (90 s)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every sample here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = _profile(args)
    raise_nofile()
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's deprecation noise
    command = " ".join(["python", "bench/soak.py", *(sys.argv[1:] if argv is None else argv)])
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "profile": profile.__dict__ | {"idle_hold": list(profile.idle_hold)},
        "machine": machine.describe(),
        "load_average_at_start": os.getloadavg(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="mailwarden-soak-"))
    samples: list[dict[str, Any]] = []
    try:
        with start_upstreams(workdir) as upstreams:
            upstreams.idp.token_lifetime = profile.token_lifetime
            seed_mailbox(upstreams.dovecot, 20, 20_000)
            proxy = SoakProxy("mailwarden", workdir / "mailwarden", upstreams,
                              upstreams.register_app("soak"))  # fmt: skip
            proxy.start()
            try:
                endpoints = proxy.endpoints()
                load = Load(endpoints.imap, endpoints.smtp, profile)
                # warm-up: first token, imports, the SMTP pool; then the baseline, idle
                client = load._login()
                load._fetch(client)
                client.command("LOGOUT")
                client.close()
                with smtplib.SMTP(HOST, proxy.smtp_port, timeout=60) as smtp:
                    smtp.login(MAILBOX, LOCAL_PASSWORD)
                    smtp.sendmail(MAILBOX, [RECIPIENT], message(5_000))
                time.sleep(2)
                started = time.monotonic()
                baseline = sample(proxy, started, None, upstreams)
                tokens_before = baseline["token_requests"]
                print(f"baseline: RSS {baseline['rss_mb']:.1f} MB, {baseline['fds']} fds, "
                      f"{baseline['threads']} threads; load for {profile.seconds:.0f} s",
                      flush=True)  # fmt: skip
                load.start()
                deadline = started + profile.seconds
                next_sample = started + profile.interval
                while time.monotonic() < deadline:
                    time.sleep(max(0.0, min(next_sample, deadline) - time.monotonic()))
                    if time.monotonic() >= next_sample:
                        samples.append(sample(proxy, started, load, upstreams))
                        next_sample += profile.interval
                        last = samples[-1]
                        print(f"  t={last['t']:>5.0f}s RSS {last['rss_mb']:.1f} MB "
                              f"fds {last['fds']} tokens {last['token_requests']}",
                              flush=True)  # fmt: skip
                stuck = load.finish()
                settle_deadline = time.monotonic() + SETTLE_SECONDS
                after = sample(proxy, started, load, upstreams)
                while after["fds"] > baseline["fds"] and time.monotonic() < settle_deadline:
                    time.sleep(0.5)
                    after = sample(proxy, started, load, upstreams)
                metrics = proxy.metrics()
            finally:
                proxy.stop()
            log_text = proxy.log_path.read_text(errors="replace")
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if not samples:
        print("no samples taken (--seconds shorter than --interval?)", file=sys.stderr)
        return 1
    result = verdict(samples, baseline, after)
    rss = [s["rss_mb"] for s in samples]
    fds = [s["fds"] for s in samples]
    summary = {
        "rss_mb": {"baseline": baseline["rss_mb"], "start": rss[0], "end": rss[-1],
                   "max": max(rss), "after": after["rss_mb"]},
        "fds": {"baseline": baseline["fds"], "start": fds[0], "end": fds[-1], "max": max(fds),
                "after": after["fds"]},
        "operations": after["ops"],
        "errors": dict(load.errors),
        "last_errors": load.last_error,
        "token_refreshes": after["token_requests"] - tokens_before,
        "client_threads_not_stopped": stuck,
        "proxy_cpu_seconds": round(after["cpu_s"] - baseline["cpu_s"], 2),
        "proxy_log": {
            "lines": len(log_text.splitlines()),
            "errors": sum(" ERROR " in line for line in log_text.splitlines()),
            "tracebacks": log_text.count("Traceback"),
            "secret_markers": log_text.count(SECRET_MARKER),
        },
        "proxy_metrics": {
            k: v for k, v in metrics.items()
            if k.startswith(("mailwarden_active_connections", "mailwarden_logins_total",
                             "mailwarden_token_requests_total", "mailwarden_connections_total"))
        },
    }  # fmt: skip
    meta["load_average_at_end"] = os.getloadavg()
    print()
    print(table(samples))
    ops = summary["operations"]
    print(
        f"\nRSS MB: baseline {baseline['rss_mb']:.1f}, start {rss[0]:.1f}, end {rss[-1]:.1f}, "
        f"max {max(rss):.1f}; first third {result['rss_first_third_mb']:.1f} -> last third "
        f"{result['rss_last_third_mb']:.1f} ({result['rss_growth']:+.1%})"
    )
    print(
        f"fds: baseline {baseline['fds']}, start {fds[0]}, end {fds[-1]}, max {max(fds)}, "
        f"after the load {after['fds']}"
    )
    print(
        f"operations: {ops.get('imap_logins', 0)} IMAP logins, {ops.get('imap_fetches', 0)} "
        f"FETCH rounds, {ops.get('idle_cycles', 0)} IDLE cycles, {ops.get('smtp_logins', 0)} "
        f"SMTP logins, {ops.get('smtp_messages', 0)} messages; "
        f"{summary['token_refreshes']} token refreshes; errors {dict(load.errors) or 'none'}"
    )
    print(
        f"verdict: RSS {'flat' if result['rss_flat'] else 'GROWING'} "
        f"(≤ {RSS_TOLERANCE:.0%} allowed), fds "
        f"{'back to baseline' if result['fds_back_to_baseline'] else 'NOT back to baseline'}"
    )
    print(f"load average at end {meta['load_average_at_end']}")
    if args.json is not None:
        document = {"meta": meta, "summary": summary, "verdict": result, "baseline": baseline,
                    "after": after, "samples": samples}  # fmt: skip
        args.json.write_text(json.dumps(document, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

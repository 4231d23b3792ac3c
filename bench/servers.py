"""The upstreams every path talks to: a test CA, the local IdP, Dovecot and aiosmtpd.

Reuses the test fixtures' code (`tests.fixtures.dovecot.start_dovecot`, the demo IdP,
submission server and CA) rather than copies, so the benchmark measures the same servers
the integration tests prove correct. The one difference is Dovecot's connection limits
(see `_bench_limits`): the fixture allows exactly 1,000 connections per user and
address, and the idle-sessions figure holds 1,000 through one proxy address.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import quote

from tests.fixtures import dovecot as dovecot_fixture
from tests.fixtures.dovecot import DovecotServer

from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA

MAILBOX = "bench@example.test"
TENANT = "bench-tenant"
SCOPE = "https://outlook.office365.com/.default"

# Fixture value -> benchmark value. Each must be found, or the fixture changed under us
# and the override would silently not apply.
_LIMITS = {
    "mail_max_userip_connections = 1000": "mail_max_userip_connections = 5000",
    "default_client_limit = 4000": "default_client_limit = 12000",
    "default_process_limit = 500": "default_process_limit = 5000",
    "  process_limit = 1000\n": "  process_limit = 5000\n",
    "  client_limit = 1000\n": "  client_limit = 5000\n",
}


def _bench_limits(render: Callable[..., str]) -> Callable[..., str]:
    def rendered(*args: object, **kwargs: object) -> str:
        _introspect_for_mailbox(kwargs["oauth2_args"])  # type: ignore[arg-type]
        text = render(*args, **kwargs)
        for old, new in _LIMITS.items():
            if old not in text:
                raise RuntimeError(f"Dovecot fixture config no longer contains {old.strip()!r}")
            text = text.replace(old, new)
        return text

    return rendered


def _introspect_for_mailbox(oauth2_args: Path) -> None:
    """Point Dovecot's oauth2 passdb at `<introspection_url>/<MAILBOX>`.

    An app-only token names no user, so the fixture's oauth2 passdb can't match it and
    falls through to a checkpassword script: a Python process per login (~60 ms, with
    +-10 ms of jitter that would drown a 1 ms proxy overhead). The benchmark has one
    mailbox, so the IdP can be asked about that user directly (the URL form the
    checkpassword script uses); every path presents the same kind of token, so all three
    get the same, cheaper upstream login (one HTTPS introspection on a kept-alive
    connection)."""
    text = oauth2_args.read_text()
    lines = [
        f"{line}/{quote(MAILBOX, safe='@')}" if line.startswith("introspection_url = ") else line
        for line in text.splitlines()
    ]
    if lines == text.splitlines():
        raise RuntimeError(f"no introspection_url in {oauth2_args}")
    oauth2_args.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class ClientCredentials:
    """An app registration at the IdP: what each path uses to get its token."""

    token_url: str
    client_id: str
    client_secret: str
    scope: str = SCOPE


@dataclass
class Upstreams:
    ca: LocalCA
    idp: LocalIdP
    dovecot: DovecotServer
    smtpd: LocalSubmissionServer
    workdir: Path

    def register_app(self, name: str) -> ClientCredentials:
        """A fresh client registration, so each path's token requests can be told apart."""
        secret = secrets.token_urlsafe(24)
        client_id = f"bench-{name}-{secrets.token_hex(3)}"
        self.idp.register_client(client_id, secret)
        return ClientCredentials(self.idp.token_url(TENANT), client_id, secret)

    def token_requests(self) -> int:
        return self.idp.request_count("client_credentials")


def seed_mailbox(dovecot: DovecotServer, count: int, size: int) -> int:
    """Deliver `count` messages of about `size` bytes once; returns the bytes stored.

    Bodies are base64-like lines of random characters: incompressible, and no line can
    look like an IMAP tagged reply."""
    existing = dovecot.messages(MAILBOX)
    if len(existing) == count:
        return sum(len(m) for m in existing)
    dovecot.reset_mail()
    total = 0
    for index in range(count):
        header = (
            f"From: sender@example.test\r\nTo: {MAILBOX}\r\n"
            f"Subject: bench message {index}\r\nMessage-ID: <bench-{index}@example.test>\r\n\r\n"
        ).encode()
        lines = []
        remaining = size - len(header)
        while remaining > 0:
            line = secrets.token_urlsafe(57)[:76].encode() + b"\r\n"
            lines.append(line)
            remaining -= len(line)
        message = header + b"".join(lines)
        dovecot.deliver(MAILBOX, message)
        total += len(message)
    return total


@contextlib.contextmanager
def start_upstreams(workdir: Path) -> Iterator[Upstreams]:
    """CA, IdP, Dovecot (with the benchmark's limits) and a STARTTLS submission server."""
    ca = LocalCA(workdir / "ca")
    with LocalIdP(ca.issue("idp"), ca.ca_path, token_lifetime=3600) as idp:
        dovecot_dir = dovecot_fixture.private_directory("mailwarden-bench-dovecot-")
        patched = _bench_limits(dovecot_fixture.render_config)
        with mock.patch.object(dovecot_fixture, "render_config", patched):
            dovecot = dovecot_fixture.start_dovecot(dovecot_dir, ca, idp)
        try:
            smtpd = LocalSubmissionServer(idp.is_valid, tls="starttls", cert=ca.issue("smtpd"))
            with smtpd:
                yield Upstreams(ca, idp, dovecot, smtpd, workdir)
        finally:
            dovecot_fixture.stop_process(dovecot.process)
            shutil.rmtree(dovecot_dir, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True

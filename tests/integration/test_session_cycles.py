"""A finished session leaves no reference cycles: refcounting frees it at once.

A session's objects in a cycle (transport <-> protocol, splice end <-> splice end,
session <-> its reading protocol) wait for the cyclic GC's next full collection, and
with them each TLS connection's OpenSSL state and uvloop's 256 KiB read buffer: under
steady load that held tens of dead connections at a time and made the soak's RSS climb
(bench/README.md, Soak). With the garbage collector switched off, sessions of every
kind run to their end and a collection must then find none of the proxy's objects.
"""

from __future__ import annotations

import collections
import gc
import imaplib
import poplib
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailwarden_proxy.config.model import Listener, MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.dovecot import DovecotServer
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

pytestmark = pytest.mark.dovecot

USER = "cycles@example.com"
WRONG_PASSWORD = LOCAL_PASSWORD + "-wrong"
# what a session is made of, on the proxy's side (uvloop's own classes: its transports
# and TLS protocol; the submission server in this process runs on asyncio's)
OURS = {"ProxySession", "SplicedSession", "SpliceEnd", "_Feed", "_WarmProtocol", "WarmUpstream"}


def _imap(port: int, password: str) -> None:
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        try:
            client.login(USER, password)
        except imaplib.IMAP4.error:
            return
        client.select("INBOX")
        client.fetch("1", "(FLAGS)")
        client.logout()


def _pop3(port: int, password: str) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(USER)
        client.pass_(password)
        client.stat()
    except poplib.error_proto:
        pass
    finally:
        client.quit()


def _smtp(port: int, password: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        try:
            client.login(USER, password)
        except smtplib.SMTPAuthenticationError:
            return
        client.sendmail(USER, ["rcpt@example.org"], b"Subject: cycles\r\n\r\nhi\r\n")


def _gone_before_login(port: int, password: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(100)  # the greeting; then the client just leaves


CLIENTS: dict[str, Callable[[int, str], None]] = {
    "imap": _imap,
    "pop3": _pop3,
    "smtp": _smtp,
}


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _listener(
    protocol: str, tls: UpstreamTLS, dovecot: DovecotServer, submission: Any, ca: LocalCA
) -> Listener:
    if protocol == "smtp":
        return listener("L", MailProtocol.SMTP, submission.port, tls, ca.ca_path)
    port = {
        ("imap", UpstreamTLS.IMPLICIT): dovecot.imaps_port,
        ("imap", UpstreamTLS.STARTTLS): dovecot.imap_port,
        ("pop3", UpstreamTLS.IMPLICIT): dovecot.pop3s_port,
        ("pop3", UpstreamTLS.STARTTLS): dovecot.pop3_port,
    }[(protocol, tls)]
    return listener("L", MailProtocol(protocol), port, tls, dovecot.ca_path, host=dovecot.host)


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
def test_finished_sessions_leave_no_cycles(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    make_submission_server: Any,
    local_ca: LocalCA,
    gc_off: None,
    protocol: str,
    tls: UpstreamTLS,
) -> None:
    dovecot.deliver(USER, b"Subject: one\r\n\r\nfor FETCH and STAT\r\n")
    submission = None
    if protocol == "smtp":
        submission = make_submission_server(
            "implicit" if tls is UpstreamTLS.IMPLICIT else "starttls"
        )
    lst = _listener(protocol, tls, dovecot, submission, local_ca)
    proxy = run_proxy(config([lst], [app_account(idp, USER)]))
    port = proxy.port("L")
    client = CLIENTS[protocol]
    # spliced sessions, refused logins, clients gone before login; for SMTP also the
    # warm pooled connections (the first session fills the pool, the others take one)
    for _ in range(3):
        client(port, LOCAL_PASSWORD)
        client(port, WRONG_PASSWORD)
        _gone_before_login(port, LOCAL_PASSWORD)
    ok = {"listener": "L", "protocol": protocol, "result": "ok"}
    assert proxy.metric("mailwarden_logins_total", **ok) == 3
    active = {"listener": "L", "protocol": protocol}
    deadline = time.monotonic() + 10
    while proxy.metric("mailwarden_active_connections", **active) > 0:
        assert time.monotonic() < deadline, "sessions did not end"
        time.sleep(0.05)
    time.sleep(0.2)  # the last connection_lost callbacks

    async def collect() -> collections.Counter[str]:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            garbage = list(gc.garbage)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
        return collections.Counter(
            type(o).__qualname__
            for o in garbage
            if type(o).__qualname__ in OURS or type(o).__module__ == "uvloop.loop"
        )

    assert proxy.call(collect()) == collections.Counter()

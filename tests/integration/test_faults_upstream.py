"""Fault injection on the upstream side: broken TLS, bad certificates, connections cut.

Every proxy here reaches its upstream through a `CutRelay` (tests/fixtures/faulty.py), so
a test can first point the relay at a misbehaving server, or cut a live connection, and
then point it at the real one (Dovecot, the aiosmtpd submission server) and show that
the *same* proxy serves a fresh session: recovery without a restart.

What the client must see (RFC 5321 §3.8 / §4.2.5, RFC 9051 §7.1.5 and [UNAVAILABLE],
RFC 2449/3206 [SYS/TEMP]):

- upstream unusable before login: SMTP `421` as greeting, IMAP `* BYE [UNAVAILABLE]`,
  POP3 `-ERR [SYS/TEMP]`, then the connection closes;
- upstream gone after login: the connection ends (nothing else can be said in the
  middle of a FETCH literal or a DATA body) and, for SMTP, never a `250` for a message
  the upstream didn't accept.

Certificates the proxy can't verify are refused before a byte of the login is sent: no
token is even fetched, and the log names the host and the verification failure.
"""

from __future__ import annotations

import imaplib
import logging
import poplib
import smtplib
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailwarden_proxy.config.model import Limits, MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.faulty import CutRelay, FaultyServer
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

pytestmark = pytest.mark.dovecot

USER = "faults@example.com"
PROTOCOLS = [MailProtocol.SMTP, MailProtocol.IMAP, MailProtocol.POP3]
# the first reply a client gets when the upstream is unusable before login
TEMPORARY_GREETING = {
    MailProtocol.SMTP: b"421 4.",
    MailProtocol.IMAP: b"* BYE [UNAVAILABLE]",
    MailProtocol.POP3: b"-ERR [SYS/TEMP]",
}


class Upstreams:
    """The real servers a relay can be pointed at, per protocol and TLS mode."""

    def __init__(self, dovecot: DovecotServer, make_submission_server: Any) -> None:
        self.dovecot = dovecot
        self._make_submission = make_submission_server
        self.submission: dict[UpstreamTLS, LocalSubmissionServer] = {}

    def address(self, protocol: MailProtocol, tls: UpstreamTLS) -> tuple[str, int]:
        implicit = tls is UpstreamTLS.IMPLICIT
        if protocol is MailProtocol.SMTP:
            if tls not in self.submission:
                mode = "implicit" if implicit else "starttls"
                self.submission[tls] = self._make_submission(mode)
            return "127.0.0.1", self.submission[tls].port
        d = self.dovecot
        if protocol is MailProtocol.IMAP:
            return d.host, d.imaps_port if implicit else d.imap_port
        return d.host, d.pop3s_port if implicit else d.pop3_port


@pytest.fixture
def upstreams(dovecot: DovecotServer, make_submission_server: Any) -> Upstreams:
    dovecot.reset_mail()
    return Upstreams(dovecot, make_submission_server)


def _proxy(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    relay: CutRelay,
    protocol: MailProtocol,
    tls: UpstreamTLS,
    limits: Limits | None = None,
) -> Any:
    lst = listener("faulty", protocol, relay.port, tls, local_ca.ca_path)
    return run_proxy(config([lst], [app_account(idp, USER)], limits=limits))


def _until_closed(port: int, timeout: float = 20) -> bytes:
    """Everything the proxy says to a client that says nothing, until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def _good_session(protocol: MailProtocol, port: int) -> None:
    """A complete, successful session through the proxy."""
    if protocol is MailProtocol.SMTP:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as smtp:
            smtp.login(USER, LOCAL_PASSWORD)
            refused = smtp.sendmail(USER, ["rcpt@example.org"], b"Subject: ok\r\n\r\nfine\r\n")
            assert refused == {}
    elif protocol is MailProtocol.IMAP:
        with imaplib.IMAP4("127.0.0.1", port, timeout=15) as imap:
            imap.login(USER, LOCAL_PASSWORD)
            assert imap.select("INBOX")[0] == "OK"
            imap.logout()
    else:
        pop = poplib.POP3("127.0.0.1", port, timeout=15)
        try:
            pop.user(USER)
            pop.pass_(LOCAL_PASSWORD)
            assert pop.stat()[0] >= 0
        finally:
            pop.quit()


def _eventually(check: Callable[[], Any], timeout: float = 15) -> Any:
    """`check()`'s result once it stops raising (a dropped upstream connection or a
    cached error can take a moment to clear); its last exception after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (OSError, EOFError, smtplib.SMTPException, imaplib.IMAP4.error,
                poplib.error_proto, AssertionError):  # fmt: skip
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _recovers(
    proxy: Any, relay: CutRelay, protocol: MailProtocol, tls: UpstreamTLS, upstreams: Upstreams
) -> None:
    """The upstream is healthy again: the very next session through the same proxy works
    (the proxy keeps no memory of the failure), and no session is left behind. For SMTP
    that includes a warm pooled connection that went down with the others: the session
    it was handed to continues on a new one (test_proxy_pool.py)."""
    relay.target = upstreams.address(protocol, tls)
    _good_session(protocol, proxy.port("faulty"))
    active = {"listener": "faulty", "protocol": protocol.value}
    _eventually(lambda: _assert_equal(proxy.metric("mailwarden_active_connections", **active), 0))


def _deliver_big(dovecot: DovecotServer, lines: int) -> bytes:
    """A message of `lines` numbered 80-byte lines in USER's INBOX; returns it."""
    body = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(lines))
    message = b"From: a@example.com\r\nTo: %s\r\nSubject: big\r\n\r\n" % USER.encode() + body
    dovecot.deliver(USER, message)
    return message


def _assert_equal(a: object, b: object) -> None:
    assert a == b


# -- the TLS handshake --------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
@pytest.mark.parametrize("action", ["close", "garbage"])
def test_upstream_breaks_the_tls_handshake(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    upstreams: Upstreams,
    faulty_server: Any,
    cut_relay: Any,
    protocol: MailProtocol,
    tls: UpstreamTLS,
    action: str,
) -> None:
    """The upstream accepts TCP (and, for STARTTLS, says go ahead) and then closes or
    answers the ClientHello with garbage: a temporary failure, then recovery."""
    prelude = None if tls is UpstreamTLS.IMPLICIT else protocol.value
    bad: FaultyServer = faulty_server(action, prelude=prelude)
    relay = cut_relay("127.0.0.1", bad.port)
    proxy = _proxy(run_proxy, idp, local_ca, relay, protocol, tls)

    said = _until_closed(proxy.port("faulty"))
    assert said.startswith(TEMPORARY_GREETING[protocol]), said
    assert bad.connections >= 1
    assert idp.request_count() == 0  # nobody logged in: no token was even fetched
    # counted as "connect" when the peer closed before any TLS record, "tls" otherwise
    errors = [
        proxy.metric("mailwarden_upstream_errors_total", listener="faulty", kind=kind)
        for kind in ("connect", "tls")
    ]
    assert sum(errors) >= 1
    _recovers(proxy, relay, protocol, tls, upstreams)


@pytest.mark.parametrize(
    ("protocol", "tls"),
    [
        (MailProtocol.SMTP, UpstreamTLS.IMPLICIT),
        (MailProtocol.SMTP, UpstreamTLS.STARTTLS),
        (MailProtocol.IMAP, UpstreamTLS.STARTTLS),
    ],
)
def test_upstream_silent_during_the_handshake_times_out(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    upstreams: Upstreams,
    faulty_server: Any,
    cut_relay: Any,
    protocol: MailProtocol,
    tls: UpstreamTLS,
) -> None:
    """TCP accepted (and STARTTLS agreed), then silence: `connect_timeout` bounds the
    TLS handshake too, and the client hears a temporary failure, not a bare close."""
    prelude = None if tls is UpstreamTLS.IMPLICIT else protocol.value
    bad: FaultyServer = faulty_server("hang", prelude=prelude)
    relay = cut_relay("127.0.0.1", bad.port)
    limits = Limits(connect_timeout=1.0, login_timeout=30)
    proxy = _proxy(run_proxy, idp, local_ca, relay, protocol, tls, limits)
    said = _until_closed(proxy.port("faulty"))
    assert said.startswith(TEMPORARY_GREETING[protocol]), said
    _recovers(proxy, relay, protocol, tls, upstreams)


# -- certificates ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
@pytest.mark.parametrize("problem", ["untrusted", "wrong-host"])
def test_bad_upstream_certificate_is_refused(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    rogue_ca: LocalCA,
    upstreams: Upstreams,
    faulty_server: Any,
    cut_relay: Any,
    caplog: pytest.LogCaptureFixture,
    protocol: MailProtocol,
    tls: UpstreamTLS,
    problem: str,
) -> None:
    """An upstream whose certificate doesn't verify never sees a login: the handshake is
    aborted, the client is told to try later, the log says which host and why."""
    if problem == "untrusted":
        cert = rogue_ca.issue(f"rogue-{protocol.value}")  # right names, unknown issuer
        reason = "unable to get local issuer certificate"
    else:
        cert = local_ca.issue(f"elsewhere-{protocol.value}", hosts=("mail.elsewhere.test",))
        reason = "mismatch"
    prelude = None if tls is UpstreamTLS.IMPLICIT else protocol.value
    bad: FaultyServer = faulty_server(
        "tls", prelude=prelude, cert=cert, greeting_after_tls=protocol.value
    )
    relay = cut_relay("127.0.0.1", bad.port)
    proxy = _proxy(run_proxy, idp, local_ca, relay, protocol, tls)

    with caplog.at_level(logging.INFO, logger="mailwarden"):
        said = _until_closed(proxy.port("faulty"))
    assert said.startswith(TEMPORARY_GREETING[protocol]), said
    # the server saw the handshake fail, and nothing but the plain STARTTLS prelude
    _eventually(lambda: _assert_equal(len(bad.tls_errors) >= 1, True))
    assert b"auth" not in bad.received.lower(), bytes(bad.received)
    assert idp.request_count() == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    named = [line for line in lines if f"127.0.0.1:{relay.port}" in line]
    assert any("certificate verify failed" in line and reason in line for line in named), lines
    # one structured line with the catalogue's reason and fix
    diagnosed = [r for r in caplog.records if getattr(r, "event", "") == "upstream_unreachable"]
    assert {getattr(r, "reason", "") for r in diagnosed} == {"UpstreamCertificateInvalid"}
    assert all(getattr(r, "hint", "") for r in diagnosed)
    _recovers(proxy, relay, protocol, tls, upstreams)


# -- connections cut after login ---------------------------------------------------------------


def test_upstream_closes_mid_fetch(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    upstreams: Upstreams,
    cut_relay: Any,
) -> None:
    """Dovecot's side drops during a large FETCH: the client sees the connection end
    before the literal is complete; the proxy keeps serving new sessions."""
    message = _deliver_big(upstreams.dovecot, 40_000)  # ~3.1 MB
    relay = cut_relay(*upstreams.address(MailProtocol.IMAP, UpstreamTLS.IMPLICIT))
    proxy = _proxy(run_proxy, idp, local_ca, relay, MailProtocol.IMAP, UpstreamTLS.IMPLICIT)
    port = proxy.port("faulty")

    imap = imaplib.IMAP4("127.0.0.1", port, timeout=15)
    imap.login(USER, LOCAL_PASSWORD)
    assert imap.select("INBOX") == ("OK", [b"1"])
    relay.cut_after(downstream=256 * 1024)
    imap.send(b"f1 FETCH 1 BODY.PEEK[]\r\n")
    first = imap.readline()
    assert first.startswith(b"* 1 FETCH") and first.rstrip().endswith(b"}"), first
    announced = int(first.rstrip()[:-1].rsplit(b"{", 1)[1])
    assert announced == len(message)
    received = b""
    while chunk := imap.read(65536):  # until the proxy closes the connection
        received += chunk
    assert relay.wait_cut()
    assert len(received) < announced
    with pytest.raises(imaplib.IMAP4.abort):
        imap.noop()
    imap.shutdown()

    # a new session, through the same relay and proxy, reads the whole message
    def fetch_all() -> None:
        with imaplib.IMAP4("127.0.0.1", port, timeout=15) as again:
            again.login(USER, LOCAL_PASSWORD)
            again.select("INBOX")
            typ, data = again.fetch("1", "(BODY.PEEK[])")
            assert typ == "OK" and isinstance(data[0], tuple) and data[0][1] == message

    fetch_all()
    active = {"listener": "faulty", "protocol": "imap"}
    _eventually(lambda: _assert_equal(proxy.metric("mailwarden_active_connections", **active), 0))


def test_upstream_closes_mid_retr(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    upstreams: Upstreams,
    cut_relay: Any,
) -> None:
    """Dovecot's side drops during a large RETR: the client sees the connection end
    before the terminating dot, never a complete-looking message; the upstream never got
    QUIT, so the message is still there for the next session, whole."""
    message = _deliver_big(upstreams.dovecot, 30_000)  # ~2.3 MB
    relay = cut_relay(*upstreams.address(MailProtocol.POP3, UpstreamTLS.IMPLICIT))
    proxy = _proxy(run_proxy, idp, local_ca, relay, MailProtocol.POP3, UpstreamTLS.IMPLICIT)
    port = proxy.port("faulty")

    pop = poplib.POP3("127.0.0.1", port, timeout=15)
    pop.user(USER)
    pop.pass_(LOCAL_PASSWORD)
    assert pop.stat()[0] == 1
    relay.cut_after(downstream=256 * 1024)
    # by hand: poplib's retr would wait for a dot that never comes
    pop.sock.sendall(b"RETR 1\r\n")
    assert pop.file.readline().startswith(b"+OK")
    received = 0
    while line := pop.file.readline():  # until the proxy closes the connection
        assert line != b".\r\n", "the message must not look complete"
        received += len(line)
    assert relay.wait_cut()
    assert 0 < received < len(message)
    pop.close()

    def retrieve_all() -> None:
        again = poplib.POP3("127.0.0.1", port, timeout=15)
        try:
            again.user(USER)
            again.pass_(LOCAL_PASSWORD)
            assert again.stat()[0] == 1  # nothing was expunged by the cut session
            _, lines, _ = again.retr(1)
            assert b"\r\n".join(lines) + b"\r\n" == message
        finally:
            again.quit()

    retrieve_all()
    active = {"listener": "faulty", "protocol": "pop3"}
    _eventually(lambda: _assert_equal(proxy.metric("mailwarden_active_connections", **active), 0))


@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
def test_upstream_closes_mid_data(
    run_proxy: Any,
    idp: LocalIdP,
    local_ca: LocalCA,
    upstreams: Upstreams,
    cut_relay: Any,
    tls: UpstreamTLS,
) -> None:
    """The submission server's side drops in the middle of a DATA body: the client
    never gets a 250 for that message and the server stored nothing; the next session
    through the same proxy sends normally."""
    relay = cut_relay(*upstreams.address(MailProtocol.SMTP, tls))
    server = upstreams.submission[tls]
    proxy = _proxy(run_proxy, idp, local_ca, relay, MailProtocol.SMTP, tls)
    port = proxy.port("faulty")
    body = b"Subject: cut\r\n\r\n" + b"y" * 76 * 20_000  # ~1.5 MB

    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15)
    smtp.login(USER, LOCAL_PASSWORD)
    assert smtp.mail(USER)[0] == 250
    assert smtp.rcpt("rcpt@example.org")[0] == 250
    smtp.putcmd("data")
    assert smtp.getreply()[0] == 354
    relay.cut_after(upstream=128 * 1024)
    outcome: object
    try:
        for offset in range(0, len(body), 76):
            smtp.send(body[offset : offset + 74] + b"\r\n")
        smtp.send(b".\r\n")
        outcome = smtp.getreply()
    except (OSError, smtplib.SMTPServerDisconnected) as exc:
        outcome = exc
    assert relay.wait_cut()
    assert not (isinstance(outcome, tuple) and outcome[0] == 250), outcome
    assert isinstance(outcome, smtplib.SMTPServerDisconnected | OSError) or (
        isinstance(outcome, tuple) and outcome[0] in (421, 451)
    ), outcome
    smtp.close()
    assert server.messages == []

    _recovers(proxy, relay, MailProtocol.SMTP, tls, upstreams)
    assert [m.subject for m in server.wait_for_messages(1)] == ["ok"]

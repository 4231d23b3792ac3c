"""Resource limits and local-auth hardening, through real peers.

One proxy per test with an IMAP and a POP3 listener in front of the real Dovecot and an
SMTP listener in front of aiosmtpd; clients are raw sockets so every byte the proxy
says is visible. Limits are configured small (a connection cap of 1, timeouts of a
fraction of a second) and each test waits for the effect with a generous bound: no
assertion depends on how fast the machine is.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from mailwarden_proxy.config.model import Limits, MailProtocol, ProxyConfig, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from tests.fixtures.dovecot import DovecotServer
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

pytestmark = pytest.mark.dovecot

USER = "reader@example.com"
NAMES = {MailProtocol.IMAP: "IMAP-lim", MailProtocol.POP3: "POP-lim", MailProtocol.SMTP: "SMTP-lim"}
ALL = list(NAMES)
WAIT = 15.0  # the generous bound for anything the proxy should do "soon"


def _config(
    idp: LocalIdP, dovecot: DovecotServer, smtpd: LocalSubmissionServer, limits: Limits
) -> ProxyConfig:
    ca = dovecot.ca_path
    listeners = [
        listener(
            NAMES[MailProtocol.IMAP],
            MailProtocol.IMAP,
            dovecot.imaps_port,
            UpstreamTLS.IMPLICIT,
            ca,
            host=dovecot.host,
        ),
        listener(
            NAMES[MailProtocol.POP3],
            MailProtocol.POP3,
            dovecot.pop3s_port,
            UpstreamTLS.IMPLICIT,
            ca,
            host=dovecot.host,
        ),
        listener(NAMES[MailProtocol.SMTP], MailProtocol.SMTP, smtpd.port, UpstreamTLS.STARTTLS, ca),
    ]
    return config(listeners, [app_account(idp, USER)], limits=limits)


@pytest.fixture
def start(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    make_submission_server: Callable[..., LocalSubmissionServer],
) -> Callable[..., Any]:
    """`start(loop, **limits)`: a proxy with the three listeners and these limits."""
    smtpd = make_submission_server("starttls")

    def go(loop: str = "uvloop", **limits: Any) -> Any:
        limits.setdefault("login_timeout", 30)
        proxy = run_proxy(_config(idp, dovecot, smtpd, Limits(**limits)), loop)
        proxy.build_config = lambda **more: _config(
            idp, dovecot, smtpd, Limits(**{**limits, **more})
        )
        return proxy

    return go


class Client:
    """A raw line client: what the proxy sends, byte for byte."""

    def __init__(self, proxy: Any, protocol: MailProtocol) -> None:
        self.protocol = protocol
        self.sock = socket.create_connection(("127.0.0.1", proxy.port(NAMES[protocol])), WAIT)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def reply(self) -> bytes:
        """One reply: a line, or for SMTP all lines of a multi-line reply."""
        line = self.line()
        while self.protocol is MailProtocol.SMTP and line[3:4] == b"-":
            line = self.line()
        return line

    def until(self, prefix: bytes) -> bytes:
        while True:
            line = self.line()
            if not line or line.startswith(prefix):
                return line

    def rest(self) -> bytes:
        """Everything until the proxy closes the connection."""
        chunks = []
        try:
            while chunk := self.file.read1(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)

    def greeting(self) -> bytes:
        return self.reply()

    def login(self, password: str = LOCAL_PASSWORD) -> bytes:
        """Log in after the greeting; the server's final reply to the login."""
        match self.protocol:
            case MailProtocol.IMAP:
                self.send(f"a LOGIN {USER} {password}\r\n".encode())
                return self.until(b"a ")
            case MailProtocol.POP3:
                self.send(f"USER {USER}\r\n".encode())
                assert self.line().startswith(b"+OK")
                self.send(f"PASS {password}\r\n".encode())
                return self.line()
            case MailProtocol.SMTP:
                self.send(b"EHLO limits.test\r\n")
                assert self.reply().startswith(b"250 ")
                plain = base64.b64encode(f"\0{USER}\0{password}".encode())
                self.send(b"AUTH PLAIN " + plain + b"\r\n")
                return self.reply()


OK = {MailProtocol.IMAP: b"a OK", MailProtocol.POP3: b"+OK", MailProtocol.SMTP: b"235 "}
GREETING = {MailProtocol.IMAP: b"* OK", MailProtocol.POP3: b"+OK", MailProtocol.SMTP: b"220 "}


def _eventually(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "the proxy did not get there in time"
        time.sleep(0.05)


# -- max connections per listener ---------------------------------------------------------


BUSY = {
    MailProtocol.IMAP: b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n",
    MailProtocol.POP3: b"-ERR [SYS/TEMP] Too many connections, try again later\r\n",
    MailProtocol.SMTP: b"421 4.3.2 mailwarden Too many connections, try again later\r\n",
}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_connections_over_the_cap_get_try_later_and_are_closed(start: Any, loop: str) -> None:
    proxy = start(loop, max_connections=1)
    for protocol in ALL:
        first = Client(proxy, protocol)
        assert first.greeting().startswith(GREETING[protocol])
        second = Client(proxy, protocol)
        assert second.rest() == BUSY[protocol]  # the whole answer, then the close
        second.close()
        first.close()

        def admitted(protocol: MailProtocol = protocol) -> bool:  # once `first` is gone
            c = Client(proxy, protocol)
            try:
                return c.greeting().startswith(GREETING[protocol])
            finally:
                c.close()

        _eventually(admitted)
        refused = proxy.metric(
            "mailwarden_connections_refused_total",
            listener=NAMES[protocol],
            protocol=protocol.value,
            reason="max_connections",
        )
        assert refused >= 1  # `admitted` may have raced the first one's end once more


def test_default_cap_allows_the_bench_s_thousand_idle_imap_sessions() -> None:
    assert Limits().max_connections >= 1000


# -- login timeout: slow-loris ------------------------------------------------------------

LOGIN_TIMEOUT = {
    MailProtocol.IMAP: b"* BYE Login not completed in time, closing the connection\r\n",
    MailProtocol.POP3: b"-ERR Login not completed in time, closing the connection\r\n",
    MailProtocol.SMTP: b"421 4.4.2 mailwarden Login not completed in time, closing connection\r\n",
}
SLOW = {
    MailProtocol.IMAP: b"a LOGIN reader@example.com password",
    MailProtocol.POP3: b"USER reader@example.com",
    MailProtocol.SMTP: b"EHLO slow.loris.example",
}


@pytest.mark.parametrize(
    ("protocol", "loop"), [(p, "uvloop") for p in ALL] + [(MailProtocol.SMTP, "asyncio")]
)
def test_slow_loris_cannot_hold_a_session_past_the_login_timeout(
    start: Any, protocol: MailProtocol, loop: str
) -> None:
    proxy = start(loop, login_timeout=1.0)
    client = Client(proxy, protocol)
    assert client.greeting().startswith(GREETING[protocol])
    client.sock.settimeout(0.25)
    received = b""
    deadline = time.monotonic() + WAIT
    trickle = iter(SLOW[protocol] * 100)  # a byte every 0.25 s, never a whole line
    while time.monotonic() < deadline:
        try:
            chunk = client.sock.recv(4096)
        except TimeoutError:
            try:
                client.sock.send(bytes([next(trickle)]))
            except OSError:  # closed under us: read what was said before
                client.sock.settimeout(WAIT)
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail("the slow client was not disconnected")
    assert received == LOGIN_TIMEOUT[protocol]
    assert (
        proxy.metric(
            "mailwarden_session_timeouts_total",
            listener=NAMES[protocol],
            protocol=protocol.value,
            phase="login",
        )
        == 1
    )
    client.close()


# -- idle timeout after login --------------------------------------------------------------

IDLE = {
    MailProtocol.IMAP: b"* BYE Autologout; idle for too long\r\n",
    MailProtocol.POP3: b"-ERR Idle for too long, closing the connection\r\n",
    MailProtocol.SMTP: b"421 4.4.2 mailwarden Idle for too long, closing connection\r\n",
}


@pytest.mark.parametrize(
    ("protocol", "loop"), [(p, "uvloop") for p in ALL] + [(MailProtocol.IMAP, "asyncio")]
)
def test_idle_session_after_login_is_closed_with_a_goodbye(
    start: Any, protocol: MailProtocol, loop: str
) -> None:
    idle = 0.5
    proxy = start(loop, imap_idle_timeout=idle, pop3_idle_timeout=idle, smtp_idle_timeout=idle)
    client = Client(proxy, protocol)
    client.greeting()
    assert client.login().startswith(OK[protocol])
    assert client.rest() == IDLE[protocol]
    client.close()
    _eventually(lambda: proxy.app.server.active_sessions == 0)
    labels = {"listener": NAMES[protocol], "protocol": protocol.value, "phase": "idle"}
    assert proxy.metric("mailwarden_session_timeouts_total", **labels) == 1


def test_traffic_keeps_a_session_alive_and_upstream_is_closed_too(
    start: Any, dovecot: DovecotServer
) -> None:
    def upstream_closed() -> int:  # Dovecot's line for the proxy's connection going away
        return sum(
            f"imap({USER})" in line and "Disconnected: Connection closed" in line
            for line in dovecot.log().splitlines()
        )

    closed_before = upstream_closed()
    proxy = start(imap_idle_timeout=1.5)
    client = Client(proxy, MailProtocol.IMAP)
    client.greeting()
    assert client.login().startswith(b"a OK")
    until = time.monotonic() + 3.0  # twice the idle timeout, a NOOP every 0.25 s
    n = 0
    while time.monotonic() < until:
        n += 1
        client.send(f"n{n} NOOP\r\n".encode())
        assert client.until(f"n{n} ".encode()).startswith(f"n{n} OK".encode())
        time.sleep(0.25)
    assert client.rest() == IDLE[MailProtocol.IMAP]
    client.close()
    _eventually(lambda: proxy.app.server.active_sessions == 0)
    _eventually(lambda: upstream_closed() > closed_before)


# -- line and literal caps --------------------------------------------------------------------

SMALL = {"max_line": 2048, "max_literal": 8192}
FLOOD = 64 * 1024 * 1024


def _flood(client: Client, head: bytes) -> int:
    """Send `head` and then junk without a line end; the bytes the proxy let in."""
    sent = 0
    chunk = b"x" * 65536
    try:
        client.send(head)
        while sent < FLOOD:
            sent += client.sock.send(chunk)
    except OSError:  # reset or broken pipe: the proxy closed the connection
        pass
    return sent


TOO_LONG = {
    MailProtocol.IMAP: b"* BAD [TOOBIG] Command line too long\r\n* BYE Closing the connection\r\n",
    MailProtocol.POP3: b"-ERR Line too long\r\n",
    MailProtocol.SMTP: b"500 5.5.6 Line too long\r\n",
}


@pytest.mark.parametrize("protocol", ALL)
def test_an_endless_line_gets_the_too_long_reply_and_memory_stays_bounded(
    start: Any, protocol: MailProtocol
) -> None:
    proxy = start(**SMALL)
    client = Client(proxy, protocol)
    client.greeting()
    client.sock.settimeout(WAIT)  # a proxy that stopped reading would time the send out
    sent = _flood(client, b"a " if protocol is MailProtocol.IMAP else b"")
    # what got in is the line cap plus the kernel's socket buffers, not the flood
    assert sent < FLOOD // 2
    assert client.rest() == TOO_LONG[protocol]
    client.close()
    _eventually(lambda: proxy.app.server.active_sessions == 0)


def test_imap_synchronizing_literal_over_the_cap_is_refused_and_the_session_goes_on(
    start: Any,
) -> None:
    proxy = start(**SMALL)
    client = Client(proxy, MailProtocol.IMAP)
    client.greeting()
    client.send(b"a LOGIN {100000}\r\n")  # asks first: nothing of it is read
    assert client.line() == b"a NO [TOOBIG] Literal too large\r\n"
    client.send(b"b NOOP\r\n")
    assert client.until(b"b ").startswith(b"b OK")
    client.send(b"c LOGIN {%d}\r\n" % len(USER))  # a literal within the cap still works
    assert client.line().startswith(b"+ ")
    client.send(USER.encode() + b" " + LOCAL_PASSWORD.encode() + b"\r\n")
    assert client.until(b"c ").startswith(b"c OK")
    client.close()


def test_imap_non_synchronizing_literal_over_the_cap_ends_the_session(start: Any) -> None:
    proxy = start(**SMALL)
    client = Client(proxy, MailProtocol.IMAP)
    client.greeting()
    client.sock.settimeout(WAIT)
    sent = _flood(client, b"a LOGIN {67108864+}\r\n")
    assert sent < FLOOD // 2
    assert client.rest() == (
        b"a BAD [TOOBIG] Literal too large\r\n* BYE Cannot continue after this error\r\n"
    )
    client.close()


# -- failed local logins ----------------------------------------------------------------------

WRONG = {
    MailProtocol.IMAP: b"a NO [AUTHENTICATIONFAILED]",
    MailProtocol.POP3: b"-ERR [AUTH]",
    MailProtocol.SMTP: b"535 ",
}
TRY_LATER = {
    MailProtocol.IMAP: b"a NO [UNAVAILABLE]",
    MailProtocol.POP3: b"-ERR [SYS/TEMP]",
    MailProtocol.SMTP: b"454 4.7.0",
}


def test_failed_local_logins_are_rate_limited_per_source(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mailwarden")
    # a burst of 3, then (practically) no refill during the test
    proxy = start(failed_login_burst=3, failed_logins_per_minute=0.001, failed_login_delay=0.05)
    imap = Client(proxy, MailProtocol.IMAP)
    imap.greeting()
    for _ in range(3):  # checked, and refused as wrong
        assert imap.login("wrong").startswith(WRONG[MailProtocol.IMAP])
    # now even the right password is refused unchecked, with "try again later" ...
    assert imap.login().startswith(TRY_LATER[MailProtocol.IMAP])
    # ... on every listener: the source is the same address
    for protocol in (MailProtocol.POP3, MailProtocol.SMTP):
        other = Client(proxy, protocol)
        other.greeting()
        assert other.login().startswith(TRY_LATER[protocol])
        other.close()
    assert (
        proxy.metric(
            "mailwarden_logins_total",
            listener=NAMES[MailProtocol.IMAP],
            protocol="imap",
            result="rate_limited",
        )
        == 1
    )
    assert "too many failed local logins from 127.0.0.1" in caplog.text
    # the bucket refills (here: a reload with a fast rate); the right password works again
    proxy.reload(proxy.build_config(failed_logins_per_minute=6000))
    assert imap.login().startswith(b"a OK")
    imap.close()


def test_rate_limiting_can_be_switched_off(start: Any) -> None:
    proxy = start(failed_login_burst=0)
    client = Client(proxy, MailProtocol.POP3)
    client.greeting()
    for _ in range(12):  # more than the default burst
        assert client.login("wrong").startswith(WRONG[MailProtocol.POP3])
    assert client.login().startswith(b"+OK")
    client.close()


# -- binding beyond loopback ------------------------------------------------------------------


def test_a_listener_beyond_loopback_is_announced_loudly(
    start: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "mailwarden")
    proxy = start()
    assert "reachable from other hosts" not in caplog.text  # all on 127.0.0.1
    info = {"listener": NAMES[MailProtocol.IMAP], "protocol": "imap", "address": "127.0.0.1"}
    assert proxy.metric("mailwarden_listener_info", **info, loopback="true") == 1

    base = proxy.build_config()
    exposed = replace(base.listeners[0], local_address="0.0.0.0")
    proxy.reload(replace(base, listeners=(exposed, *base.listeners[1:])))
    warnings = [m for r in caplog.records if "reachable from other" in (m := r.getMessage())]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"listener {NAMES[MailProtocol.IMAP]} is bound to 0.0.0.0")
    exposed_info = {**info, "address": "0.0.0.0", "loopback": "false"}
    assert proxy.metric("mailwarden_listener_info", **exposed_info) == 1
    assert proxy.metric("mailwarden_listener_info", **info, loopback="true") == 0
    # said again on every reload, as long as it stays so
    proxy.reload(replace(base, listeners=(exposed, *base.listeners[1:])))
    assert sum("reachable from other" in r.getMessage() for r in caplog.records) == 2

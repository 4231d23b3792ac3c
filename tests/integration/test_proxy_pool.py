"""SMTP sessions on warm upstream connections (relay.pool), against the real aiosmtpd server."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailwarden_proxy.config.model import MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.protocols.session import UpstreamInfo
from mailwarden_proxy.protocols.smtp import SmtpCore
from mailwarden_proxy.relay.pool import POOL_SIZE, UpstreamPool
from mailwarden_proxy.relay.tls import upstream_context
from tests.fixtures.faulty import CutRelay
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener
from tests.integration.test_proxy_smtp import USER, _message

NAME = "SMTP-pool"


@pytest.fixture(params=["starttls", "implicit"])
def smtpd(request: pytest.FixtureRequest, idp: LocalIdP, local_ca: LocalCA) -> Iterator[Any]:
    with LocalSubmissionServer(
        idp.is_valid, tls=request.param, cert=local_ca.issue("smtpd")
    ) as server:
        yield server


def _tls(smtpd: LocalSubmissionServer) -> UpstreamTLS:
    return UpstreamTLS.STARTTLS if smtpd.tls == "starttls" else UpstreamTLS.IMPLICIT


def _start(run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA) -> Any:
    lst = listener(NAME, MailProtocol.SMTP, smtpd.port, _tls(smtpd), local_ca.ca_path)
    return run_proxy(config([lst], [app_account(idp, USER)]))


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _idle(proxy: Any) -> int:
    async def read() -> int:
        count: int = proxy.app.server.idle_upstreams(NAME)
        return count

    return int(proxy.call(read()))


def _send(proxy: Any, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", proxy.port(NAME), timeout=10) as client:
        client.ehlo()
        assert "XOAUTH2" not in client.esmtp_features["auth"].upper()
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message(subject))


def test_sequential_sends_use_warm_connections(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    assert _idle(proxy) == 0  # nothing is opened before the first client
    sends = 5
    for index in range(sends):
        _send(proxy, f"m{index}")
        _wait(lambda: _idle(proxy) == POOL_SIZE)  # refilled after every take
    messages = smtpd.wait_for_messages(sends)
    assert [m.subject for m in messages] == [f"m{i}" for i in range(sends)]
    # Only the first session connected itself; each later one took a warm connection,
    # and the pool holds POOL_SIZE more. Without the pool this would be `sends`.
    assert smtpd.connections == sends + POOL_SIZE
    # STARTTLS upstream from the pool: every message went over TLS
    assert all(m.tls for m in messages) or _tls(smtpd) is UpstreamTLS.IMPLICIT
    assert smtpd.auth_attempts == sends
    labels = {"listener": NAME, "protocol": "smtp", "result": "ok"}
    assert proxy.metric("mailwarden_logins_total", **labels) == sends


def test_connection_closed_by_the_server_while_idle_is_not_used(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    _send(proxy, "first")
    _wait(lambda: _idle(proxy) == POOL_SIZE)

    async def close_all() -> None:  # as a server's idle timeout would
        for protocol in list(smtpd._protocols):  # the demo server keeps no public handle
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.close()

    asyncio.run_coroutine_threadsafe(close_all(), smtpd._loop).result(10)
    _wait(lambda: _idle(proxy) == 0)  # both discarded, not replaced until the next take
    before = smtpd.connections
    _send(proxy, "second")
    assert [m.subject for m in smtpd.wait_for_messages(2)] == ["first", "second"]
    _wait(lambda: _idle(proxy) == POOL_SIZE)
    assert smtpd.connections == before + 1 + POOL_SIZE  # its own connection, then a refill


def _start_behind_relay(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, cut_relay: Any
) -> tuple[Any, CutRelay]:
    """A proxy whose upstream connections all pass through a relay that can cut them;
    one send has run, so the pool is full."""
    relay: CutRelay = cut_relay("127.0.0.1", smtpd.port)
    lst = listener(NAME, MailProtocol.SMTP, relay.port, _tls(smtpd), local_ca.ca_path)
    proxy = run_proxy(config([lst], [app_account(idp, USER)]))
    _send(proxy, "first")
    _wait(lambda: _idle(proxy) == POOL_SIZE)
    return proxy, relay


def test_warm_connection_lost_before_login_is_replaced(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, cut_relay: Any
) -> None:
    """Every upstream connection drops (a restart, a network cut) while a client that
    was greeted from a warm connection hasn't logged in yet: the session continues on a
    new connection instead of answering 421."""
    proxy, relay = _start_behind_relay(run_proxy, idp, smtpd, local_ca, cut_relay)
    with smtplib.SMTP("127.0.0.1", proxy.port(NAME), timeout=10) as client:
        # greeted: the session holds a warm connection; the pool holds POOL_SIZE more
        _wait(lambda: _idle(proxy) == POOL_SIZE)
        relay.cut()
        _wait(lambda: _idle(proxy) == 0)  # the parked ones are discarded
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message("after the cut"))
    assert [m.subject for m in smtpd.wait_for_messages(2)] == ["first", "after the cut"]
    labels = {"listener": NAME, "protocol": "smtp", "result": "ok"}
    assert proxy.metric("mailwarden_logins_total", **labels) == 2


def test_warm_connection_lost_before_answering_auth_is_replaced(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, cut_relay: Any
) -> None:
    """The warm connection dies with our AUTH in flight and no answer: the AUTH goes
    again on a new connection (nothing of a message has been sent yet)."""
    proxy, relay = _start_behind_relay(run_proxy, idp, smtpd, local_ca, cut_relay)
    attempts = smtpd.auth_attempts
    with smtplib.SMTP("127.0.0.1", proxy.port(NAME), timeout=10) as client:
        client.ehlo()  # answered by the proxy from the warm connection's extensions
        relay.cut_after(upstream=1)  # the AUTH line is dropped, then every connection
        client.login(USER, LOCAL_PASSWORD)
        assert relay.wait_cut()
        client.send_message(_message("auth again"))
    assert [m.subject for m in smtpd.wait_for_messages(2)] == ["first", "auth again"]
    assert smtpd.auth_attempts == attempts + 1  # the dropped AUTH never reached it


def test_idle_connections_are_recycled(idp: LocalIdP, smtpd: Any, local_ca: LocalCA) -> None:
    lst = listener(NAME, MailProtocol.SMTP, smtpd.port, _tls(smtpd), local_ca.ca_path)
    info = UpstreamInfo("127.0.0.1", smtpd.port, lst.upstream.tls is UpstreamTLS.STARTTLS)

    async def scenario() -> tuple[int, int]:
        pool = UpstreamPool(
            lst,
            upstream_context(lst.upstream),
            make_core=lambda: SmtpCore(info),
            timeout=lambda: 10.0,
            idle_lifetime=0.3,
        )
        assert pool.take() is None  # empty; starts filling
        for _ in range(200):
            if pool.idle == POOL_SIZE:
                break
            await asyncio.sleep(0.01)
        first = smtpd.connections
        await asyncio.sleep(1.0)  # three lifetimes: expired and replaced (a take was recent)
        warm = pool.take()
        assert warm is not None and warm.protocol.on_idle_event is None
        assert (warm.tls, bool(warm.extensions)) == (info.starttls, True)
        warm.transport.close()
        pool.close()
        return first, smtpd.connections

    first, later = asyncio.run(scenario())
    assert first == POOL_SIZE
    assert later >= first + 2 * POOL_SIZE

"""IMAP and POP3 through the proxy to a real Dovecot validating tokens at the local IdP."""

from __future__ import annotations

import base64
import imaplib
import poplib
import socket
import ssl
import subprocess
from typing import Any

import pytest

from mailwarden_proxy.config.model import LocalTLS, MailProtocol, Mechanism, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.fixtures.dovecot import DovecotServer
from tests.integration.proxyconf import (
    LOCAL_PASSWORD,
    app_account,
    config,
    listener,
    refresh_account,
)

pytestmark = pytest.mark.dovecot

USER = "reader@example.com"
MESSAGE = b"From: a@example.com\r\nTo: reader@example.com\r\nSubject: stored\r\n\r\nhello\r\n"


def _imap_proxy(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    *,
    tls: UpstreamTLS = UpstreamTLS.IMPLICIT,
    mechanism: Mechanism = Mechanism.XOAUTH2,
    account: Any = None,
    **kwargs: Any,
) -> Any:
    port = dovecot.imaps_port if tls is UpstreamTLS.IMPLICIT else dovecot.imap_port
    lst = listener(
        "IMAP-test", MailProtocol.IMAP, port, tls, dovecot.ca_path, host=dovecot.host, **kwargs
    )
    account = account or app_account(idp, USER, mechanism=mechanism)
    return run_proxy(config([lst], [account]))


def _pop_proxy(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer, *, tls: UpstreamTLS, **kwargs: Any
) -> Any:
    port = dovecot.pop3s_port if tls is UpstreamTLS.IMPLICIT else dovecot.pop3_port
    lst = listener("POP-test", MailProtocol.POP3, port, tls, dovecot.ca_path, host=dovecot.host)
    return run_proxy(config([lst], [app_account(idp, USER, **kwargs)]))


@pytest.fixture(autouse=True)
def _clean_mailboxes(dovecot: DovecotServer) -> None:
    dovecot.reset_mail()


@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
@pytest.mark.parametrize("mechanism", [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER])
def test_imap_login_and_fetch(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    tls: UpstreamTLS,
    mechanism: Mechanism,
) -> None:
    dovecot.deliver(USER, MESSAGE)
    proxy = _imap_proxy(run_proxy, idp, dovecot, tls=tls, mechanism=mechanism)
    with imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-test"), timeout=10) as client:
        assert "AUTH=PLAIN" in client.capabilities
        assert not any(c.startswith("AUTH=XOAUTH2") for c in client.capabilities)
        client.login(USER, LOCAL_PASSWORD)
        typ, data = client.select("INBOX")
        assert (typ, data) == ("OK", [b"1"])
        typ, fetched = client.fetch("1", "(RFC822)")
        assert typ == "OK"
        assert isinstance(fetched[0], tuple) and fetched[0][1] == MESSAGE
        client.logout()
    labels = {"listener": "IMAP-test", "protocol": "imap", "result": "ok"}
    assert proxy.metric("mailwarden_logins_total", **labels) == 1
    assert proxy.metric("mailwarden_relayed_bytes_total", listener="IMAP-test",
                        direction="downstream") > len(MESSAGE)  # fmt: skip


def test_imap_authenticate_plain_and_literal_login(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    proxy = _imap_proxy(run_proxy, idp, dovecot)
    port = proxy.port("IMAP-test")
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        client.authenticate("PLAIN", lambda _: f"\0{USER}\0{LOCAL_PASSWORD}".encode())
        assert client.state == "AUTH"
    # synchronizing literals for both strings, as clients do for unusual characters
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"* OK")
        user, password = USER.encode(), LOCAL_PASSWORD.encode()
        sock.sendall(b"a1 LOGIN {%d}\r\n" % len(user))
        assert reader.readline().startswith(b"+")
        sock.sendall(user + b" {%d}\r\n" % len(password))
        assert reader.readline().startswith(b"+")
        sock.sendall(password + b"\r\na2 SELECT INBOX\r\n")  # pipelined after the login
        lines = [reader.readline() for _ in range(3)]
        while not lines[-1].startswith(b"a2 "):
            lines.append(reader.readline())
        assert any(line.startswith(b"a1 OK") for line in lines)
        assert lines[-1].startswith(b"a2 OK")


def test_imap_wrong_password_and_local_starttls(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer, local_ca: LocalCA
) -> None:
    cert = local_ca.issue("proxy-imap")
    proxy = _imap_proxy(
        run_proxy, idp, dovecot, local_tls=LocalTLS.STARTTLS, cert=(cert.cert_path, cert.key_path)
    )
    with imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-test"), timeout=10) as client:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            client.login(USER, "wrong")
        client.starttls(ssl.create_default_context(cafile=str(local_ca.ca_path)))
        client.login(USER, LOCAL_PASSWORD)
        assert client.select("INBOX")[0] == "OK"
    assert idp.request_count() == 1


def test_imap_revoked_token_is_refreshed_once(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    proxy = _imap_proxy(run_proxy, idp, dovecot)
    port = proxy.port("IMAP-test")
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        client.login(USER, LOCAL_PASSWORD)
    idp.revoke_all_access_tokens()  # the cached token is now refused by Dovecot
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        client.login(USER, LOCAL_PASSWORD)
    assert idp.request_count("client_credentials") == 2


def test_imap_with_a_delegated_refresh_token(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    proxy = _imap_proxy(run_proxy, idp, dovecot, account=refresh_account(idp, USER))
    with imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-test"), timeout=10) as client:
        client.login(USER, LOCAL_PASSWORD)
        assert client.select("INBOX")[0] == "OK"
    assert idp.request_count("refresh_token") == 1


def test_imap_identity_provider_down_is_temporary(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    proxy = _imap_proxy(run_proxy, idp, dovecot)
    idp.set_failure("500")
    with (
        imaplib.IMAP4("127.0.0.1", proxy.port("IMAP-test"), timeout=30) as client,
        pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"),
    ):
        client.login(USER, LOCAL_PASSWORD)


def test_curl_reads_imap_through_the_proxy(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    dovecot.deliver(USER, MESSAGE)
    proxy = _imap_proxy(run_proxy, idp, dovecot)
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-u", f"{USER}:{LOCAL_PASSWORD}",
         f"imap://127.0.0.1:{proxy.port('IMAP-test')}/INBOX;UID=1"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    assert result.stdout.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("tls", [UpstreamTLS.IMPLICIT, UpstreamTLS.STARTTLS])
def test_pop3_user_pass_and_retr(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer, tls: UpstreamTLS
) -> None:
    dovecot.deliver(USER, MESSAGE)
    proxy = _pop_proxy(run_proxy, idp, dovecot, tls=tls)
    client = poplib.POP3("127.0.0.1", proxy.port("POP-test"), timeout=10)
    try:
        caps = client.capa()
        assert caps.get("SASL") == ["PLAIN"]
        client.user(USER)
        client.pass_(LOCAL_PASSWORD)
        count, _size = client.stat()
        assert count == 1
        _resp, lines, _octets = client.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    finally:
        client.quit()


def test_pop3_auth_plain_and_wrong_password(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    proxy = _pop_proxy(run_proxy, idp, dovecot, tls=UpstreamTLS.IMPLICIT)
    client = poplib.POP3("127.0.0.1", proxy.port("POP-test"), timeout=10)
    try:
        client.user(USER)
        with pytest.raises(poplib.error_proto, match="AUTH"):
            client.pass_("wrong")
        plain = base64.b64encode(f"\0{USER}\0{LOCAL_PASSWORD}".encode()).decode()
        assert client._shortcmd(f"AUTH PLAIN {plain}").startswith(b"+OK")  # type: ignore[attr-defined]
        assert client.stat()[0] == 0
    finally:
        client.quit()
    assert idp.request_count() == 1


def test_curl_reads_pop3_through_the_proxy(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    dovecot.deliver(USER, MESSAGE)
    proxy = _pop_proxy(run_proxy, idp, dovecot, tls=UpstreamTLS.IMPLICIT)
    result = subprocess.run(
        ["curl", "-sS", "--fail", "-u", f"{USER}:{LOCAL_PASSWORD}",
         f"pop3://127.0.0.1:{proxy.port('POP-test')}/1"],
        capture_output=True, check=True, timeout=30,
    )  # fmt: skip
    assert result.stdout.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")

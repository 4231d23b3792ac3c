"""SMTP through the proxy to a real aiosmtpd submission server that requires XOAUTH2/OAUTHBEARER."""

from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from mailwarden_proxy.config.model import LocalTLS, MailProtocol, Mechanism, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

USER = "app@example.com"


def _message(subject: str = "hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = USER
    msg["To"] = "rcpt@example.com"
    msg["Subject"] = subject
    msg.set_content("body\n")
    return msg


@pytest.fixture(params=["starttls", "implicit"])
def smtpd(request: pytest.FixtureRequest, idp: LocalIdP, local_ca: LocalCA) -> Iterator[Any]:
    with LocalSubmissionServer(
        idp.is_valid, tls=request.param, cert=local_ca.issue("smtpd")
    ) as server:
        server.upstream_tls = (
            UpstreamTLS.STARTTLS if request.param == "starttls" else UpstreamTLS.IMPLICIT
        )
        yield server


def _start(run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, **kwargs: Any) -> Any:
    mechanism = kwargs.pop("mechanism", Mechanism.XOAUTH2)
    loop = kwargs.pop("loop", "uvloop")
    account = kwargs.pop("account", None) or app_account(idp, USER, mechanism=mechanism)
    lst = listener(
        "SMTP-test", MailProtocol.SMTP, smtpd.port, smtpd.upstream_tls, local_ca.ca_path, **kwargs
    )
    return run_proxy(config([lst], [account]), loop)


@pytest.mark.parametrize("mechanism", [Mechanism.XOAUTH2, Mechanism.OAUTHBEARER])
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_send_with_local_password(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, mechanism: Mechanism, loop: str
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca, mechanism=mechanism, loop=loop)
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=10) as client:
        client.ehlo()
        assert client.has_extn("auth")
        assert "XOAUTH2" not in client.esmtp_features["auth"].upper()
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message())
    assert len(smtpd.messages) == 1
    assert (
        proxy.metric("mailwarden_logins_total", listener="SMTP-test", protocol="smtp", result="ok")
        == 1
    )
    assert idp.request_count("client_credentials") == 1


def test_wrong_local_password_never_reaches_upstream(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=10) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.login(USER, "wrong")
        assert excinfo.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("nobody@example.com", LOCAL_PASSWORD)
        # the session stays usable: the right password still works
        client.login(USER, LOCAL_PASSWORD)
    assert idp.request_count() == 1
    assert smtpd.auth_attempts == 1
    # smtplib tries PLAIN, then LOGIN, after a 535: two refused attempts per login() call
    assert (
        proxy.metric(
            "mailwarden_logins_total",
            listener="SMTP-test",
            protocol="smtp",
            result="local_credentials",
        )
        == 4
    )


def test_rejected_token_is_retried_once_with_a_fresh_one(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    smtpd.reject_next_tokens(1)
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=10) as client:
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message())
    assert idp.request_count("client_credentials") == 2
    assert len(smtpd.messages) == 1


def test_token_rejected_twice_fails_the_login(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    smtpd.reject_next_tokens(2)
    plain = base64.b64encode(f"\0{USER}\0{LOCAL_PASSWORD}".encode()).decode()
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=10) as client:
        client.ehlo()
        # one AUTH command (smtplib's login() would go on to try LOGIN with a third token)
        code, reply = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 535, reply
        assert b"eyJ" not in reply  # nothing of the upstream's challenge or token leaks
    assert idp.request_count("client_credentials") == 2
    labels = {"listener": "SMTP-test", "protocol": "smtp", "result": "token_rejected"}
    assert proxy.metric("mailwarden_logins_total", **labels) == 1


def test_identity_provider_down_then_back(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    idp.set_failure("500")
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=30) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.login(USER, LOCAL_PASSWORD)
        assert excinfo.value.smtp_code == 454
        assert b"4.7.0" in excinfo.value.smtp_error
    idp.set_failure(None)
    import time

    time.sleep(2.5)  # past the short negative cache that protects a failing IdP
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=30) as client:
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message())
    assert len(smtpd.messages) == 1


def test_invalid_grant_is_an_authentication_failure(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    idp.set_failure("invalid_client")
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=30) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as excinfo:
            client.login(USER, LOCAL_PASSWORD)
        assert excinfo.value.smtp_code == 535
    assert smtpd.auth_attempts == 0


def test_local_starttls_and_implicit_tls(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    cert = local_ca.issue("proxy-local")
    pair = (cert.cert_path, cert.key_path)
    context = ssl.create_default_context(cafile=str(local_ca.ca_path))
    proxy = _start(run_proxy, idp, smtpd, local_ca, local_tls=LocalTLS.STARTTLS, cert=pair)
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP-test"), timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=context)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message("starttls"))
    proxy2 = _start(run_proxy, idp, smtpd, local_ca, local_tls=LocalTLS.IMPLICIT, cert=pair)
    port = proxy2.port("SMTP-test")
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context) as client:
        client.login(USER, LOCAL_PASSWORD)
        client.send_message(_message("implicit"))
    assert [m.subject for m in smtpd.messages] == ["starttls", "implicit"]


def test_cold_burst_makes_exactly_one_token_request(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    idp.set_failure("slow:0.5")  # keep the first request in flight while the burst arrives
    port = proxy.port("SMTP-test")

    def login(_: int) -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            code, _msg = client.login(USER, LOCAL_PASSWORD)
            return code

    with ThreadPoolExecutor(max_workers=100) as pool:
        codes = list(pool.map(login, range(100)))
    assert codes == [235] * 100
    assert idp.request_count("client_credentials") == 1


def test_first_login_password_becomes_the_local_password(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA
) -> None:
    account = app_account(idp, USER, password=None)  # emailproxy files carry none
    proxy = _start(run_proxy, idp, smtpd, local_ca, account=account)
    port = proxy.port("SMTP-test")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.login(USER, "chosen-by-the-app")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(USER, "another-password")
        client.login(USER, "chosen-by-the-app")


@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp not installed")
def test_msmtp_sends_through_the_proxy(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, tmp_path: Path
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "account default\nhost 127.0.0.1\n"
        f"port {proxy.port('SMTP-test')}\nauth plain\ntls off\n"
        f"user {USER}\npassword {LOCAL_PASSWORD}\nfrom {USER}\n"
    )
    rc.chmod(0o600)
    mail = "Subject: via msmtp\n\nhello\n"
    subprocess.run(
        ["msmtp", "-C", str(rc), "rcpt@example.com"],
        input=mail.encode(),
        check=True,
        timeout=30,
    )
    assert [m.subject for m in smtpd.messages] == ["via msmtp"]


def test_curl_sends_through_the_proxy(
    run_proxy: Any, idp: LocalIdP, smtpd: Any, local_ca: LocalCA, tmp_path: Path
) -> None:
    proxy = _start(run_proxy, idp, smtpd, local_ca)
    mail = tmp_path / "mail.txt"
    mail.write_text("Subject: via curl\r\n\r\nhello\r\n")
    subprocess.run(
        [
            "curl", "-sS", "--fail",
            f"smtp://127.0.0.1:{proxy.port('SMTP-test')}",
            "--mail-from", USER, "--mail-rcpt", "rcpt@example.com",
            "-u", f"{USER}:{LOCAL_PASSWORD}", "-T", str(mail),
        ],
        check=True,
        timeout=30,
    )  # fmt: skip
    assert [m.subject for m in smtpd.messages] == ["via curl"]

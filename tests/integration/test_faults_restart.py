"""Servers restarted under a running proxy or operator.

- Dovecot restarted while IMAP and POP3 sessions are logged in through the proxy: those
  sessions end (the upstream connection closes and the proxy closes the client's: the
  client reads EOF, never a half-relayed reply), and new sessions through the same proxy
  work once Dovecot is back.
- Postfix restarted in the middle of an SMTP transaction: the client never gets a `250`
  for the interrupted message and it is never delivered; the next message through the
  same proxy is.
- kube-apiserver restarted under the operator: its watches reconnect, and a MailAccount
  created after the restart is reconciled.
"""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import time
from collections.abc import Callable
from typing import Any

import pytest

from mailwarden_proxy.config.model import MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.kube import KubeCluster
from tests.fixtures.operator import OperatorRunner
from tests.fixtures.postfix import PostfixServer, restart_postfix
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

READER = "restart@example.org"
SENDER = "sender@example.org"


def _eventually(check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (OSError, EOFError, smtplib.SMTPException, imaplib.IMAP4.error,
                poplib.error_proto, AssertionError):  # fmt: skip
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.dovecot
def test_dovecot_restarted_during_sessions(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer
) -> None:
    dovecot.reset_mail()
    dovecot.deliver(READER, b"Subject: kept\r\n\r\nstill here after the restart\r\n")
    ca, host = dovecot.ca_path, dovecot.host
    proxy = run_proxy(
        config(
            [
                listener("IMAP", MailProtocol.IMAP, dovecot.imaps_port, UpstreamTLS.IMPLICIT,
                         ca, host=host),
                listener("POP", MailProtocol.POP3, dovecot.pop3_port, UpstreamTLS.STARTTLS,
                         ca, host=host),
            ],
            [app_account(idp, "@example.org")],
            catch_all=True,
        )
    )  # fmt: skip
    imap = imaplib.IMAP4("127.0.0.1", proxy.port("IMAP"), timeout=15)
    imap.login(READER, LOCAL_PASSWORD)
    assert imap.select("INBOX") == ("OK", [b"1"])
    pop = poplib.POP3("127.0.0.1", proxy.port("POP"), timeout=15)
    pop.user(READER)
    pop.pass_(LOCAL_PASSWORD)
    assert pop.stat()[0] == 1

    dovecot.restart()

    # the sessions in flight end with their connection
    with pytest.raises(imaplib.IMAP4.abort):  # EOF, or a reset if NOOP crossed the close
        imap.noop()
    imap.shutdown()
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        pop.stat()
    pop.close()

    def no_active_sessions() -> None:
        for name, protocol in (("IMAP", "imap"), ("POP", "pop3")):
            active = {"listener": name, "protocol": protocol}
            assert proxy.metric("mailwarden_active_connections", **active) == 0

    _eventually(no_active_sessions)

    # new sessions through the same proxy, once Dovecot is back
    def read_both() -> None:
        with imaplib.IMAP4("127.0.0.1", proxy.port("IMAP"), timeout=15) as again:
            again.login(READER, LOCAL_PASSWORD)
            assert again.select("INBOX") == ("OK", [b"1"])
            again.logout()
        pop3 = poplib.POP3("127.0.0.1", proxy.port("POP"), timeout=15)
        try:
            pop3.user(READER)
            pop3.pass_(LOCAL_PASSWORD)
            assert b"still here after the restart" in pop3.retr(1)[1]
        finally:
            pop3.quit()

    _eventually(read_both)


@pytest.mark.dovecot
@pytest.mark.postfix
def test_postfix_restarted_during_a_transaction(
    run_proxy: Any, idp: LocalIdP, dovecot: DovecotServer, postfix: PostfixServer
) -> None:
    dovecot.reset_mail()
    lst = listener(
        "SMTP", MailProtocol.SMTP, postfix.submission_port, UpstreamTLS.STARTTLS,
        dovecot.ca_path, host=postfix.host,
    )  # fmt: skip
    proxy = run_proxy(config([lst], [app_account(idp, "@example.org")], catch_all=True))
    port = proxy.port("SMTP")

    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15)
    smtp.login(SENDER, LOCAL_PASSWORD)
    assert smtp.mail(SENDER)[0] == 250
    assert smtp.rcpt(READER)[0] == 250

    restart_postfix(postfix)

    outcome: object
    try:
        outcome = smtp.data(b"Subject: interrupted\r\n\r\nnever delivered\r\n")
    except (OSError, smtplib.SMTPException) as exc:
        outcome = exc
    smtp.close()
    assert not (isinstance(outcome, tuple) and outcome[0] == 250), outcome

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as again:
            again.login(SENDER, LOCAL_PASSWORD)
            assert again.sendmail(SENDER, [READER], b"Subject: after\r\n\r\nrestarted\r\n") == {}

    _eventually(send)
    stored = dovecot.wait_for_messages(READER, 1, timeout=30)
    assert len(stored) == 1, postfix.log_tail()
    assert b"Subject: after" in stored[0]
    time.sleep(0.5)  # an interrupted message delivered late would show up now
    assert not any(b"interrupted" in m for m in dovecot.messages(READER))


def _mailaccount(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mailwarden.io/v1alpha1",
        "kind": "MailAccount",
        "metadata": {"name": name},
        "spec": {
            "provider": "microsoft",
            "username": f"{name}@contoso.com",
            "oauth2": {
                "flow": "clientCredentials",
                "clientId": "00000000-0000-0000-0000-000000000007",
                "tenantId": "contoso.onmicrosoft.com",
                "clientSecretRef": {"name": "app", "key": "client-secret"},
            },
            "imap": {},
            "smtp": {},
        },
    }


@pytest.mark.kube
def test_kube_apiserver_restarted_under_the_operator(
    kube: KubeCluster, operator_runner: OperatorRunner
) -> None:
    op = operator_runner
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "app"},
        "stringData": {"client-secret": "restart-secret"},
    }
    op.apply(secret, _mailaccount("before"))
    op.wait_for_condition("before", "ConfigRendered", "True", reason="Rendered")

    kube.restart_apiserver()  # killed, as in a crash: watches break without a goodbye

    # a new object and a change to an old one are both seen: the watches reconnected
    changed = _mailaccount("before")
    changed["spec"]["local"] = {"smtpPort": 2525}
    op.apply(_mailaccount("after"), changed)
    op.wait_for_condition("after", "ConfigRendered", "True", reason="Rendered", timeout=90)
    op.wait_for_condition("before", "ConfigRendered", "True", generation=2, timeout=30)
    assert op.secret("after-proxy") is not None
    op.check_alive()

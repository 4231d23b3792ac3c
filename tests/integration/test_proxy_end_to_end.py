"""Send through the proxy to Postfix, then read the same message back through the proxy
over IMAP and POP3 from Dovecot: the whole path an application uses, with real servers."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import time
from email.message import EmailMessage
from typing import Any

import pytest

from mailwarden_proxy.config.model import MailProtocol, UpstreamTLS
from mailwarden_proxy.demo.idp import LocalIdP
from tests.fixtures.dovecot import DovecotServer
from tests.fixtures.postfix import PostfixServer
from tests.integration.proxyconf import LOCAL_PASSWORD, app_account, config, listener

pytestmark = [pytest.mark.dovecot, pytest.mark.postfix]

SENDER = "app@example.org"
READER = "reader@example.org"


@pytest.mark.parametrize("smtp_tls", [UpstreamTLS.STARTTLS, UpstreamTLS.IMPLICIT])
def test_send_via_postfix_then_read_back_over_imap_and_pop3(
    run_proxy: Any,
    idp: LocalIdP,
    dovecot: DovecotServer,
    postfix: PostfixServer,
    smtp_tls: UpstreamTLS,
) -> None:
    dovecot.reset_mail()
    smtp_port = postfix.submission_port if smtp_tls is UpstreamTLS.STARTTLS else postfix.smtps_port
    ca = dovecot.ca_path
    proxy = run_proxy(
        config(
            [
                listener("SMTP", MailProtocol.SMTP, smtp_port, smtp_tls, ca, host=postfix.host),
                listener(
                    "IMAP",
                    MailProtocol.IMAP,
                    dovecot.imaps_port,
                    UpstreamTLS.IMPLICIT,
                    ca,
                    host=dovecot.host,
                ),
                listener(
                    "POP",
                    MailProtocol.POP3,
                    dovecot.pop3s_port,
                    UpstreamTLS.IMPLICIT,
                    ca,
                    host=dovecot.host,
                ),
            ],
            # one app registration, as with Microsoft's application permissions
            [app_account(idp, "@example.org")],
            catch_all=True,
        )
    )
    subject = f"end to end {time.monotonic_ns()}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, READER, subject
    message.set_content("through mailwarden, both ways\n")
    with smtplib.SMTP("127.0.0.1", proxy.port("SMTP"), timeout=30) as client:
        client.login(SENDER, LOCAL_PASSWORD)
        client.send_message(message)

    stored = dovecot.wait_for_messages(READER, 1, timeout=30)
    assert len(stored) == 1, postfix.log_tail()

    with imaplib.IMAP4("127.0.0.1", proxy.port("IMAP"), timeout=30) as imap:
        imap.login(READER, LOCAL_PASSWORD)
        imap.select("INBOX", readonly=True)
        typ, data = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and isinstance(data[0], tuple)
        assert subject.encode() in data[0][1]
        imap.logout()

    pop = poplib.POP3("127.0.0.1", proxy.port("POP"), timeout=30)
    try:
        pop.user(READER)
        pop.pass_(LOCAL_PASSWORD)
        _resp, lines, _octets = pop.retr(1)
        assert f"Subject: {subject}".encode() in lines
        assert b"through mailwarden, both ways" in lines
    finally:
        pop.quit()
    # one token served all three protocols and both mailboxes
    assert idp.request_count("client_credentials") == 1

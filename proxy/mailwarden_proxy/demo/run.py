"""`mailwarden-proxy demo`: the whole idea, on loopback, in one command.

It starts a local HTTPS identity provider (standing in for Microsoft's token endpoint),
a local submission server that accepts only XOAUTH2 with that provider's tokens, and the
proxy between them; then Python's smtplib sends one message through the proxy using
nothing but a username and a local password, as a legacy application would.
"""

from __future__ import annotations

import asyncio
import secrets
import smtplib
import tempfile
from email.message import EmailMessage
from pathlib import Path

from mailwarden_proxy.app import ProxyApp
from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Listener,
    MailProtocol,
    Metrics,
    OAuth2,
    ProviderKind,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.smtpd import LocalSubmissionServer
from mailwarden_proxy.demo.tlsca import LocalCA
from mailwarden_proxy.secret import Secret

MAILBOX = "app@demo.example"
TENANT = "demo-tenant"
CLIENT_ID = "demo-client"


def _say(step: str) -> None:
    print(f"==> {step}", flush=True)


def _send(port: int, password: str) -> None:
    message = EmailMessage()
    message["From"] = MAILBOX
    message["To"] = "someone@demo.example"
    message["Subject"] = "Hello from a legacy app"
    message.set_content("Sent with a plain username and password; the proxy did OAuth 2.0.")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.login(MAILBOX, password)
        client.send_message(message)


def _demo_config(idp: LocalIdP, ca_path: Path, smtp_port: int, local_password: str) -> ProxyConfig:
    client_secret = secrets.token_urlsafe(24)
    idp.register_client(CLIENT_ID, client_secret)
    return ProxyConfig(
        listeners=(
            Listener(
                name="SMTP-demo",
                protocol=MailProtocol.SMTP,
                upstream=Upstream(
                    "127.0.0.1", smtp_port, UpstreamTLS.STARTTLS, ca_file=str(ca_path)
                ),
                local_port=0,
            ),
        ),
        accounts=(
            Account(
                username=MAILBOX,
                local_password=Secret(local_password),
                oauth2=OAuth2(
                    provider=ProviderKind.MICROSOFT,
                    flow=Flow.CLIENT_CREDENTIALS,
                    token_url=idp.token_url(TENANT),
                    tenant_id=TENANT,
                    client_id=CLIENT_ID,
                    client_secret=Secret(client_secret),
                    scopes=("https://outlook.office365.com/.default",),
                    ca_file=str(ca_path),
                ),
            ),
        ),
        metrics=Metrics(port=0),
        source="demo",
    )


async def _run(workdir: Path) -> int:
    _say("creating a throwaway certificate authority for loopback TLS")
    ca = LocalCA(workdir)
    _say("starting a local HTTPS identity provider (stands in for login.microsoftonline.com)")
    with LocalIdP(ca.issue("idp"), ca.ca_path) as idp:
        _say("starting a local submission server that accepts XOAUTH2 only (STARTTLS)")
        smtpd = LocalSubmissionServer(idp.is_valid, tls="starttls", cert=ca.issue("smtpd"))
        with smtpd:
            local_password = secrets.token_urlsafe(16)
            config = _demo_config(idp, ca.ca_path, smtpd.port, local_password)
            app = ProxyApp(config)
            await app.start()
            try:
                port = app.server.bound_port("SMTP-demo")
                _say(f"proxy listening on 127.0.0.1:{port} (plain SMTP, local password only)")
                _say(f"smtplib: login({MAILBOX!r}, <local password>) and send one message")
                await asyncio.to_thread(_send, port, local_password)
            finally:
                await app.stop()
            registry = app.metrics.registry
            requests = registry.get_sample_value(
                "mailwarden_token_requests_total", {"account": MAILBOX, "result": "ok"}
            )
            expiry = registry.get_sample_value(
                "mailwarden_token_expiry_timestamp_seconds", {"account": MAILBOX}
            )
            logins = registry.get_sample_value(
                "mailwarden_logins_total",
                {"listener": "SMTP-demo", "protocol": "smtp", "result": "ok"},
            )
            received = smtpd.messages
            print()
            print(f"upstream received {len(received)} message(s) authenticated with XOAUTH2:")
            for item in received:
                print(f"  from {item.mail_from} to {', '.join(item.rcpt_tos)}: {item.subject!r}")
            print(f"token requests to the identity provider: {int(requests or 0)}")
            print(f"mailwarden_token_expiry_timestamp_seconds: {expiry}")
            print(f"mailwarden_logins_total{{protocol=smtp,result=ok}}: {int(logins or 0)}")
            ok = len(received) == 1
            print("demo " + ("succeeded" if ok else "FAILED"))
            return 0 if ok else 1


def run_demo() -> int:
    with tempfile.TemporaryDirectory(prefix="mailwarden-demo-") as workdir:
        return asyncio.run(_run(Path(workdir)))

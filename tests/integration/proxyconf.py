"""Builders for proxy configurations pointing at the test servers."""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

from mailwarden_proxy.config.model import (
    Account,
    Flow,
    Limits,
    Listener,
    LocalTLS,
    MailProtocol,
    Mechanism,
    Metrics,
    OAuth2,
    ProviderKind,
    ProxyConfig,
    Upstream,
    UpstreamTLS,
)
from mailwarden_proxy.demo.idp import LocalIdP
from mailwarden_proxy.demo.idp_grants import SECRET_MARKER, new_secret
from mailwarden_proxy.secret import Secret

# secrets carry the IdP's leak-scan marker (see tests/fixtures/secrets_scan.py)
LOCAL_PASSWORD = f"{SECRET_MARKER}-local-app-password"


def listener(
    name: str,
    protocol: MailProtocol,
    port: int,
    tls: UpstreamTLS,
    ca_path: Path,
    *,
    local_tls: LocalTLS = LocalTLS.NONE,
    cert: tuple[Path, Path] | None = None,
    host: str = "127.0.0.1",
) -> Listener:
    return Listener(
        name=name,
        protocol=protocol,
        upstream=Upstream(host, port, tls, ca_file=str(ca_path)),
        local_port=0,
        local_tls=local_tls,
        local_certificate=str(cert[0]) if cert else None,
        local_key=str(cert[1]) if cert else None,
    )


def app_account(
    idp: LocalIdP,
    username: str,
    *,
    password: str | None = LOCAL_PASSWORD,
    mechanism: Mechanism = Mechanism.XOAUTH2,
    provider: ProviderKind = ProviderKind.MICROSOFT,
    tenant: str = "tenant-a",
) -> Account:
    """A client-credentials account (app-only token valid for any mailbox)."""
    client_id = f"client-{secrets.token_hex(4)}"
    client_secret = new_secret(16)
    idp.register_client(client_id, client_secret)
    return Account(
        username=username,
        local_password=Secret(password) if password is not None else None,
        mechanism=mechanism,
        oauth2=OAuth2(
            provider=provider,
            flow=Flow.CLIENT_CREDENTIALS,
            token_url=idp.token_url(tenant),
            tenant_id=tenant,
            client_id=client_id,
            client_secret=Secret(client_secret),
            scopes=("https://outlook.office365.com/.default",),
            ca_file=str(idp.ca_path),
        ),
    )


def refresh_account(idp: LocalIdP, username: str, **kwargs: object) -> Account:
    """A delegated account holding a refresh token for `username`."""
    account = app_account(idp, username, **kwargs)  # type: ignore[arg-type]
    refresh_token = idp.issue_refresh_token(username, account.oauth2.client_id)
    oauth2 = replace(
        account.oauth2,
        flow=Flow.REFRESH_TOKEN,
        refresh_token=Secret(refresh_token),
        scopes=("https://outlook.office365.com/IMAP.AccessAsUser.All", "offline_access"),
    )
    return replace(account, oauth2=oauth2)


def config(
    listeners: list[Listener],
    accounts: list[Account],
    *,
    catch_all: bool = False,
    limits: Limits | None = None,
) -> ProxyConfig:
    return ProxyConfig(
        listeners=tuple(listeners),
        accounts=tuple(accounts),
        metrics=Metrics(port=0),
        limits=limits or Limits(login_timeout=30),
        allow_catch_all_accounts=catch_all,
        source="test",
    )

"""The three ways a client reaches the same mailbox, as picklable descriptions.

- direct: the client itself gets a token from the IdP and speaks XOAUTH2 over TLS to
  Dovecot / aiosmtpd (what an OAuth-aware application does: the floor to compare with);
- mailwarden: plain IMAP/SMTP with the local password to `mailwarden-proxy` on loopback;
- emailproxy: the same, to the incumbent `emailproxy` from PyPI.

The worker process receives an `Endpoint` and needs nothing else to connect and log in.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bench.servers import ClientCredentials


class PathName(StrEnum):
    DIRECT = "direct"
    MAILWARDEN = "mailwarden"
    EMAILPROXY = "emailproxy"


PATHS = (PathName.DIRECT, PathName.MAILWARDEN, PathName.EMAILPROXY)
PROXIES = (PathName.MAILWARDEN, PathName.EMAILPROXY)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to log in. `token` is set for direct paths (XOAUTH2 over TLS),
    `password` for proxied ones (plain LOGIN / AUTH PLAIN on loopback)."""

    host: str
    port: int
    username: str
    tls: str  # "implicit" | "starttls" | "none"
    ca_path: str | None = None
    token: str | None = None
    password: str | None = None
    # direct cold burst only: the client must fetch its own token inside the timing
    credentials: ClientCredentials | None = None

    @property
    def direct(self) -> bool:
        return self.password is None


@dataclass(frozen=True)
class PathEndpoints:
    imap: Endpoint
    smtp: Endpoint

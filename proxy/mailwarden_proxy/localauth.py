"""Local passwords: what the application must present to the proxy.

Native configurations carry an explicit password per account, compared in constant
time. emailproxy files carry none: there, the password of an account's first
successful login becomes its local password (emailproxy's meaning). We keep only an
HMAC of it under a per-process random key, so a check costs one HMAC, not the
1.2-million-iteration PBKDF2 emailproxy runs on every login, and nothing reversible
sits in memory.

Every check compares two HMACs of the same length with `hmac.compare_digest`, explicit
passwords included: comparing the passwords themselves would let the time taken tell
their lengths apart. An unknown username costs the same comparison, so timing does not
tell which usernames exist either.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

from mailwarden_proxy.config.model import Account


class Verdict(Enum):
    ACCEPT = "accept"
    # no password recorded yet: accept, and record it once upstream login succeeded
    ACCEPT_FIRST_USE = "accept_first_use"
    REJECT = "reject"


class LocalPasswords:
    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._learned: dict[str, bytes] = {}  # lower-cased username -> HMAC(password)
        self._nobody = self._digest(secrets.token_urlsafe(32))  # what unknown users "have"

    def _digest(self, password: str) -> bytes:
        return hmac.new(self._key, password.encode(), hashlib.sha256).digest()

    def verify(self, account: Account | None, username: str, password: str) -> Verdict:
        """`account` is None for a username no account serves: always REJECT."""
        if account is None:
            hmac.compare_digest(self._nobody, self._digest(password))
            return Verdict.REJECT
        if account.local_password is not None:
            expected = self._digest(account.local_password.reveal())
        else:
            learned = self._learned.get(username.lower())
            if learned is None:
                return Verdict.ACCEPT_FIRST_USE
            expected = learned
        ok = hmac.compare_digest(expected, self._digest(password))
        return Verdict.ACCEPT if ok else Verdict.REJECT

    def learn(self, username: str, password: str) -> None:
        """Record the first successfully used password; later different ones are refused."""
        self._learned.setdefault(username.lower(), self._digest(password))

"""Local password checks compare fixed-length HMACs in constant time, whatever the input."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.localauth import LocalPasswords, Verdict
from mailwarden_proxy.secret import Secret

OAUTH = OAuth2(ProviderKind.GENERIC, Flow.CLIENT_CREDENTIALS, "https://idp.example/token")
EXPLICIT = Account("a@example.com", OAUTH, local_password=Secret("the-right-local-password"))
LEARNED = Account("@", OAUTH)  # emailproxy meaning: learned at the first login


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The lengths of what each check handed to hmac.compare_digest."""
    seen: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        seen.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module localauth calls through
    return seen


@pytest.mark.parametrize("password", ["", "x", "the-right-local-password", "y" * 10_000])
def test_every_check_compares_two_digests_of_one_length(
    compared: list[tuple[int, int]], password: str
) -> None:
    passwords = LocalPasswords()
    passwords.learn("b@example.com", "learned-password")
    passwords.verify(EXPLICIT, "a@example.com", password)
    passwords.verify(LEARNED, "b@example.com", password)
    passwords.verify(None, "nobody@example.com", password)  # unknown user: same work
    assert compared == [(32, 32)] * 3


def test_verdicts() -> None:
    passwords = LocalPasswords()
    assert passwords.verify(EXPLICIT, "a@example.com", "the-right-local-password") is Verdict.ACCEPT
    assert passwords.verify(EXPLICIT, "a@example.com", "the-right-local-passwor") is Verdict.REJECT
    assert passwords.verify(None, "a@example.com", "the-right-local-password") is Verdict.REJECT

"""Local password checks, log redaction, and the health endpoint's routes."""

from __future__ import annotations

import asyncio
import json
import logging

from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.health import HealthServer
from mailwarden_proxy.localauth import LocalPasswords, Verdict
from mailwarden_proxy.logsetup import JsonFormatter, RedactingFilter, redact
from mailwarden_proxy.metrics import ProxyMetrics
from mailwarden_proxy.secret import Secret

OAUTH = OAuth2(ProviderKind.GENERIC, Flow.CLIENT_CREDENTIALS, "https://idp.example/token")


def test_explicit_local_password() -> None:
    passwords = LocalPasswords()
    account = Account("a@example.com", OAUTH, local_password=Secret("right"))
    assert passwords.verify(account, "a@example.com", "right") is Verdict.ACCEPT
    assert passwords.verify(account, "a@example.com", "wrong") is Verdict.REJECT
    assert passwords.verify(account, "a@example.com", "") is Verdict.REJECT


def test_first_successful_password_is_learned_per_mailbox() -> None:
    passwords = LocalPasswords()
    catch_all = Account("@", OAUTH)  # emailproxy files carry no local password
    assert passwords.verify(catch_all, "a@x", "one") is Verdict.ACCEPT_FIRST_USE
    assert passwords.verify(catch_all, "a@x", "two") is Verdict.ACCEPT_FIRST_USE
    passwords.learn("A@x", "one")  # upstream login succeeded with "one"
    passwords.learn("a@x", "two")  # a later success can't replace it
    assert passwords.verify(catch_all, "a@X", "one") is Verdict.ACCEPT
    assert passwords.verify(catch_all, "a@x", "two") is Verdict.REJECT
    assert passwords.verify(catch_all, "b@x", "two") is Verdict.ACCEPT_FIRST_USE


def test_learned_passwords_are_not_kept_in_clear() -> None:
    passwords = LocalPasswords()
    passwords.learn("a@x", "hunter2-very-secret")
    assert "hunter2-very-secret" not in repr(vars(passwords))


def test_secret_repr_is_masked() -> None:
    assert "s3cr3t" not in repr(Secret("s3cr3t")) + str(Secret("s3cr3t"))


def test_redaction_of_bearer_tokens_and_json_fields() -> None:
    text = redact('auth=Bearer ya29.abc\x01 {"access_token": "eyJhbGciOi", "refresh_token":"r1"}')
    assert "ya29.abc" not in text and "eyJhbGciOi" not in text and '"r1"' not in text
    assert redact("client_secret=abc&grant_type=client_credentials").startswith(
        "client_secret=****&grant_type"
    )


def test_json_log_lines_are_redacted() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "got %s", ("Bearer tok123",), None)
    record.peer = "127.0.0.1:5"
    RedactingFilter().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "got Bearer ****"
    assert entry["peer"] == "127.0.0.1:5"


def test_health_routes() -> None:
    async def scenario() -> list[bytes]:
        ready = False
        server = HealthServer(ProxyMetrics(), lambda: ready, "127.0.0.1", 0)
        await server.start()
        replies = []
        for index, path in enumerate(("/healthz", "/readyz", "/readyz", "/metrics", "/nope")):
            ready = index >= 2  # listeners bound after the first readiness probe
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            replies.append(await reader.read())
            writer.close()
        await server.stop()
        return replies

    healthz, not_ready, ready, metrics, missing = asyncio.run(scenario())
    assert healthz.startswith(b"HTTP/1.0 200")
    assert not_ready.startswith(b"HTTP/1.0 503")
    assert ready.startswith(b"HTTP/1.0 200")
    assert b"mailwarden_logins_total" in metrics
    assert missing.startswith(b"HTTP/1.0 404")

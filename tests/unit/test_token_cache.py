"""TokenBroker (single-flight, forced and proactive refresh, negative cache) and the
error mapping, with a fake provider: no network."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import requests

from mailwarden_proxy.config.model import Account, Flow, OAuth2, ProviderKind
from mailwarden_proxy.secret import Secret
from mailwarden_proxy.tokens import errors
from mailwarden_proxy.tokens.base import (
    AccessToken,
    PermanentTokenError,
    TemporaryTokenError,
    TokenError,
)
from mailwarden_proxy.tokens.cache import TokenBroker, token_key

SECRET = "s3cr3t-value-that-must-not-leak"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def account(
    flow: Flow = Flow.CLIENT_CREDENTIALS,
    username: str = "box@example.org",
    subject: str | None = None,
) -> Account:
    return Account(
        username,
        OAuth2(
            ProviderKind.GENERIC,
            flow,
            "https://idp.invalid/token",
            "cid",
            Secret(SECRET),
            subject=subject,
        ),
    )


class FakeProvider:
    def __init__(self, lifetime: float = 3600.0, delay: float = 0.0) -> None:
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.fail: TokenError | Exception | None = None
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def fetch(self, username: str) -> AccessToken:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return AccessToken(Secret(f"token-{next(self._counter)}"), time.time() + self.lifetime)


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.expiry: list[float] = []

    def token_request(self, account: str, result: str, seconds: float) -> None:
        self.requests.append((account, result))

    def token_expiry_set(self, account: str, expires_at: float) -> None:
        self.expiry.append(expires_at)


def broker_for(provider: FakeProvider, **kwargs: Any) -> TokenBroker:
    factory: Callable[[Account], Any] = lambda _account: provider  # noqa: E731
    return TokenBroker(factory, **kwargs)


def test_single_flight_100_concurrent_callers_make_one_fetch() -> None:
    provider = FakeProvider(delay=0.2)

    async def scenario() -> list[AccessToken]:
        broker = broker_for(provider)
        try:
            return await asyncio.gather(
                *(broker.get(account(), "box@example.org") for _ in range(100))
            )
        finally:
            await broker.close()

    tokens = run(scenario())
    assert provider.calls == 1
    assert {t.value.reveal() for t in tokens} == {"token-1"}


def test_cached_token_is_reused() -> None:
    provider = FakeProvider()

    async def scenario() -> None:
        broker = broker_for(provider)
        first = await broker.get(account(), "box@example.org")
        second = await broker.get(account(), "box@example.org")
        assert first is second
        await broker.close()

    run(scenario())
    assert provider.calls == 1


def test_force_refresh_burst_replaces_the_stale_token_once() -> None:
    provider = FakeProvider(delay=0.05)

    async def scenario() -> None:
        broker = broker_for(provider)
        stale = await broker.get(account(), "box@example.org")
        fresh = await asyncio.gather(
            *(
                broker.get(account(), "box@example.org", force_refresh=True, stale=stale)
                for _ in range(50)
            )
        )
        assert {t.value.reveal() for t in fresh} == {"token-2"}
        # a late 401 for the old token must not cause another fetch
        late = await broker.get(account(), "box@example.org", force_refresh=True, stale=stale)
        assert late.value.reveal() == "token-2"
        await broker.close()

    run(scenario())
    assert provider.calls == 2


def test_proactive_refresh_before_expiry() -> None:
    provider = FakeProvider(lifetime=1.0)

    async def scenario() -> None:
        broker = broker_for(provider, refresh_margin_min=0.3)
        first = await broker.get(account(), "box@example.org")
        await asyncio.sleep(0.9)  # refresh due at 0.7 s
        assert provider.calls == 2
        calls = provider.calls
        second = await broker.get(account(), "box@example.org")
        assert second.value.reveal() != first.value.reveal()
        assert provider.calls == calls  # served from the cache, no fetch on the login path
        await broker.close()

    run(scenario())


def test_failed_proactive_refresh_keeps_the_old_token() -> None:
    provider = FakeProvider(lifetime=1.5)

    async def scenario() -> None:
        broker = broker_for(provider, refresh_margin_min=0.7, retry_min=0.1)
        first = await broker.get(account(), "box@example.org")
        provider.fail = TemporaryTokenError("server_error", "down")
        await asyncio.sleep(1.0)
        assert provider.calls >= 2  # it tried (and retried)
        assert await broker.get(account(), "box@example.org") is first
        await broker.close()

    run(scenario())


def test_failures_are_logged_once_diagnosed(caplog: pytest.LogCaptureFixture) -> None:
    """A failure a login waits for is the login's to report (the session logs it with
    its diagnosis); a failed refresh ahead of expiry has nobody else to say it."""
    provider = FakeProvider(lifetime=1.5)
    provider.fail = PermanentTokenError("invalid_grant", "AADSTS50173: grant expired")
    caplog.set_level("DEBUG", logger="mailwarden_proxy.tokens.cache")

    def ours() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "mailwarden_proxy.tokens.cache"]

    async def on_login() -> None:
        broker = broker_for(provider)
        with pytest.raises(PermanentTokenError):
            await broker.get(account(), "box@example.org")
        await broker.close()

    run(on_login())
    assert [r.levelname for r in ours()] == ["DEBUG"]
    caplog.clear()

    async def ahead_of_expiry() -> None:
        provider.fail = None
        broker = broker_for(provider, refresh_margin_min=0.7, retry_min=5)
        await broker.get(account(), "box@example.org")
        provider.fail = TemporaryTokenError("server_error", "HTTP 503")
        await asyncio.sleep(1.0)
        await broker.close()

    run(ahead_of_expiry())
    [warning] = [r for r in ours() if r.levelname == "WARNING"]
    text = warning.getMessage()
    assert "ahead of its expiry" in text and "server_error: HTTP 503" in text
    assert "Fix:" in text and "serves logins until it expires" in text
    assert warning.__dict__["event"] == "token_refresh_failed"


def test_idle_keys_are_not_refreshed() -> None:
    provider = FakeProvider(lifetime=0.6)

    async def scenario() -> None:
        broker = broker_for(provider, refresh_margin_min=0.2, idle_after=0.1)
        await broker.get(account(), "box@example.org")
        await asyncio.sleep(0.8)
        await broker.close()

    run(scenario())
    assert provider.calls == 1


def test_negative_cache_limits_requests_while_the_idp_fails() -> None:
    provider = FakeProvider()
    provider.fail = TemporaryTokenError("server_error", "HTTP 500")
    recorder = Recorder()

    async def scenario() -> None:
        broker = broker_for(provider, negative_ttl=0.3, observer=recorder)
        for _ in range(10):
            with pytest.raises(TemporaryTokenError):
                await broker.get(account(), "box@example.org")
        assert provider.calls == 1
        await asyncio.sleep(0.35)
        provider.fail = None
        token = await broker.get(account(), "box@example.org")
        assert token.value.reveal() == "token-1"
        await broker.close()

    run(scenario())
    assert provider.calls == 2
    assert recorder.requests == [("box@example.org", "server_error"), ("box@example.org", "ok")]
    assert len(recorder.expiry) == 1


def test_permanent_errors_propagate_and_are_counted() -> None:
    provider = FakeProvider()
    provider.fail = PermanentTokenError("invalid_grant", "AADSTS70000: bad grant")
    recorder = Recorder()

    async def scenario() -> None:
        broker = broker_for(provider, observer=recorder)
        with pytest.raises(PermanentTokenError) as caught:
            await broker.get(account(), "box@example.org")
        assert caught.value.code == "invalid_grant"
        await broker.close()

    run(scenario())
    assert recorder.requests == [("box@example.org", "invalid_grant")]


def test_a_provider_bug_becomes_a_temporary_error_without_its_text() -> None:
    provider = FakeProvider()
    provider.fail = RuntimeError(f"boom {SECRET}")

    async def scenario() -> None:
        broker = broker_for(provider)
        with pytest.raises(TemporaryTokenError) as caught:
            await broker.get(account(), "box@example.org")
        assert SECRET not in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        await broker.close()

    run(scenario())


def test_a_cancelled_caller_does_not_cancel_the_fetch_for_others() -> None:
    provider = FakeProvider(delay=0.2)

    async def scenario() -> None:
        broker = broker_for(provider)
        first = asyncio.create_task(broker.get(account(), "box@example.org"))
        second = asyncio.create_task(broker.get(account(), "box@example.org"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).value.reveal() == "token-1"
        await broker.close()

    run(scenario())
    assert provider.calls == 1


def test_close_cancels_background_refresh() -> None:
    provider = FakeProvider(lifetime=0.5)

    async def scenario() -> None:
        broker = broker_for(provider, refresh_margin_min=0.1)
        await broker.get(account(), "box@example.org")
        await broker.close()
        await asyncio.sleep(0.6)
        with pytest.raises(TemporaryTokenError):
            await broker.get(account(), "box@example.org")

    run(scenario())
    assert provider.calls == 1


def test_token_keys() -> None:
    shared = account(Flow.CLIENT_CREDENTIALS, "@example.org")
    assert token_key(shared, "a@example.org") == token_key(shared, "b@example.org")
    per_user = account(Flow.SERVICE_ACCOUNT, "@example.org")
    assert token_key(per_user, "a@example.org") != token_key(per_user, "b@example.org")
    assert token_key(per_user, "A@example.org") == token_key(per_user, "a@example.org")
    fixed = account(Flow.SERVICE_ACCOUNT, "@example.org", subject="robot@example.org")
    assert token_key(fixed, "a@example.org") == token_key(fixed, "b@example.org")
    assert token_key(account(Flow.REFRESH_TOKEN), "box@example.org")[1] is None


# -- error mapping ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"error": "invalid_grant"}, PermanentTokenError),
        ({"error": "invalid_client"}, PermanentTokenError),
        ({"error": "unauthorized_client"}, PermanentTokenError),
        ({"error": "invalid_scope"}, PermanentTokenError),
        ({"error": "interaction_required"}, PermanentTokenError),
        ({"error": "consent_required"}, PermanentTokenError),
        ({"error": "temporarily_unavailable"}, TemporaryTokenError),
        ({"error": "slow_down"}, TemporaryTokenError),
        ({"error": "authorization_pending"}, TemporaryTokenError),
        ({"error": "something_new"}, TemporaryTokenError),
    ],
)
def test_oauth_error_codes(body: dict[str, Any], kind: type[TokenError]) -> None:
    error = errors.from_oauth_error(body)
    assert type(error) is kind
    assert error.code == body["error"]


def test_aadsts_number_is_kept_and_trace_ids_dropped() -> None:
    body = {
        "error": "invalid_client",
        "error_description": "Invalid client secret provided.\r\nTrace ID: 1\r\nCorrelation ID: 2",
        "error_codes": [7000215],
    }
    error = errors.from_oauth_error(body, 401)
    assert isinstance(error, PermanentTokenError)
    assert error.description == "AADSTS7000215: Invalid client secret provided."


@pytest.mark.parametrize(
    ("status", "text", "kind", "code"),
    [
        (500, "<html>oops</html>", TemporaryTokenError, "server_error"),
        (503, '{"error": "invalid_grant"}', TemporaryTokenError, "server_error"),
        (429, "slow down", TemporaryTokenError, "throttled"),
        (
            400,
            '{"error": "invalid_grant", "error_description": "AADSTS70000: x"}',
            PermanentTokenError,
            "invalid_grant",
        ),
        (401, "nope", PermanentTokenError, "http_401"),
    ],
)
def test_http_statuses(status: int, text: str, kind: type[TokenError], code: str) -> None:
    error = errors.from_http(status, text)
    assert type(error) is kind
    assert error.code == code


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (requests.exceptions.ConnectTimeout(), "timeout"),
        (requests.exceptions.ReadTimeout(), "timeout"),
        (requests.exceptions.SSLError(), "tls"),
        (requests.exceptions.ConnectionError(), "connection"),
    ],
)
def test_transport_errors_are_temporary(exc: Exception, code: str) -> None:
    error = errors.from_exception(exc)
    assert isinstance(error, TemporaryTokenError)
    assert error.code == code


def test_secrets_are_scrubbed_from_echoed_bodies() -> None:
    body = (
        f'{{"error": "invalid_request", "error_description": "bad request: '
        f'client_secret={SECRET}&refresh_token={SECRET}&assertion={SECRET}", '
        f'"access_token": "{SECRET}"}}'
    )
    for error in (errors.from_http(400, body), errors.from_http(500, body)):
        assert SECRET not in str(error)
        assert SECRET not in error.description
    assert SECRET not in errors.scrub(f"password: {SECRET}, code={SECRET}")
    assert "client_secret=****" in errors.scrub(f"client_secret={SECRET}")


def test_secret_never_in_str_of_token_errors() -> None:
    error = errors.from_oauth_error(
        {
            "error": "invalid_grant",
            "error_description": f"refresh_token {SECRET!r} refused: refresh_token={SECRET}",
        }
    )
    assert SECRET not in str(error)
    assert SECRET not in repr(AccessToken(Secret(SECRET), 0.0))

"""The access-token broker: an in-memory cache with single-flight and proactive refresh.

Why each rule is there:

* **Single-flight.** A burst of logins for one key awaits one fetch (emailproxy made a
  token request per concurrent cold login and lost most of them). The fetch runs as its
  own task, shielded from its callers, so a client hanging up doesn't cancel it for the
  others.
* **Keys.** Tokens are shared as widely as they are valid: per account section for flows
  whose token doesn't depend on who logged in (client credentials, a refresh token, a
  service account with a fixed `subject`); per (account, mailbox) when the provider mints
  one per mailbox (service account impersonating each login of a catch-all, ROPC).
* **Forced refresh after an upstream 401.** Callers pass the token that was refused
  (`stale`); it is replaced only if it is still the cached one, so a burst of 401s
  causes one refresh, not one each.
* **Proactive refresh.** While a key is in use, a background task fetches the next token
  `margin` before expiry (10 % of the lifetime, within 30 s..5 min, never more than half
  the lifetime); on failure the old token keeps serving until it expires and the task
  retries with backoff. Keys idle for `idle_after` seconds are not refreshed: their next
  login fetches on demand.
* **Short negative cache.** A failure is remembered for `negative_ttl` (1.5 s): when the
  identity provider is down, a login storm makes one request per key per 1.5 s instead
  of one per login, yet recovery is noticed almost at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from mailwarden_proxy.catalogue import diagnose_token_error
from mailwarden_proxy.config.model import Account, Flow
from mailwarden_proxy.tokens.base import AccessToken, TemporaryTokenError, TokenError, TokenProvider

log = logging.getLogger(__name__)

TokenKey = tuple[Account, str | None]  # (account section, mailbox or None when shared)


class TokenObserver(Protocol):
    """Metrics hooks (`metrics.ProxyMetrics` implements them); `account` is the account
    section's username (`@domain` for a catch-all), `result` "ok" or the error code
    (`invalid_grant`, `server_error`, `timeout`, ...: a small, bounded set)."""

    def token_request(self, account: str, result: str, seconds: float) -> None: ...

    def token_expiry_set(self, account: str, expires_at: float) -> None: ...


class NullObserver:
    def token_request(self, account: str, result: str, seconds: float) -> None:
        pass

    def token_expiry_set(self, account: str, expires_at: float) -> None:
        pass


def token_key(account: Account, username: str) -> TokenKey:
    """The cache key for `username` logging in through `account` (see the module doc)."""
    oauth2 = account.oauth2
    per_mailbox = oauth2.flow is Flow.PASSWORD or (
        oauth2.flow is Flow.SERVICE_ACCOUNT and not oauth2.subject
    )
    if per_mailbox and account.is_catch_all and not account.upstream_username:
        return account, username.lower()
    return account, None


@dataclass
class _Entry:
    token: AccessToken | None = None
    fetched_at: float = 0.0
    last_used: float = 0.0
    inflight: asyncio.Task[AccessToken] | None = None
    error: TokenError | None = None
    error_until: float = 0.0
    refresher: asyncio.Task[None] | None = None
    username: str = ""  # the latest login, for the background refresh


class TokenBroker:
    def __init__(
        self,
        provider_factory: Callable[[Account], TokenProvider] | None = None,
        *,
        observer: TokenObserver | None = None,
        negative_ttl: float = 1.5,
        refresh_fraction: float = 0.1,
        refresh_margin_min: float = 30.0,
        refresh_margin_max: float = 300.0,
        idle_after: float = 900.0,
        retry_min: float = 2.0,
        retry_max: float = 60.0,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if provider_factory is None:
            from mailwarden_proxy.tokens.factory import provider_for

            provider_factory = provider_for
        self._factory = provider_factory
        self._observer: TokenObserver = observer or NullObserver()
        self._negative_ttl = negative_ttl
        self._fraction = refresh_fraction
        self._margin_min = refresh_margin_min
        self._margin_max = refresh_margin_max
        self._idle_after = idle_after
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._clock = clock
        self._entries: dict[TokenKey, _Entry] = {}
        self._providers: dict[Account, TokenProvider] = {}
        # blocking providers run here, not on the event loop; a few threads are enough
        # since each key has at most one fetch in flight
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="mailwarden-token")
        self._closed = False

    # -- public ----------------------------------------------------------------------
    async def get(
        self,
        account: Account,
        username: str,
        *,
        force_refresh: bool = False,
        stale: AccessToken | None = None,
    ) -> AccessToken:
        """A usable access token for `username` through `account`. Raises TokenError.

        `force_refresh=True` (after the upstream refused a token) fetches a new one unless
        the cached token already differs from `stale` (someone else refreshed it).
        """
        if self._closed:
            raise TemporaryTokenError("shutting_down", "the token broker is closed")
        key = token_key(account, username)
        entry = self._entries.setdefault(key, _Entry())
        now = self._clock()
        entry.last_used = now
        entry.username = username
        token = entry.token
        if token is not None and self._usable(entry, token, now):
            if not force_refresh:
                return token
            if stale is not None and not _same(token, stale):
                return token  # already replaced since the caller's attempt
        if entry.inflight is None and entry.error is not None and now < entry.error_until:
            raise entry.error
        return await self._fetch(key, entry, username)

    def peek(self, account: Account, username: str) -> AccessToken | None:
        """The cached token without fetching (for status reporting)."""
        entry = self._entries.get(token_key(account, username))
        return entry.token if entry is not None else None

    def invalidate(self, account: Account | None = None) -> None:
        """Forget tokens (all, or one account's), e.g. after a configuration reload."""
        for key in [k for k in self._entries if account is None or k[0] == account]:
            entry = self._entries.pop(key)
            if entry.refresher is not None:
                entry.refresher.cancel()
        for acct in [a for a in self._providers if account is None or a == account]:
            _close_provider(self._providers.pop(acct))

    def provider(self, account: Account) -> TokenProvider:
        """The (shared) provider of `account`, created on first use."""
        provider = self._providers.get(account)
        if provider is None:
            provider = self._providers[account] = self._factory(account)
        return provider

    async def close(self) -> None:
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [
            e.refresher for e in self._entries.values() if e.refresher is not None
        ]
        tasks += [e.inflight for e in self._entries.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for provider in self._providers.values():
            _close_provider(provider)
        self._providers.clear()
        self._entries.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- internals -------------------------------------------------------------------
    def _usable(self, entry: _Entry, token: AccessToken, now: float) -> bool:
        # a few seconds of slack so a token doesn't expire between here and the upstream
        lifetime = max(token.expires_at - entry.fetched_at, 0.0)
        return now < token.expires_at - min(5.0, lifetime * 0.1)

    def _margin(self, lifetime: float) -> float:
        margin = min(max(lifetime * self._fraction, self._margin_min), self._margin_max)
        return min(margin, lifetime / 2)

    async def _fetch(
        self, key: TokenKey, entry: _Entry, username: str, *, background: bool = False
    ) -> AccessToken:
        if entry.inflight is None:
            task = asyncio.create_task(self._run_fetch(key, entry, username, background))
            # mark the outcome retrieved: if every waiter went away, asyncio would
            # otherwise log "exception was never retrieved"
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            entry.inflight = task
        # shield: one caller's cancellation must not cancel the fetch the others await
        return await asyncio.shield(entry.inflight)

    async def _run_fetch(
        self, key: TokenKey, entry: _Entry, username: str, background: bool
    ) -> AccessToken:
        account = key[0]
        label = account.username
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            provider = self.provider(account)
            token = await loop.run_in_executor(self._executor, provider.fetch, username)
        except TokenError as exc:
            self._failed(entry, label, exc, time.monotonic() - started, background)
            raise
        except Exception as exc:  # a provider bug: keep its text (maybe secret) out
            log.error("token provider for %s raised %s", label, type(exc).__name__)
            error = TemporaryTokenError("provider_error", type(exc).__name__)
            self._failed(entry, label, error, time.monotonic() - started, background)
            raise error from None
        finally:
            entry.inflight = None
        seconds = time.monotonic() - started
        entry.token, entry.fetched_at, entry.error = token, self._clock(), None
        self._observer.token_request(label, "ok", seconds)
        self._observer.token_expiry_set(label, token.expires_at)
        log.debug("new token for %s, valid %.0f s", label, token.expires_at - entry.fetched_at)
        if entry.refresher is None or entry.refresher.done():
            entry.refresher = asyncio.create_task(self._refresh_loop(key, entry))
        return token

    def _failed(
        self, entry: _Entry, label: str, error: TokenError, seconds: float, background: bool
    ) -> None:
        entry.error, entry.error_until = error, self._clock() + self._negative_ttl
        self._observer.token_request(label, error.code, seconds)
        if not background:  # a login waits for it and logs the failure, diagnosed, once
            log.debug("token request for %s failed: %s", label, error)
            return
        diagnosis = diagnose_token_error(error.code, error.description, username=label)
        logger = log.warning if error.temporary else log.error
        logger(
            "refreshing the token of %s ahead of its expiry failed: %s (%s). %s Fix: %s "
            "The current token serves logins until it expires.",
            label,
            diagnosis.reason,
            error,
            diagnosis.entry.cause,
            diagnosis.entry.fix,
            extra={"event": "token_refresh_failed", "reason": diagnosis.reason},
        )

    async def _refresh_loop(self, key: TokenKey, entry: _Entry) -> None:
        """Keeps the key's token fresh while the key is in use (see the module doc)."""
        retry = self._retry_min
        while not self._closed and self._entries.get(key) is entry and entry.token is not None:
            token = entry.token
            lifetime = max(token.expires_at - entry.fetched_at, 0.0)
            due = token.expires_at - self._margin(lifetime)
            now = self._clock()
            if due > now:
                await asyncio.sleep(due - now)
                continue  # re-read: a forced refresh may have replaced the token meanwhile
            if now - entry.last_used > self._idle_after or now >= token.expires_at:
                return  # idle, or too late to matter: the next login fetches on demand
            try:
                await self._fetch(key, entry, entry.username or key[0].username, background=True)
                retry = self._retry_min
            except TokenError:
                # the old token keeps serving; try again, but not after it expired
                wait = min(retry, max(token.expires_at - self._clock(), 0.0))
                retry = min(retry * 2, self._retry_max)
                if wait <= 0:
                    return
                await asyncio.sleep(wait)


def _same(a: AccessToken, b: AccessToken) -> bool:
    return a is b or a.value.equals(b.value.reveal())


def _close_provider(provider: TokenProvider) -> None:
    close = getattr(provider, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing a token provider failed")

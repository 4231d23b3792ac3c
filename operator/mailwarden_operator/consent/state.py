"""The OAuth 2.0 `state` values of consent flows in progress.

A `state` binds the browser that comes back to `/oauth2/callback` to the MailAccount whose
sign-in it started, and carries the PKCE verifier for the code exchange. It is random,
single-use and short-lived (RFC 6749 §10.12, RFC 9700 §4.7). States live in this process's
memory only: a flow started before an operator restart has to be started again, which costs
a person one click, while persisting verifiers would put secrets at rest for nothing.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden_operator.consent.pkce import Pkce

DEFAULT_TTL = 600.0  # seconds; long enough for a sign-in with MFA, short enough to be useless later
DEFAULT_CAPACITY = 1000  # pending flows kept; the oldest go first so a flood can't eat memory


class StateProblem(StrEnum):
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    REPLAYED = "replayed"


class StateError(Exception):
    """The callback's `state` can't be accepted; `problem` says why (for the 400 page)."""

    def __init__(self, problem: StateProblem) -> None:
        self.problem = problem
        super().__init__(f"state {problem.value}")


@dataclass(frozen=True)
class PendingConsent:
    """One sign-in started from the consent page."""

    namespace: str
    name: str
    uid: str
    redirect_uri: str
    pkce: Pkce = field(repr=False)
    expires_at: float = 0.0


class StateStore:
    """Thread-safe; `clock` is injectable so expiry is testable without sleeping."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, PendingConsent] = OrderedDict()
        # States that can no longer be used are remembered for one more TTL, so that a
        # late or repeated callback gets its own answer ("expired", "already used")
        # instead of the vaguer "unknown": {state: (forget after, problem)}.
        self._spent: OrderedDict[str, tuple[float, StateProblem]] = OrderedDict()

    def issue(self, namespace: str, name: str, uid: str, redirect_uri: str) -> tuple[str, Pkce]:
        """A new state and PKCE pair for a sign-in of MailAccount `namespace/name`."""
        state = secrets.token_urlsafe(32)
        pkce = Pkce.new()
        with self._lock:
            now = self._clock()
            self._purge(now)
            self._pending[state] = PendingConsent(
                namespace, name, uid, redirect_uri, pkce, now + self.ttl
            )
            while len(self._pending) > self._capacity:
                self._pending.popitem(last=False)
        return state, pkce

    def consume(self, state: str) -> PendingConsent:
        """The flow `state` belongs to, removed so it can't be used twice; StateError if it
        is unknown, expired or already used."""
        with self._lock:
            now = self._clock()
            self._purge(now)
            pending = self._pending.pop(state, None)
            if pending is None:
                spent = self._spent.get(state)
                raise StateError(spent[1] if spent is not None else StateProblem.UNKNOWN)
            self._remember(state, now + self.ttl, StateProblem.REPLAYED)
            return pending

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def _remember(self, state: str, until: float, problem: StateProblem) -> None:
        self._spent[state] = (until, problem)
        while len(self._spent) > self._capacity:
            self._spent.popitem(last=False)

    def _purge(self, now: float) -> None:
        # Both maps are bounded by the capacity, so a full scan stays cheap.
        for key in [k for k, p in self._pending.items() if p.expires_at <= now]:
            expired = self._pending.pop(key)
            self._remember(key, expired.expires_at + self.ttl, StateProblem.EXPIRED)
        for key in [k for k, (until, _) in self._spent.items() if until <= now]:
            del self._spent[key]

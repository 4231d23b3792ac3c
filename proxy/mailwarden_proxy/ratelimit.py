"""Failed local logins, rate-limited per source address (a token bucket per source).

Every source starts with `burst` tokens; each failed local login (unknown user, wrong
local password) takes one, and tokens come back at `per_minute`. A source with no token
left is *blocked*: its next login attempts are refused without looking at the password
(so guessing gets no answer at all), after a delay, with the protocol's "try again
later" reply. Successful logins neither take nor give tokens, so a valid account cannot
be used to reset the bucket while guessing another.

What this means in a sidecar, where every client is the application on 127.0.0.1: an
application with a wrong password is slowed to `per_minute` checked attempts; once it
has the right one, its next login waits at most one refill interval (6 s with the
defaults) — it is never locked out for long, because locking out the only client there
is would be an outage, not a defence. Guessing a generated local password at 10 tries a
minute is hopeless either way.

Sources are IP addresses; IPv6 addresses count per /64 (one host usually holds a whole
/64), IPv4-mapped IPv6 addresses as the IPv4 address. Memory is bounded: full buckets
carry no information and are dropped first, and past `max_sources` the least recently
failed source is forgotten.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

DEFAULT_MAX_SOURCES = 65536


def source_key(host: str) -> str:
    """The rate-limiting key of a peer address: the IPv4 address or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return host  # a Unix socket path or an unparseable name: keyed as is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailedLoginLimiter:
    """Token buckets of failed logins by source; see the module docstring."""

    def __init__(
        self,
        burst: int,
        per_minute: float,
        *,
        max_sources: int = DEFAULT_MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._max_sources = max_sources
        # source -> (tokens, when they were counted); insertion order = least recent first
        self._buckets: dict[str, tuple[float, float]] = {}
        self.configure(burst, per_minute)

    def configure(self, burst: int, per_minute: float) -> None:
        """New parameters (a reload); buckets already drained keep their level."""
        if burst < 0 or per_minute <= 0:
            raise ValueError("burst must be >= 0 and per_minute > 0")
        self.burst = burst
        self._rate = per_minute / 60.0  # tokens per second

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, source: str, now: float) -> float:
        entry = self._buckets.get(source)
        if entry is None:
            return float(self.burst)
        tokens, since = entry
        return min(float(self.burst), tokens + (now - since) * self._rate)

    def blocked(self, source: str) -> bool:
        """True when a login from `source` must be refused without checking it."""
        if not self.enabled:
            return False
        return self._tokens(source, self._clock()) < 1.0

    def failed(self, source: str) -> bool:
        """Record a failed (checked) login; True when this one used up the last token."""
        if not self.enabled:
            return False
        now = self._clock()
        tokens = max(0.0, self._tokens(source, now) - 1.0)
        self._buckets.pop(source, None)  # re-inserted last: most recent
        self._buckets[source] = (tokens, now)
        if len(self._buckets) > self._max_sources:
            self._prune(now)
        return tokens < 1.0

    def _prune(self, now: float) -> None:
        for source in [s for s in self._buckets if self._tokens(s, now) >= self.burst]:
            del self._buckets[source]
        while len(self._buckets) > self._max_sources:
            del self._buckets[next(iter(self._buckets))]

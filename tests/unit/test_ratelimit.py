"""The failed-login token bucket and its source keys, on a fake clock."""

from __future__ import annotations

import pytest

from mailwarden_proxy.ratelimit import FailedLoginLimiter, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(
    burst: int = 3, per_minute: float = 6.0, **kwargs: int
) -> tuple[FailedLoginLimiter, Clock]:
    clock = Clock()
    return FailedLoginLimiter(burst, per_minute, clock=clock, **kwargs), clock


def test_a_burst_of_failures_then_blocked() -> None:
    lim, _ = limiter(burst=3)
    assert not lim.blocked("10.0.0.1")
    assert lim.failed("10.0.0.1") is False
    assert lim.failed("10.0.0.1") is False
    assert not lim.blocked("10.0.0.1")
    assert lim.failed("10.0.0.1") is True  # the last token: blocked from now on
    assert lim.blocked("10.0.0.1")
    assert not lim.blocked("10.0.0.2")  # per source


def test_tokens_come_back_at_the_rate_and_only_up_to_the_burst() -> None:
    lim, clock = limiter(burst=3, per_minute=6.0)  # one token every 10 s
    for _ in range(3):
        lim.failed("a")
    clock.now += 9.9
    assert lim.blocked("a")
    clock.now += 0.2
    assert not lim.blocked("a")  # one checked attempt ...
    assert lim.failed("a") is True  # ... which failed again: blocked again
    clock.now += 3600  # a long pause refills to the burst, no further
    for _ in range(2):
        assert lim.failed("a") is False
    assert lim.failed("a") is True


def test_blocked_attempts_do_not_delay_recovery() -> None:
    """Refused (unchecked) attempts take no token: the legitimate app, fixed, gets in
    after at most one refill interval however hard the broken one hammered."""
    lim, clock = limiter(burst=2, per_minute=6.0)
    lim.failed("127.0.0.1")
    lim.failed("127.0.0.1")
    for _ in range(1000):
        assert lim.blocked("127.0.0.1")
    clock.now += 10.0
    assert not lim.blocked("127.0.0.1")


def test_burst_zero_switches_it_off() -> None:
    lim, _ = limiter(burst=0)
    assert not lim.enabled
    for _ in range(100):
        assert lim.failed("a") is False
    assert not lim.blocked("a")
    assert len(lim) == 0


def test_reconfigure_keeps_levels_and_applies_the_new_rate() -> None:
    lim, clock = limiter(burst=2, per_minute=1.0)
    lim.failed("a")
    lim.failed("a")
    clock.now += 1.0
    assert lim.blocked("a")
    lim.configure(2, 120.0)  # two a second: the second since the failure refilled it
    assert not lim.blocked("a")
    with pytest.raises(ValueError):
        lim.configure(-1, 1.0)
    with pytest.raises(ValueError):
        lim.configure(1, 0.0)


def test_memory_is_bounded_full_buckets_first_then_least_recent() -> None:
    lim, clock = limiter(burst=2, per_minute=60.0, max_sources=3)
    lim.failed("old")
    clock.now += 10.0  # "old" has refilled: nothing to remember
    lim.failed("b")
    lim.failed("b")
    lim.failed("c")
    lim.failed("d")  # four sources: "old" is full and goes
    assert len(lim) == 3
    assert lim.blocked("b")
    lim.failed("e")  # nothing full: the least recently failed ("b") goes
    assert len(lim) == 3
    assert not lim.blocked("b")


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("", ""),
        ("/run/mail.sock", "/run/mail.sock"),
    ],
)
def test_source_keys(host: str, key: str) -> None:
    assert source_key(host) == key

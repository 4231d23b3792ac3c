"""A wrapper that keeps secret values out of logs, reprs and tracebacks."""

from __future__ import annotations

import hmac


class Secret:
    """Holds a secret string; only `reveal()` gives it back.

    repr/str print a mask so a secret that ends up in a log line, an exception
    message or `--check` output shows as `****`.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def equals(self, candidate: str) -> bool:
        """Constant-time comparison against a candidate value."""
        return hmac.compare_digest(self._value.encode(), candidate.encode())

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and self.equals(other._value)

    def __hash__(self) -> int:
        return hash(Secret)

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

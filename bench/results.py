"""What a run produces: figures, each measured per path, with ratios and goals.

A figure is one number per path (a median over repetitions unless it says otherwise).
`status` tells why a value is missing: "n/a" (meaningless for this path, e.g. proxy RSS
on the direct path), "skipped" (the path could not run, `note` says why) or "failed".
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.paths import PathName


@dataclass
class Value:
    value: float | None
    status: str = "ok"  # ok | n/a | skipped | failed
    note: str = ""
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def median_of(cls, samples: list[float], **extra: Any) -> Value:
        if not samples:
            return cls(None, "failed", "no successful sample")
        return cls(statistics.median(samples), samples=[round(s, 6) for s in samples], extra=extra)


NOT_APPLICABLE = Value(None, "n/a", "no proxy in this path")


@dataclass
class Goal:
    """A target from issue 6, checked on the final values."""

    text: str
    check: Callable[[dict[PathName, Value]], bool | None]


@dataclass
class Figure:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    values: dict[PathName, Value] = field(default_factory=dict)
    goal: Goal | None = None
    # ratio is only meaningful where values are rates or costs, not counts of tokens
    ratios: bool = True

    def value(self, path: PathName) -> float | None:
        found = self.values.get(path)
        return found.value if found is not None and found.status == "ok" else None

    def ratio(self, path: PathName, other: PathName) -> float | None:
        mine, theirs = self.value(path), self.value(other)
        if not self.ratios or mine is None or theirs in (None, 0):
            return None
        assert theirs is not None
        return mine / theirs

    def goal_held(self) -> bool | None:
        return None if self.goal is None else self.goal.check(self.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "paths": {str(p): asdict(v) for p, v in self.values.items()},
            "ratios": {
                "mailwarden/direct": self.ratio(PathName.MAILWARDEN, PathName.DIRECT),
                "mailwarden/emailproxy": self.ratio(PathName.MAILWARDEN, PathName.EMAILPROXY),
            },
            "goal": None
            if self.goal is None
            else {"text": self.goal.text, "held": self.goal_held()},
        }


def ok(values: dict[PathName, Value], path: PathName) -> float | None:
    found = values.get(path)
    return found.value if found is not None and found.status == "ok" else None

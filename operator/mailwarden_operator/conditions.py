"""status.conditions arithmetic (pure: no I/O, the clock is an argument).

Conditions follow the Kubernetes convention (metav1.Condition): one entry per `type`,
`status` "True" | "False" | "Unknown", a CamelCase `reason`, a human `message`,
`lastTransitionTime` (changed only when `status` changes, so it tells how long a state
has lasted) and `observedGeneration`. Functions return new lists and never mutate their
arguments, so a handler can compare before and after with `changed` and skip the status
patch when nothing moved: an idempotent reconcile writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

READY = "Ready"
AUTHORIZED = "Authorized"
CONFIG_RENDERED = "ConfigRendered"
# Ready is True iff all of these are True; their order decides whose reason Ready shows.
READY_REQUIRES = (CONFIG_RENDERED, AUTHORIZED)

# The CRD's maxLength for message and reason; longer values would fail the status patch.
MAX_MESSAGE = 32 * 1024
MAX_REASON = 1024
_TRUNCATED = "… (truncated)"

Condition = dict[str, Any]


def status_string(status: bool | None) -> str:
    return {True: "True", False: "False", None: "Unknown"}[status]


def timestamp(now: datetime) -> str:
    """RFC 3339 in UTC with second precision, as the apiserver writes times."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def get_condition(conditions: Sequence[Condition], type: str) -> Condition | None:
    for condition in conditions:
        if condition.get("type") == type:
            return condition
    return None


def set_condition(
    conditions: Sequence[Condition],
    *,
    type: str,  # shadows the builtin to match the Kubernetes field name
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """A new list with condition `type` set; others keep their place and content."""
    old = get_condition(conditions, type)
    new_status = status_string(status)
    if old is not None and old.get("status") == new_status and old.get("lastTransitionTime"):
        transition = old["lastTransitionTime"]
    else:
        transition = timestamp(now)
    condition: Condition = {
        "type": type,
        "status": new_status,
        "reason": _cap(reason, MAX_REASON),
        "message": _cap(message, MAX_MESSAGE),
        "lastTransitionTime": transition,
        "observedGeneration": generation,
    }
    if old is None:
        return [*(dict(c) for c in conditions), condition]
    return [condition if c is old else dict(c) for c in conditions]


def derive_ready(
    conditions: Sequence[Condition], generation: int, now: datetime
) -> list[Condition]:
    """`conditions` with Ready recomputed from READY_REQUIRES.

    True iff every required condition is True. Otherwise False with the reason and message
    of the first False one (a known failure says more than a pending check), else Unknown
    with those of the first missing or Unknown one.
    """
    found = {t: get_condition(conditions, t) for t in READY_REQUIRES}
    failed = [c for c in found.values() if c is not None and c.get("status") == "False"]
    pending = [t for t, c in found.items() if c is None or c.get("status") != "True"]
    status: bool | None
    if failed:
        status, reason, message = False, failed[0].get("reason", ""), failed[0].get("message", "")
    elif pending:
        first = found[pending[0]]
        status = None
        if first is None:
            reason, message = "Pending", f"waiting for {pending[0]}"
        else:
            reason = first.get("reason") or "Pending"
            message = first.get("message") or f"waiting for {pending[0]}"
    else:
        status, reason = True, READY
        message = "configuration rendered and credentials authorized"
    return set_condition(
        conditions,
        type=READY,
        status=status,
        reason=str(reason),
        message=str(message),
        generation=generation,
        now=now,
    )


def changed(old: object, new: object) -> bool:
    """Whether a status patch is needed: exact equality, nothing ignored.

    Timestamps take part on purpose: `set_condition` keeps them while a status stays, so
    an unchanged state compares equal, and a real transition never looks unchanged.
    """
    return bool(old != new)


def record(
    conditions: Sequence[Condition],
    *,
    type: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Set one condition and derive Ready from the result: what every writer of a
    condition owes the others, since Ready depends on all of them."""
    updated = set_condition(
        conditions,
        type=type,
        status=status,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )
    return derive_ready(updated, generation, now)

"""conditions: set/keep transition times, derive Ready, detect change (for idempotency)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from mailwarden_operator.conditions import (
    AUTHORIZED,
    CONFIG_RENDERED,
    MAX_MESSAGE,
    READY,
    changed,
    derive_ready,
    get_condition,
    record,
    set_condition,
    timestamp,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def put(
    conds: list[dict[str, Any]],
    type_: str,
    status: bool | None,
    *,
    reason: str = "Because",
    message: str = "m",
    generation: int = 1,
    now: datetime = T0,
) -> list[dict[str, Any]]:
    return set_condition(
        conds,
        type=type_,
        status=status,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )


def test_new_condition() -> None:
    conds = put([], CONFIG_RENDERED, True, reason="Rendered", message="ok", generation=4)
    assert conds == [
        {
            "type": CONFIG_RENDERED,
            "status": "True",
            "reason": "Rendered",
            "message": "ok",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 4,
        }
    ]


def test_transition_time_kept_while_status_stays() -> None:
    first = put([], AUTHORIZED, False, reason="A", now=T0)
    same = put(first, AUTHORIZED, False, reason="B", message="other", generation=2, now=T1)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("B", 2)
    flipped = put(same, AUTHORIZED, True, now=T1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    unknown = put(flipped, AUTHORIZED, None, now=T1 + timedelta(seconds=1))
    assert unknown[0]["status"] == "Unknown"
    assert unknown[0]["lastTransitionTime"] == "2026-01-02T03:09:06Z"


def test_returns_new_lists_and_keeps_order() -> None:
    conds = put(put([], CONFIG_RENDERED, True), AUTHORIZED, True)
    snapshot = copy.deepcopy(conds)
    updated = put(conds, CONFIG_RENDERED, False, now=T1)
    assert conds == snapshot  # input untouched
    assert [c["type"] for c in updated] == [CONFIG_RENDERED, AUTHORIZED]
    assert updated[1] == conds[1] and updated[1] is not conds[1]
    # foreign conditions (another controller's) survive untouched
    foreign = [{"type": "Other", "status": "True"}]
    assert put(foreign, READY, True)[0] == {"type": "Other", "status": "True"}


def test_messages_and_reasons_are_capped() -> None:
    conds = put([], READY, False, reason="R" * 5000, message="é" * 100_000)
    assert len(conds[0]["message"]) == MAX_MESSAGE
    assert conds[0]["message"].endswith("(truncated)")
    assert len(conds[0]["reason"]) == 1024


def test_time_must_be_aware_and_is_written_in_utc() -> None:
    with pytest.raises(ValueError, match="timezone"):
        timestamp(datetime(2026, 1, 1))
    plus_two = datetime(2026, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert timestamp(plus_two) == "2026-01-01T00:00:00Z"


def test_get_condition() -> None:
    conds = put([], AUTHORIZED, True)
    assert get_condition(conds, AUTHORIZED) == conds[0]
    assert get_condition(conds, READY) is None


def ready_of(conds: list[dict[str, Any]]) -> dict[str, Any]:
    found = get_condition(derive_ready(conds, 7, T1), READY)
    assert found is not None and found["observedGeneration"] == 7
    return found


def test_ready_true_iff_both_true() -> None:
    conds = put(put([], CONFIG_RENDERED, True), AUTHORIZED, True)
    assert ready_of(conds)["status"] == "True"


def test_ready_false_takes_the_first_failure() -> None:
    rendered_bad = put([], CONFIG_RENDERED, False, reason="SecretNotFound", message="Secret 'a'")
    both_bad = put(rendered_bad, AUTHORIZED, False, reason="ConsentRequired")
    ready = ready_of(both_bad)
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "False",
        "SecretNotFound",
        "Secret 'a'",
    )
    auth_bad = put(put([], CONFIG_RENDERED, True), AUTHORIZED, False, reason="invalid_client")
    assert (ready_of(auth_bad)["status"], ready_of(auth_bad)["reason"]) == (
        "False",
        "invalid_client",
    )
    # a known failure outranks a check that has not run yet
    pending_and_bad = put([], AUTHORIZED, False, reason="ConsentRequired")
    assert ready_of(pending_and_bad)["reason"] == "ConsentRequired"


def test_ready_unknown_while_something_is_missing_or_unknown() -> None:
    only_rendered = put([], CONFIG_RENDERED, True)
    ready = ready_of(only_rendered)
    assert (ready["status"], ready["reason"], ready["message"]) == (
        "Unknown",
        "Pending",
        f"waiting for {AUTHORIZED}",
    )
    checking = put(only_rendered, AUTHORIZED, None, reason="Checking", message="asking the IdP")
    assert (ready_of(checking)["status"], ready_of(checking)["reason"]) == ("Unknown", "Checking")
    assert ready_of([])["message"] == f"waiting for {CONFIG_RENDERED}"


def test_ready_transition_time_follows_its_own_status() -> None:
    conds = derive_ready(put(put([], CONFIG_RENDERED, True), AUTHORIZED, True), 1, T0)
    again = derive_ready(conds, 2, T1)
    ready = get_condition(again, READY)
    assert ready is not None and ready["lastTransitionTime"] == timestamp(T0)


def test_changed_is_exact_equality() -> None:
    conds = derive_ready(put(put([], CONFIG_RENDERED, True), AUTHORIZED, True), 1, T0)
    # re-running the same generation later yields the same list: nothing to patch
    rerun = derive_ready(put(put(conds, CONFIG_RENDERED, True), AUTHORIZED, True), 1, T1)
    assert not changed(conds, rerun)
    assert changed(conds, put(conds, AUTHORIZED, True, message="new message"))
    assert changed(conds, put(conds, AUTHORIZED, True, generation=2))
    assert changed(None, [])
    assert not changed([], [])


def test_record_sets_the_condition_and_derives_ready() -> None:
    conds = put([], AUTHORIZED, True)
    conds = record(conds, type=CONFIG_RENDERED, status=True, reason="Rendered", message="ok",
                   generation=2, now=T1)  # fmt: skip
    ready = get_condition(conds, READY)
    assert ready is not None and ready["status"] == "True"
    assert get_condition(conds, CONFIG_RENDERED)["observedGeneration"] == 2  # type: ignore[index]

"""Due dates from urgency and the overdue scan (fhir_bridge.case.deadlines), with an injected clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_deadline_policy
from fhir_bridge.case.deadlines import due_date, is_overdue, overdue_tasks, parse_fhir_datetime
from fhir_bridge.errors import InvalidInput
from tests.reference import DEADLINES_FILE

POLICY = load_deadline_policy()
AUTHORED = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def task(ident: str, status: str, end: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceType": "Task", "id": ident, "status": status, "intent": "order"}
    if end is not None:
        out["restriction"] = {"period": {"end": end}}
    return out


def test_the_shipped_policy_gives_48_hours_by_default() -> None:
    assert dict(POLICY.hours_by_priority) == {"routine": 48, "urgent": 24, "asap": 8, "stat": 4}
    assert (POLICY.default_hours, POLICY.near) == (48, timedelta(hours=24))


@pytest.mark.parametrize(("priority", "hours"), [
    (None, 48), ("routine", 48), ("urgent", 24), ("asap", 8), ("stat", 4), ("unheard-of", 48)])
def test_the_due_date_follows_the_priority(priority: str | None, hours: int) -> None:
    assert due_date(AUTHORED, priority, None, POLICY) == AUTHORED + timedelta(hours=hours)


def test_the_requesters_earlier_deadline_wins_but_a_later_one_does_not_extend_the_promise() -> None:
    earlier = AUTHORED + timedelta(hours=12)
    assert due_date(AUTHORED, "routine", earlier, POLICY) == earlier
    assert due_date(AUTHORED, "urgent", AUTHORED + timedelta(days=30), POLICY) == AUTHORED + timedelta(hours=24)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        due_date(datetime(2026, 11, 20, 9, 0), None, None, POLICY)


def test_a_case_becomes_overdue_when_the_clock_passes_its_due_date() -> None:
    clock = Clock(AUTHORED)
    due = due_date(AUTHORED, None, None, POLICY)
    assert not is_overdue(due, clock(), done=False)
    clock.advance(hours=48)
    assert not is_overdue(due, clock(), done=False)  # due at that instant, not yet late
    clock.advance(seconds=1)
    assert is_overdue(due, clock(), done=False)
    assert not is_overdue(due, clock(), done=True)


def test_the_overdue_scan_reads_restriction_period_end_and_skips_finished_tasks() -> None:
    clock = Clock(datetime(2026, 11, 22, 8, 0, tzinfo=UTC))
    tasks = [
        task("late", "in-progress", "2026-11-22T09:00:00+02:00"),  # 07:00 UTC
        task("on-time", "ready", "2026-11-22T10:00:00Z"),
        task("finished", "completed", "2026-11-01T10:00:00Z"),
        task("dropped", "cancelled", "2026-11-01T10:00:00Z"),
        task("broke", "failed", "2026-11-01T10:00:00Z"),
        task("no-deadline", "in-progress", None),
        task("by-day", "in-progress", "2026-11-22"),  # due by the end of that day
        task("garbled", "in-progress", "soon"),
    ]
    assert [t["id"] for t in overdue_tasks(tasks, clock())] == ["late"]
    clock.advance(hours=3)
    assert [t["id"] for t in overdue_tasks(tasks, clock())] == ["late", "on-time"]
    clock.advance(days=1)
    assert [t["id"] for t in overdue_tasks(tasks, clock())] == ["late", "on-time", "by-day"]


@pytest.mark.parametrize(("text", "end", "expected"), [
    ("2026", False, datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026", True, datetime(2027, 1, 1, tzinfo=UTC) - timedelta(microseconds=1)),
    ("2026-02", True, datetime(2026, 3, 1, tzinfo=UTC) - timedelta(microseconds=1)),
    ("2026-12", True, datetime(2027, 1, 1, tzinfo=UTC) - timedelta(microseconds=1)),
    ("2026-11-21", False, datetime(2026, 11, 21, tzinfo=UTC)),
    ("2026-11-21T10:00:00+01:00", False, datetime(2026, 11, 21, 9, 0, tzinfo=UTC)),
    ("2026-11-21T10:00:00Z", True, datetime(2026, 11, 21, 10, 0, tzinfo=UTC)),
    ("2026-11-21T10:00:00", False, datetime(2026, 11, 21, 10, 0, tzinfo=UTC)),
    ("2026-13-01", False, None),
    ("not a date", False, None),
])
def test_fhir_datetimes_partial_or_full_are_read(text: str, end: bool, expected: datetime | None) -> None:
    assert parse_fhir_datetime(text, end=end) == expected


@pytest.mark.parametrize(("change", "message"), [
    ({"hoursByPriority": {"emergency": 2}}, "emergency"),
    ({"hoursByPriority": {"stat": 0}}, "stat"),
    ({"defaultHours": "48"}, "defaultHours"),
    ({"hoursByPriority": None}, "hoursByPriority"),
])
def test_a_broken_deadline_file_is_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    raw = json.loads(DEADLINES_FILE.read_text("utf-8"))
    raw.update(change)
    path = tmp_path / "deadlines.json"
    path.write_text(json.dumps(raw), "utf-8")
    with pytest.raises(InvalidInput, match=message):
        load_deadline_policy(path)

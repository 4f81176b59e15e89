"""Review deadlines: when a case is due, and which cases are overdue.

Cross-border second-opinion services promise an answer within 48 hours; urgent requests get less. The hours
per priority are data (``config/deadlines.json``, read by :mod:`fhir_bridge.adapters.reference_data`), keyed
by ``ServiceRequest.priority`` (FHIR R4 ValueSet request-priority: routine | urgent | asap | stat). The due
date is written on the Task as ``Task.restriction.period.end`` (R4 task.html: "the time by which the task
should be completed"), which is what the overdue scan reads back. Every function takes ``now`` (or the
dates) as arguments: the clock is injected, so the scan is tested without waiting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from fhir_bridge.errors import InvalidInput

#: R4 ValueSet request-priority (valueset-request-priority.html)
PRIORITIES = frozenset({"routine", "urgent", "asap", "stat"})

#: Task.status values after which nothing is awaited any more (R4 Task state machine, task.html#statemachine).
#: rejected and entered-in-error are terminal too: no reviewer is working on such a Task.
DONE_STATUSES = frozenset({"completed", "cancelled", "failed", "rejected", "entered-in-error"})

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


@dataclass(frozen=True)
class DeadlinePolicy:
    """Hours allowed per priority, the default, and what counts as a near deadline for routing."""

    hours_by_priority: Mapping[str, int]
    default_hours: int = 48
    near_hours: int = 24

    def hours_for(self, priority: str | None) -> int:
        return self.hours_by_priority.get(priority or "", self.default_hours)

    @property
    def near(self) -> timedelta:
        return timedelta(hours=self.near_hours)


def deadline_policy_from(raw: Any, file: str = "deadlines.json") -> DeadlinePolicy:
    """The policy of the parsed ``config/deadlines.json`` (``file`` names it in errors); refuse unknown
    priorities and non-positive hours (a typo must not silently fall back to the default)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("hoursByPriority"), dict):
        raise InvalidInput(f"deadline file {file}: an object with hoursByPriority is expected")
    hours: dict[str, int] = {}
    for priority, value in raw["hoursByPriority"].items():
        if priority not in PRIORITIES:
            raise InvalidInput(f"deadline file {file}: {priority!r} is not a request-priority code "
                               f"({', '.join(sorted(PRIORITIES))})")
        hours[priority] = _positive(value, f"hoursByPriority.{priority}", file)
    return DeadlinePolicy(
        hours_by_priority=MappingProxyType(hours),
        default_hours=_positive(raw.get("defaultHours", 48), "defaultHours", file),
        near_hours=_positive(raw.get("nearDeadlineHours", 24), "nearDeadlineHours", file),
    )


def _positive(value: Any, name: str, file: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"deadline file {file}: {name} must be a positive whole number of hours")
    return value


def due_date(authored_on: datetime, priority: str | None, requested_deadline: datetime | None,
             policy: DeadlinePolicy) -> datetime:
    """The earlier of the requester's own deadline and ``authored_on`` + the hours of its priority.

    The requester's deadline can only shorten the promise, never extend it: a late deadline still gets the
    service-level time.
    """
    _aware(authored_on, "authored_on")
    promised = authored_on + timedelta(hours=policy.hours_for(priority))
    if requested_deadline is None:
        return promised
    return min(promised, _aware(requested_deadline, "requested_deadline"))


def is_overdue(due: datetime, now: datetime, done: bool) -> bool:
    """A case is overdue once ``now`` is past its due date and it is not done."""
    return not done and _aware(now, "now") > _aware(due, "due")


def overdue_tasks(tasks: Iterable[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """The Tasks past ``restriction.period.end`` that are not in a done status, in the order given.

    A Task without a readable due date is never reported: it has no promise to break.
    """
    overdue = []
    for task in tasks:
        end = ((task.get("restriction") or {}).get("period") or {}).get("end")
        due = parse_fhir_datetime(end, end=True) if isinstance(end, str) else None
        if due is not None and is_overdue(due, now, task.get("status") in DONE_STATUSES):
            overdue.append(task)
    return overdue


def parse_fhir_datetime(text: str, *, end: bool = False) -> datetime | None:
    """Parse an R4 ``dateTime`` / ``instant`` (datatypes.html#dateTime) into an aware datetime, or None.

    A partial value (``2026``, ``2026-11``, ``2026-11-21``) is a period: its start, or with ``end=True`` the
    last moment of it, in UTC (R4 gives no zone to a date). A time without a zone is read as UTC, although
    R4 requires one, rather than refused: a date from the source is still better than none.
    """
    match = _PARTIAL.match(text.strip())
    if match:
        year, month, day = int(match[1]), int(match[2] or 1), int(match[3] or 1)
        try:
            start = datetime(year, month, day, tzinfo=UTC)
        except ValueError:
            return None
        if not end:
            return start
        if match[3]:
            following = start + timedelta(days=1)
        elif match[2]:
            following = (start + timedelta(days=32)).replace(day=1)
        else:
            following = start.replace(year=year + 1)
        return following - timedelta(microseconds=1)
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def is_date_only(text: str) -> bool:
    """True for a partial R4 dateTime (year, year-month or date): it has no time of day."""
    return _PARTIAL.match(text.strip()) is not None


def _aware(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware: deadlines compare instants across countries")
    return moment

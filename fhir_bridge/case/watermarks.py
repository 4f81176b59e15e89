"""Watermarks for incremental sync: the newest ``meta.lastUpdated`` a search answered (issue 8).

A watermark is kept as the source wrote it, so that ``_lastUpdated=gt<watermark>`` is read with the source's
own clock and precision (FHIR R4 search.html#date: ``gt2026-11-01T10:00:00.345Z`` means after the whole
millisecond). Comparing two of them is done on instants, never on texts: precisions and zones differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

__all__ = ["instant_micros", "newest_update"]


def newest_update(resources: Iterable[dict[str, Any]]) -> str | None:
    """The newest ``meta.lastUpdated`` among ``resources``, as written (None when none has one)."""
    stamps = [str(r["meta"]["lastUpdated"]) for r in resources
              if isinstance(r.get("meta"), dict) and r["meta"].get("lastUpdated")]
    valid = [s for s in stamps if _micros_or_none(s) is not None]
    return max(valid, key=instant_micros) if valid else None


def instant_micros(value: str) -> int:
    """Microseconds since the epoch at the start of a FHIR instant (no zone: UTC); ValueError when it is not one."""
    when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _micros_or_none(value: str) -> int | None:
    try:
        return instant_micros(value)
    except ValueError:
        return None


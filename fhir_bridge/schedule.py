"""Cron schedules of the batch jobs the workers run by themselves (issue 8, ``[schedule]`` in the config).

Each scheduled job is a cron expression (five fields, minute to weekday, or six with seconds first) read in
one time zone; a *tick* is one moment the expression names. :func:`latest_tick` gives the newest tick in a
window: the scheduler (:mod:`fhir_bridge.adapters.scheduler`) claims it once across every worker. Parsing
is cronsim's (Debian cron's semantics, including its DST quirks: a 02:30 job on the night the clock jumps
from 02:00 to 03:00 runs at 03:00; on the night it falls back it runs once).

Pure: the clock is an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from fhir_bridge.errors import InvalidInput

__all__ = ["JOB_KINDS", "ScheduledJob", "load_schedule"]

#: the schedulable jobs and the queue job kind each one enqueues (the CLI's ``sync <name>`` does the same work)
JOB_KINDS = {"refresh": "sync-refresh", "overdue": "sync-overdue", "deliver": "sync-deliver"}


@dataclass(frozen=True, slots=True)
class ScheduledJob:
    name: str
    kind: str
    cron: str
    zone: ZoneInfo

    def ticks_after(self, moment: datetime) -> CronSim:
        """The ticks strictly after ``moment``, in order (an iterator of aware datetimes)."""
        return CronSim(self.cron, moment.astimezone(self.zone))

    def latest_tick(self, after: datetime, until: datetime) -> datetime | None:
        """The newest tick in ``(after, until]``, or None (older ticks in the window are coalesced into it)."""
        latest = None
        for tick in self.ticks_after(after):
            if tick > until:
                return latest
            latest = tick
        return latest  # pragma: no cover (cron iterators do not end)

    def ticks_between(self, after: datetime, until: datetime) -> list[datetime]:
        """Every tick in ``(after, until]``, oldest first."""
        ticks: list[datetime] = []
        for tick in self.ticks_after(after):
            if tick > until:
                return ticks
            ticks.append(tick)
        return ticks  # pragma: no cover (cron iterators do not end)

    def next_tick(self, after: datetime) -> datetime:
        return next(iter(self.ticks_after(after)))


def load_schedule(expressions: Mapping[str, str], timezone: str) -> list[ScheduledJob]:
    """The jobs with an expression (empty: not scheduled); InvalidInput names a bad one or an unknown zone."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput(f"[schedule] timezone {timezone!r} is not a known IANA time zone") from None
    jobs = []
    for name, cron in expressions.items():
        if not cron.strip():
            continue
        if name not in JOB_KINDS:
            raise InvalidInput(f"[schedule] {name} is not a schedulable job ({', '.join(JOB_KINDS)})")
        job = ScheduledJob(name, JOB_KINDS[name], cron.strip(), zone)
        try:
            job.next_tick(datetime.now(zone) - timedelta(days=1))
        except (CronSimError, StopIteration) as exc:
            raise InvalidInput(f"[schedule] {name} = {cron!r} is not a cron expression ({exc})") from None
        jobs.append(job)
    return jobs

"""Job metrics for ``/metrics`` (issue 8): jobs by kind and state, attempts by kind and outcome, scheduled runs.

Gathered from Redis at scrape time like the rest of ``/metrics``: every API process reports the same numbers,
whichever process the scraper reaches. ``fhir_bridge_job_attempts_total`` counts, across every worker since the
queue began, the attempts that ended ``done``, ``retry`` (failed and waiting for another try) or ``dead``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fhir_bridge.adapters.queue_admin import STATES, QueueAdmin


class _Families(Collector):
    """Metric families computed before the scrape is written (the registry's collect() is synchronous)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


async def add_job_metrics(registry: CollectorRegistry, admin: QueueAdmin, schedule: Any = None) -> None:
    """Add the queue's per-kind metrics (and the scheduler's, when given) to ``registry``."""
    by_kind = Gauge("fhir_bridge_jobs", "Jobs by kind and state (ready, running, delayed retries, dead)",
                    ["kind", "state"], registry=registry)
    counts = await admin.counts()
    for kind in sorted({k for k, _ in counts}):
        for state in STATES:
            by_kind.labels(kind, state).set(counts.get((kind, state), 0))
    attempts = CounterMetricFamily("fhir_bridge_job_attempts", "Job attempts ended, by kind and outcome "
                                   "(done, retry, dead), every worker", labels=["kind", "outcome"])
    for (kind, outcome), value in sorted((await admin.outcomes()).items()):
        attempts.add_metric([kind, outcome], value)
    families: list[Any] = [attempts]
    if schedule is not None:
        runs = CounterMetricFamily("fhir_bridge_schedule_ticks", "Scheduled ticks claimed (each runs its job once)",
                                   labels=["job"])
        last = GaugeMetricFamily("fhir_bridge_schedule_last_tick_timestamp_seconds",
                                 "Time of the last tick claimed, per scheduled job", labels=["job"])
        for name, (count, when) in sorted((await schedule.tick_stats()).items()):
            runs.add_metric([name], count)
            last.add_metric([name], when)
        families += [runs, last]
    registry.register(_Families(families))

"""``/metrics``: Prometheus text format, gathered at scrape time (cases and queue state live in Redis, shared
by every API and worker process, so a per-process counter would tell only part of the truth).

Gauges: open cases by Task status, overdue open cases (the deadline flag of issue 4), queue depth, jobs in
flight, age of the oldest waiting job, dead letters; per job kind and scheduled job:
:mod:`fhir_bridge.api.job_metrics` (issue 8).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.responses import Response

from fhir_bridge.api.job_metrics import add_job_metrics
from fhir_bridge.workflow.bridge import Bridge

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = CollectorRegistry()
    bridge: Bridge = request.app.state.bridge
    open_tasks = await bridge.assignments.open_tasks()
    by_status = Gauge("fhir_bridge_cases_open", "Open cases by Task status", ["status"], registry=registry)
    for status in ("requested", "in-progress", "ready", "on-hold"):
        by_status.labels(status).set(sum(1 for t in open_tasks if t.get("status") == status))
    Gauge("fhir_bridge_cases_overdue", "Open cases past their due date", registry=registry).set(
        len(bridge.assignments.overdue(open_tasks)))
    queue: Any = getattr(request.app.state, "queue", None)
    if queue is not None:
        Gauge("fhir_bridge_jobs_waiting", "Jobs waiting in the queue (ready and delayed retries)",
              registry=registry).set(await queue.depth())
        Gauge("fhir_bridge_jobs_in_flight", "Jobs taken by a worker and not yet acknowledged",
              registry=registry).set(await queue.pending_count())
        Gauge("fhir_bridge_jobs_oldest_age_seconds", "Age of the oldest waiting job",
              registry=registry).set(await queue.oldest_age_seconds())
        Gauge("fhir_bridge_jobs_dead", "Jobs in the dead-letter stream",
              registry=registry).set(len(await queue.dead_letters(limit=10_000)))
        await add_job_metrics(registry, request.app.state.queue_admin, getattr(request.app.state, "schedule", None))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

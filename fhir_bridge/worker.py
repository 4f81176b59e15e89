"""The worker: the job kinds it takes from the queue and the use case each one runs.

A worker process (``fhir-bridge worker``; run as many as you like against one Redis) takes jobs from the
queue's consumer group and, beside it, claims the ticks of the scheduled jobs (``[schedule]``) through a lease
so that one worker runs each tick. The kinds:

* ``collect-case`` — pull, screen, package and triage a case (:meth:`CaseService.run_collect_job`);
* ``deliver-webhook``, ``deliver-record`` — a final opinion to the requesting platform's webhook, and into the
  patient's record with ITI-65 (:class:`~fhir_bridge.workflow.delivery.Deliveries`);
* the scheduled kinds of :data:`fhir_bridge.schedule.JOB_KINDS` — the incremental refresh, the overdue scan and
  the re-drive of dead deliveries (the same work as ``fhir-bridge sync refresh|overdue|deliver``); a scheduled
  run is recorded before it starts.

The composition root (:func:`fhir_bridge.main.run_worker`) opens the adapters and hands them here; this module
knows the queue and the scheduler only by what it calls on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

import structlog

from fhir_bridge.audit import context as audit_context
from fhir_bridge.errors import InvalidInput
from fhir_bridge.ports import Job, JobHandler
from fhir_bridge.schedule import JOB_KINDS, ScheduledJob
from fhir_bridge.workflow.bridge import Bridge
from fhir_bridge.workflow.cases import COLLECT_JOB
from fhir_bridge.workflow.delivery import RECORD_JOB, WEBHOOK_JOB

log = structlog.get_logger("fhir_bridge.main")


class JobSource(Protocol):
    """The queue as a worker sees it (:class:`fhir_bridge.adapters.queue.RedisJobQueue`)."""

    async def run(self, consumer_name: str, handler: JobHandler, stop_event: asyncio.Event) -> None: ...


class Clockwork(Protocol):
    """The scheduled jobs as a worker sees them (:class:`fhir_bridge.adapters.scheduler.RedisScheduler`)."""

    jobs: list[ScheduledJob]

    async def run(self, consumer: str, stop: asyncio.Event) -> None: ...

    async def record_run(self, job: str, tick_ms: int, consumer: str) -> None: ...


def job_handlers(bridge: Bridge, scheduler: Clockwork, consumer: str, *,
                 redrive: Callable[[Collection[str]], Awaitable[Any]], delivery_kinds: Collection[str]
                 ) -> dict[str, JobHandler]:
    """Every job kind and its handler; ``redrive`` puts dead letters of ``delivery_kinds`` back in the queue."""

    async def refresh() -> None:
        if bridge.sync is None:
            raise InvalidInput("the refresh needs the sync marks, which this worker was built without")
        await bridge.sync.refresh_open_cases()

    async def overdue() -> None:
        await bridge.assignments.scan_overdue()

    async def deliver() -> None:
        await redrive(delivery_kinds)

    def scheduled(work: Callable[[], Awaitable[None]]) -> JobHandler:
        async def handle(job: Job) -> None:
            if "tick" in job.payload:
                await scheduler.record_run(str(job.payload.get("job")), int(job.payload["tick"]), consumer)
            await work()

        return handle

    work = {"refresh": refresh, "overdue": overdue, "deliver": deliver}
    return {COLLECT_JOB: bridge.cases.run_collect_job, WEBHOOK_JOB: bridge.deliveries.run_webhook_job,
            RECORD_JOB: bridge.deliveries.run_record_job,
            **{JOB_KINDS[name]: scheduled(run) for name, run in work.items()}}


async def work(queue: JobSource, scheduler: Clockwork, handlers: dict[str, JobHandler], consumer: str,
               stop: asyncio.Event) -> None:
    """Take jobs until ``stop`` is set (the current job finishes first), the scheduler's clock beside."""

    async def handle(job: Job) -> None:
        handler = handlers.get(job.kind)
        if handler is None:
            raise InvalidInput(f"unknown job kind {job.kind!r}")
        structlog.contextvars.bind_contextvars(job=job.id, attempt=job.attempt)
        try:
            with audit_context.bound(job_id=job.id):
                await handler(job)
        finally:
            structlog.contextvars.clear_contextvars()

    log.info("worker.started", consumer=consumer, scheduled=[job.name for job in scheduler.jobs])
    clock = asyncio.create_task(scheduler.run(consumer, stop))
    try:
        await queue.run(consumer, handle, stop)
    finally:
        stop.set()
        await clock
    log.info("worker.stopped", consumer=consumer)

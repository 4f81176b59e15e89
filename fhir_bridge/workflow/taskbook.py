"""Writing the case's Task: every change is a compare-and-set on its versionId (FHIR R4 http.html#concurrency).

Two workers, or a worker and a reviewer, may act on one case at once; a change made on a stale version is
re-read and re-decided instead of overwriting the other writer's. Shared by every use case that moves a case.

Audit (issue 7): with an :class:`~fhir_bridge.ports.AuditPort`, every change written here (a transition by
:meth:`TaskBook.move`, an edit by :meth:`TaskBook.edit`) appends one ``job_event`` (DICOM 110110 "Patient
Record", action U) naming the Task version written, the patient (``Task.for.identifier``) and the queue job
when a worker made it. Its subtype is the case state moved to (``collecting``, ``triaged-ready``,
``waiting-for-documents``, ``in-review``, ``opinion-final``, ``failed``…) or ``case-edit`` for an edit;
``outcomeDesc`` says what changed, in codes and element names only. The event is appended after the write:
if the audit log refuses it, :class:`~fhir_bridge.errors.AuditUnavailable` propagates (the request answers
503, the job is retried) and the write stands. A retried job then finds the transition made and makes no
second event, so such a transition keeps no job event; the window is one Redis round trip, on the Redis
that has just taken the write.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from fhir_bridge.audit import context as audit_context
from fhir_bridge.audit.events import Party, job_event
from fhir_bridge.case.tasks import state_of, task_patient, transition
from fhir_bridge.errors import NotFound, PreconditionFailed
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import index_terms
from fhir_bridge.fhir.terminology import Terminology
from fhir_bridge.ports import AuditPort, Clock, ResourceStorePort, system_clock

log = structlog.get_logger("fhir_bridge.cases")
_ATTEMPTS = 8
EDIT_STEP = "case-edit"
#: who changes cases when no other agent is given (the job event's only agent, DICOM 110150 Application)
DEFAULT_AGENT = Party("fhir-bridge", name="fhir-bridge")


class TaskBook:
    """Reads and writes Tasks with optimistic concurrency."""

    def __init__(self, store: ResourceStorePort, terminology: Terminology, clock: Clock = system_clock, *,
                 audit: AuditPort | None = None, agent: Party | None = None) -> None:
        self.store = store
        self.terminology = terminology
        self.clock = clock
        self.audit = audit
        self.agent = agent or DEFAULT_AGENT

    async def read(self, task_id: str) -> Resource:
        return await self.store.read("Task", task_id)

    async def for_request(self, request_id: str) -> Resource:
        """The Task of the case whose ServiceRequest is ``request_id``; NotFound when there is none."""
        page = await self.store.search("Task", {"focus": [f"ServiceRequest/{request_id}"]}, count=1)
        if not page.resources:
            raise NotFound("no case for that ServiceRequest")
        return page.resources[0]

    async def move(
        self,
        task: Resource,
        status: str,
        state: str,
        *,
        reason: str | None = None,
        output: list[Resource] | None = None,
        replace_output: bool = False,
        contained: list[Resource] | None = None,
        change: Callable[[Resource], None] | None = None,
    ) -> Resource:
        """Move the Task to ``status``/``state`` (a no-op when it is there already)."""
        for _ in range(_ATTEMPTS):
            if task["status"] == status and state_of(task) == state:
                return task
            moved = transition(task, status, state, instant(self.clock()), self.terminology, reason=reason)
            if output is not None:
                moved["output"] = output if replace_output else [*(task.get("output") or []), *output]
            if contained is not None:
                moved["contained"] = contained
            if change is not None:
                change(moved)
            try:
                stored = await self.store.update(moved, index=index_terms(moved), if_match=task["meta"]["versionId"])
            except PreconditionFailed:
                task = await self.read(task["id"])
                continue
            await self._record(stored, state, f"{task['status']}/{state_of(task)} → {status}/{state}")
            return stored
        raise PreconditionFailed("the case kept changing under us; try again")

    async def edit(self, task: Resource, change: Callable[[Resource], None]) -> Resource:
        """Change a Task without moving it (owner, notes, flags), compare-and-set."""
        for _ in range(_ATTEMPTS):
            edited = {k: v for k, v in task.items()}
            change(edited)
            if edited == task:
                return task
            changed = sorted(k for k in {*task, *edited} if k != "meta" and task.get(k) != edited.get(k))
            edited["lastModified"] = instant(self.clock())
            try:
                stored = await self.store.update(edited, index=index_terms(edited), if_match=task["meta"]["versionId"])
            except PreconditionFailed:
                task = await self.read(task["id"])
                continue
            await self._record(stored, EDIT_STEP, "changed: " + ", ".join(changed))
            return stored
        raise PreconditionFailed("the case kept changing under us; try again")

    async def _record(self, stored: Resource, step: str, description: str) -> None:
        """Append the job event of a change just written (see the module docstring)."""
        if self.audit is None:
            return
        case = f"Task/{stored['id']}/_history/{stored['meta']['versionId']}"
        event = job_event(step=step, case=case, bridge=self.agent, patient=task_patient(stored),
                          job_id=audit_context.job_id.get(), outcome_desc=description)  # fmt: skip
        await self.audit.append(event)

    async def fail(self, task: Resource, reason: str) -> None:
        log.warning("case.failed", task=task["id"], reason=reason)
        current = await self.read(task["id"])
        if current["status"] in ("requested", "in-progress", "ready", "on-hold"):
            await self.move(current, "failed", "failed", reason=reason)

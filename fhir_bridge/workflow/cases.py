"""The case from request to review: submit a request, collect and package the case, triage it, refresh it.

The case's own changes go through here, against the ports only (store, queue, blobs, source); opinions,
deliveries, routing and the readers' views are their own use cases (:mod:`fhir_bridge.workflow.bridge` builds
them all). What a request asks for (patient, specialty, kind, deadline) is decided once, when it arrives
(:func:`~fhir_bridge.case.intake.check_request`), and every later job reads it back from the stored request
(:func:`~fhir_bridge.case.intake.request_facts`) without validating the resource again.

Pulling and packaging run as queue jobs, never inside an HTTP request. Writes are ordered so that a crash
at any point leaves a state a retry repairs, never a duplicate:

* a request is stored under its If-None-Exist key (atomic), its Task under ``task-for:<request>``, and the
  collect job is enqueued with the Task id as job id (idempotent), so a retried POST re-creates nothing;
* the case Bundle is created under ``case-bundle:<task>:<generation>``: a second worker finishing a
  reclaimed job finds the first one's bundle instead of making another; a refresh is a new generation.
  The documents go to the blob store one by one; the bundle itself is stored as a small signed skeleton
  (:mod:`fhir_bridge.case.packaging`) that :meth:`CaseBundles.chunks` fills with the documents' base64 when
  it is read, pseudonymised and signed again for readers whose network asks for it
  (:mod:`fhir_bridge.access.pseudonym`, :mod:`fhir_bridge.workflow.case_bundles`);
* after packaging, triage (:mod:`fhir_bridge.review.triage`, rules in ``mappings/``) decides: a blocking finding
  puts the case on hold (``waiting-for-documents``, what is missing in ``statusReason``), otherwise it is
  ready and routed to a reviewer or panel (:mod:`fhir_bridge.workflow.assignment`);
* each Task transition is a compare-and-set on its versionId (If-Match), so two workers can not both move
  a case, and a transition already made is not made again.

Audit: with an ``audit`` port, every case change appends a job event (:mod:`fhir_bridge.workflow.taskbook`);
the source calls made for a patient run with that patient in :mod:`fhir_bridge.audit.context`, so the audit
hook of the source client can name the patient of an ITI-67 search or an ITI-68 retrieve.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import structlog

from fhir_bridge.audit import context as audit_context
from fhir_bridge.case.deadlines import due_date, parse_fhir_datetime
from fhir_bridge.case.intake import OpinionRequest, check_request, request_facts
from fhir_bridge.case.packaging import build_case_bundle
from fhir_bridge.case.selection import Problem
from fhir_bridge.case.tasks import new_task, output_type, state_of
from fhir_bridge.errors import (
    BusinessRuleViolation,
    InvalidInput,
    NotFound,
    SourceError,
    SourceUnavailable,
    UnknownPatient,
)
from fhir_bridge.fhir.elements import extension_value, instant, set_extension
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import TENANT_TERM, index_terms, tenant_of, with_tenant
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.ports import Job
from fhir_bridge.review.triage import findings_outcome, missing_summary, triage_case
from fhir_bridge.workflow.assignment import Assignments
from fhir_bridge.workflow.case_bundles import CaseBundles
from fhir_bridge.workflow.collaborators import CaseRules, Ports
from fhir_bridge.workflow.collect import collect_case, record_pull
from fhir_bridge.workflow.conditional import conditional_match
from fhir_bridge.workflow.delivery import CLIENT_SOURCE
from fhir_bridge.workflow.opinions import Created
from fhir_bridge.workflow.taskbook import TaskBook

log = structlog.get_logger("fhir_bridge.cases")

COLLECT_JOB = "collect-case"
GENERATION = f"{CANONICAL_BASE}/StructureDefinition/collect-generation"
__all__ = ["COLLECT_JOB", "CaseService"]


class CaseService:
    """A case's own use cases; one per process, built by :func:`~fhir_bridge.workflow.bridge.build_bridge`."""

    def __init__(self, ports: Ports, rules: CaseRules, *, book: TaskBook, assignments: Assignments,
                 bundles: CaseBundles, work_dir: Path, max_attempts: int = 5) -> None:
        self.ports = ports
        self.rules = rules
        self.book = book
        self.assignments = assignments
        self.bundles = bundles
        self.work_dir = work_dir
        self.max_attempts = max_attempts

    # -- the request ----------------------------------------------------------------------------------

    async def submit_request(self, body: Any, *, if_none_exist: str | None = None, tenant: str,
                             client: str | None = None) -> Created:
        """POST ServiceRequest: check, resolve the patient at the source, store, create the Task, enqueue.

        The request, its Task and later its opinions carry the ``tenant`` of the platform that sent it; the
        ``client`` that sent it is kept in ``meta.source`` (it is the one notified of the opinion). The facts
        decided here (:class:`~fhir_bridge.case.intake.OpinionRequest`) are what every later job reads back.
        """
        request = check_request(body, self.rules.terminology)
        existing, unique_key = await conditional_match(self.ports.store, "ServiceRequest", if_none_exist,
                                                       {TENANT_TERM: [tenant]})
        if existing is not None:
            await self._ensure_case(existing, request)
            return Created(existing, False)
        await self._check_patient_known(request.patient)
        sr = dict(body)
        sr.pop("meta", None)
        sr.pop("id", None)
        # store the INS as checked (a NIR may arrive with spaces): searches and opinions match the normal form
        sr["subject"] = {**sr["subject"], "identifier": {**sr["subject"]["identifier"], **request.patient.element}}
        sr["authoredOn"] = sr.get("authoredOn") or instant(self.ports.clock())
        sr = with_tenant(sr, tenant)
        if client:
            sr["meta"] = {**sr.get("meta", {}), "source": f"{CLIENT_SOURCE}{client}"}
        stored, created = await self.ports.store.create(sr, index=index_terms(sr), unique_key=unique_key)
        await self._ensure_case(stored, request)
        return Created(stored, created)

    async def _check_patient_known(self, patient: PatientIdentifier) -> None:
        """A patient the source does not know is refused now (422) rather than failing later.

        One Patient search is cheap; pulling documents still happens in the worker. When the source is
        down, the request is accepted and the worker resolves the patient when it can.
        """
        try:
            with audit_context.bound(patient=patient):
                async with self.ports.source() as source:
                    await source.find_patient(patient)
        except UnknownPatient:
            raise BusinessRuleViolation(
                "the source has no patient with that identifier", expression=["subject.identifier"]
            ) from None
        except SourceUnavailable:
            log.warning("intake.source_unavailable")

    async def _ensure_case(self, sr: Resource, request: OpinionRequest) -> Resource:
        authored = parse_fhir_datetime(str(sr.get("authoredOn") or "")) or self.ports.clock()
        requested = parse_fhir_datetime(request.deadline, end=True) if request.deadline else None
        due = due_date(authored, sr.get("priority"), requested, self.rules.deadlines)
        task = with_tenant(new_task(sr, instant(self.ports.clock()), instant(due), self.rules.terminology),
                           tenant_of(sr))
        stored, _ = await self.ports.store.create(
            task, index=index_terms(task), unique_key=f"task-for:ServiceRequest/{sr['id']}"
        )
        await self.ports.queue.enqueue(COLLECT_JOB, {"task": stored["id"]}, job_id=f"collect:{stored['id']}")
        return stored

    # -- the collect job ------------------------------------------------------------------------------

    async def run_collect_job(self, job: Job) -> None:
        """Pull, screen, package and triage the case of ``job.payload['task']``; see the module docstring."""
        task = await self.ports.store.read("Task", job.payload["task"])
        generation = int(job.payload.get("generation", 1))
        collecting = task["status"] == "in-progress" and state_of(task) == "collecting"
        if (task["status"] != "requested" and not collecting) or _generation(task) != generation:
            return  # done by an earlier run of this job, superseded by a refresh, or the case moved on
        request = await self.ports.store.read("ServiceRequest", task["focus"]["reference"].split("/")[-1])
        if task["status"] == "requested":
            task = await self.book.move(task, "in-progress", "collecting")
        checked = request_facts(request, self.rules.terminology)
        # One work directory per case: a reclaimed job first removes what a killed worker left (patient data
        # must not linger on disk); the queue's claim heartbeat means no two workers run the job at once.
        work = self._ensure_work_dir() / f"case-{task['id']}"
        await asyncio.to_thread(shutil.rmtree, work, True)
        work.mkdir()
        try:
            with audit_context.bound(patient=checked.patient):
                async with self.ports.source() as source:
                    collected = await collect_case(source, checked.patient, work / "attachments",
                                                   self.rules.terminology)
                    bundle = build_case_bundle(
                        collected.content, terminology=self.rules.terminology, absolute=source.absolute,
                        now=self.ports.clock(),
                    )
            findings = triage_case(
                bundle,
                specialty=checked.specialty,
                kind=checked.kind,
                patient_identifier=checked.patient,
                problems=collected.problems,
                rules=self.rules.triage_rules,
                now=self.ports.clock(),
                left_out=collected.unreadable,
            )
            layout = await self.bundles.package(bundle, collected.content.documents)
        except SourceError as exc:
            if isinstance(exc, SourceUnavailable) and job.attempt < self.max_attempts:
                raise  # the queue retries with backoff
            await self.book.fail(task, f"{type(exc).__name__}: {exc.message}")
            return
        except (InvalidInput, NotFound, BusinessRuleViolation) as exc:
            await self.book.fail(task, exc.message)
            return
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        if self.ports.sync_marks is not None:
            await record_pull(self.ports.sync_marks, checked.patient, collected)
        stored = await self.bundles.store_stub(bundle, layout, patient=checked.patient, task_id=task["id"],
                                               generation=generation)
        current = await self.ports.store.read("Task", task["id"])
        if current["status"] != "in-progress" or _generation(current) != generation:
            return
        output = [
            {
                "type": output_type("case-bundle", "Case bundle"),
                "valueReference": {"reference": f"Bundle/{stored['id']}"},
            },
            {
                "type": output_type("left-out", "Items left out of the case"),
                "valueReference": {"reference": "#left-out"},
            },
            {"type": output_type("triage", "Triage findings"), "valueReference": {"reference": "#triage"}},
        ]
        contained = [problems_outcome(collected.problems), {**findings_outcome(findings), "id": "triage"}]
        if any(f.severity == "blocking" for f in findings):
            await self.book.move(
                current,
                "on-hold",
                "waiting-for-documents",
                reason=missing_summary(findings),
                output=output,
                replace_output=True,
                contained=contained,
            )
            return
        assign = await self.assignments.assignment_for(current, request, checked.specialty, checked.kind)
        await self.book.move(current, "ready", "triaged-ready", output=output, replace_output=True,
                             contained=contained, change=assign)

    async def refresh(self, task_id: str) -> Resource:
        """Pull the case again (new documents at the source): a new generation, triaged again.

        Allowed while the case waits for documents or waits for its review; the reviewer keeps the case.
        """
        task = await self.book.read(task_id)
        if task["status"] not in ("on-hold", "ready"):
            raise BusinessRuleViolation("only a case waiting for documents or for its review can be refreshed")
        generation = _generation(task) + 1
        moved = await self.book.move(
            task, "in-progress", "collecting", change=lambda t: set_extension(t, GENERATION, generation, "valueInteger")
        )
        await self.ports.queue.enqueue(
            COLLECT_JOB, {"task": task_id, "generation": generation}, job_id=f"collect:{task_id}:{generation}"
        )
        return moved

    def _ensure_work_dir(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir


def _generation(task: Resource) -> int:
    return int(extension_value(task, GENERATION, "valueInteger") or 1)


def problems_outcome(problems: list[Problem]) -> Resource:
    """The left-out items as a contained OperationOutcome the requester can read (one issue each)."""
    issues = []
    for problem in problems:
        issue: Resource = {
            "severity": "warning",
            "code": "informational",
            "details": {
                "coding": [{"system": f"{CANONICAL_BASE}/CodeSystem/left-out-reason", "code": problem.reason}],
                "text": problem.text,
            },
        }
        where = problem.master_identifier or problem.source_url
        if where:
            issue["diagnostics"] = f"{problem.resource_type} {where}"
        issues.append(issue)
    if not issues:
        issues = [{"severity": "information", "code": "informational", "diagnostics": "nothing was left out"}]
    return {"resourceType": "OperationOutcome", "id": "left-out", "issue": issues}

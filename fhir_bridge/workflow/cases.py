"""The second-opinion exchange: submit a request, collect and package the case, take the opinion.

Everything that changes a case goes through here, against the ports only (store, queue, blobs, source).
Pulling and packaging run as queue jobs, never inside an HTTP request. Writes are ordered so that a crash
at any point leaves a state a retry repairs, never a duplicate:

* a request is stored under its If-None-Exist key (atomic), its Task under ``task-for:<request>``, and the
  collect job is enqueued with the Task id as job id (idempotent), so a retried POST re-creates nothing;
* the case Bundle is created under ``case-bundle:<task>:<generation>``: a second worker finishing a
  reclaimed job finds the first one's bundle instead of making another; a refresh is a new generation.
  The documents go to the blob store one by one; the bundle itself is stored as a small signed skeleton
  (:mod:`fhir_bridge.case.packaging`) that :meth:`CaseService.bundle_chunks` fills with the documents' base64 when
  it is read, pseudonymised and signed again for readers whose network asks for it
  (:mod:`fhir_bridge.access.pseudonym`);
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from fhir_bridge.access.pseudonym import ReviewerNetworks
from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.audit import context as audit_context
from fhir_bridge.audit.events import Party
from fhir_bridge.case.deadlines import DeadlinePolicy, due_date, parse_fhir_datetime
from fhir_bridge.case.intake import check_request
from fhir_bridge.case.packaging import build_case_bundle
from fhir_bridge.case.selection import Problem
from fhir_bridge.case.signature import skeleton_bytes
from fhir_bridge.case.tasks import new_task, state_of
from fhir_bridge.errors import (
    BusinessRuleViolation,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    SourceError,
    SourceUnavailable,
    UnknownPatient,
)
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import TENANT_TERM, index_terms, parse_criteria, tenant_of, with_tenant
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology
from fhir_bridge.opinion.writeback import WriteBackConfig
from fhir_bridge.ports import (
    AuditPort,
    BlobStorePort,
    Job,
    JobQueuePort,
    ResourceStorePort,
    SignerPort,
    SourcePort,
    WebhookPort,
)
from fhir_bridge.rendering.forms import Renderer
from fhir_bridge.rendering.html import render_html
from fhir_bridge.rendering.pdf import render_pdf
from fhir_bridge.rendering.view import ReportLabels
from fhir_bridge.review.routing import ReviewerRegistry
from fhir_bridge.review.triage import findings_outcome, missing_summary, triage_case
from fhir_bridge.review.triage_rules import TriageRules
from fhir_bridge.workflow.assignment import Assignments
from fhir_bridge.workflow.case_bundles import BLOB_EXTENSION, CASE_TASK, CaseBundles
from fhir_bridge.workflow.collect import CollectedCase, collect_case
from fhir_bridge.workflow.delivery import CLIENT_SOURCE, Deliveries
from fhir_bridge.workflow.opinions import Opinions
from fhir_bridge.workflow.taskbook import (
    TaskBook,
    case_task,
    extension_value,
    now_instant,
    output_type,
    set_extension,
)

log = structlog.get_logger("fhir_bridge.cases")

COLLECT_JOB = "collect-case"
#: on the stored case Bundle stub only (never served): whose case it is, for the audit of a Bundle read
BUNDLE_PATIENT = f"{CANONICAL_BASE}/StructureDefinition/case-patient"
GENERATION = f"{CANONICAL_BASE}/StructureDefinition/collect-generation"
SourceFactory = Callable[[], AbstractAsyncContextManager[SourcePort]]
Guard = Callable[[str], Awaitable[None]]  # given a ServiceRequest id, raises if the caller may not act on that case
__all__ = ["COLLECT_JOB", "CaseService", "Created", "now_instant"]


@dataclass
class Created:
    resource: Resource
    created: bool


class CaseService:
    """The use cases of the exchange; one per process, built by the composition root."""

    def __init__(
        self,
        *,
        store: ResourceStorePort,
        queue: JobQueuePort,
        blobs: BlobStorePort,
        source: SourceFactory,
        terminology: Terminology,
        work_dir: Path,
        max_attempts: int = 5,
        clock: Callable[[], datetime] | None = None,
        triage_rules: TriageRules,
        registry: ReviewerRegistry,
        deadlines: DeadlinePolicy,
        audit: AuditPort | None = None,
        audit_agent: Party | None = None,
        signer: SignerPort | None = None,
        pseudonym_key: bytes | None = None,
        networks: ReviewerNetworks,
        webhooks: WebhookPort | None = None,
        write_back: WriteBackConfig,
        report_labels: ReportLabels,
        renderers: tuple[Renderer, Renderer] | None = None,
        public_base: str = "",
    ) -> None:
        self.store = store
        self.queue = queue
        self.blobs = blobs
        self.source = source
        self.terminology = terminology
        self.work_dir = work_dir
        self.max_attempts = max_attempts
        self.clock = clock
        self.triage_rules = triage_rules
        self.deadlines = deadlines
        self.audit = audit
        self.book = TaskBook(store, terminology, clock, audit=audit, agent=audit_agent)
        self.registry = registry
        self.assignments = Assignments(self.book, store, self.registry, self.deadlines, clock)
        # bundles are signed when a signer is given (the composition root always gives the bridge's key)
        self.bundles = CaseBundles(store=store, blobs=blobs, registry=self.registry,
                                   networks=networks, signer=signer,
                                   pseudonym_key=pseudonym_key, clock=clock)
        self.deliveries = Deliveries(store=store, queue=queue, book=self.book, webhooks=webhooks, source=source,
                                     write_back=write_back, audit=audit,
                                     agent=audit_agent, public_base=public_base, clock=clock)
        self.opinions = Opinions(store=store, book=self.book, registry=self.registry, terminology=terminology,
                                 match=self._conditional_match, deliveries=self.deliveries, report_labels=report_labels,
                                 renderers=renderers or (render_html, render_pdf), clock=clock)
        self.bundles.rerender = self.opinions.rerendered
        #: told what each pull found (issue 8: the sync marks of :mod:`fhir_bridge.workflow.sync`)
        self.on_collected: Callable[[PatientIdentifier, CollectedCase], Awaitable[None]] | None = None

    # -- reads ----------------------------------------------------------------------------------------

    async def search(
        self, resource_type: str, params: list[tuple[str, str]], count: int, offset: int,
        *, scope: Mapping[str, list[str]] | None = None,
    ) -> tuple[list[Resource], int]:
        """A search, ANDed with ``scope`` (the caller's access criteria, :mod:`fhir_bridge.access.tenancy`)."""
        criteria = {**parse_criteria(resource_type, params), **(scope or {})}
        page = await self.store.search(resource_type, criteria, count=count, offset=offset)
        return page.resources, page.total

    async def _conditional_match(
        self, resource_type: str, if_none_exist: str | None, scope: Mapping[str, list[str]]
    ) -> tuple[Resource | None, str | None]:
        """FHIR R4 http.html#ccreate: 0 matches → create; 1 → that one; more → 412.

        Matched within ``scope`` only (the tenant, the case): a client's conditional create never finds, nor
        collides with, a resource it could not read.
        """
        if not if_none_exist:
            return None, None
        from urllib.parse import parse_qsl

        params = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)
        if not params or any(name.startswith("_") for name, _ in params):
            raise InvalidInput(
                "If-None-Exist must be a search on this type's parameters, such as identifier=system|value"
            )
        criteria = {**parse_criteria(resource_type, params), **scope}
        page = await self.store.search(resource_type, criteria, count=2)
        if page.total > 1:
            raise PreconditionFailed("If-None-Exist matches more than one resource")
        key = f"ine:{resource_type}?" + "&".join(f"{k}={','.join(sorted(v))}" for k, v in sorted(criteria.items()))
        return (page.resources[0] if page.resources else None), key

    # -- the request ----------------------------------------------------------------------------------

    async def submit_request(self, body: Any, *, if_none_exist: str | None = None, tenant: str,
                             client: str | None = None) -> Created:
        """POST ServiceRequest: check, resolve the patient at the source, store, create the Task, enqueue.

        The request, its Task and later its opinions carry the ``tenant`` of the platform that sent it; the
        ``client`` that sent it is kept in ``meta.source`` (it is the one notified of the opinion).
        """
        request = check_request(body, self.terminology)
        existing, unique_key = await self._conditional_match("ServiceRequest", if_none_exist,
                                                             {TENANT_TERM: [tenant]})
        if existing is not None:
            await self._ensure_case(existing, request.deadline)
            return Created(existing, False)
        await self._check_patient_known(request.patient)
        sr = dict(body)
        sr.pop("meta", None)
        sr.pop("id", None)
        # store the INS as checked (a NIR may arrive with spaces): searches and opinions match the normal form
        sr["subject"] = {**sr["subject"], "identifier": {**sr["subject"]["identifier"], "value": request.patient.value}}
        sr["authoredOn"] = sr.get("authoredOn") or now_instant(self.clock)
        sr = with_tenant(sr, tenant)
        if client:
            sr["meta"] = {**sr.get("meta", {}), "source": f"{CLIENT_SOURCE}{client}"}
        stored, created = await self.store.create(sr, index=index_terms(sr), unique_key=unique_key)
        await self._ensure_case(stored, request.deadline)
        return Created(stored, created)

    async def _check_patient_known(self, patient: Any) -> None:
        """A patient the source does not know is refused now (422) rather than failing later.

        One Patient search is cheap; pulling documents still happens in the worker. When the source is
        down, the request is accepted and the worker resolves the patient when it can.
        """
        try:
            with audit_context.bound(patient=patient):
                async with self.source() as source:
                    await source.find_patient(patient)
        except UnknownPatient:
            raise BusinessRuleViolation(
                "the source has no patient with that identifier", expression=["subject.identifier"]
            ) from None
        except SourceUnavailable:
            log.warning("intake.source_unavailable")

    async def _ensure_case(self, sr: Resource, deadline: str | None) -> Resource:
        authored = parse_fhir_datetime(str(sr.get("authoredOn") or "")) or self._now()
        requested = parse_fhir_datetime(deadline, end=True) if deadline else None
        due = due_date(authored, sr.get("priority"), requested, self.deadlines)
        task = with_tenant(new_task(sr, now_instant(self.clock), now_instant(lambda: due), self.terminology),
                           tenant_of(sr))
        stored, _ = await self.store.create(
            task, index=index_terms(task), unique_key=f"task-for:ServiceRequest/{sr['id']}"
        )
        await self.queue.enqueue(COLLECT_JOB, {"task": stored["id"]}, job_id=f"collect:{stored['id']}")
        return stored

    async def task_for(self, request_id: str) -> Resource:
        return await case_task(self.store, request_id)

    # -- the collect job ------------------------------------------------------------------------------

    async def run_collect_job(self, job: Job) -> None:
        """Pull, screen, package and triage the case of ``job.payload['task']``; see the module docstring."""
        task = await self.store.read("Task", job.payload["task"])
        generation = int(job.payload.get("generation", 1))
        collecting = task["status"] == "in-progress" and state_of(task) == "collecting"
        if (task["status"] != "requested" and not collecting) or _generation(task) != generation:
            return  # done by an earlier run of this job, superseded by a refresh, or the case moved on
        request = await self.store.read("ServiceRequest", task["focus"]["reference"].split("/")[-1])
        if task["status"] == "requested":
            task = await self.book.move(task, "in-progress", "collecting")
        checked = check_request(request, self.terminology)
        # One work directory per case: a reclaimed job first removes what a killed worker left (patient data
        # must not linger on disk); the queue's claim heartbeat means no two workers run the job at once.
        work = self._ensure_work_dir() / f"case-{task['id']}"
        await asyncio.to_thread(shutil.rmtree, work, True)
        work.mkdir()
        try:
            with audit_context.bound(patient=checked.patient):
                async with self.source() as source:
                    collected = await collect_case(source, checked.patient, work / "attachments",
                                                   self.terminology)
                    bundle = build_case_bundle(
                        collected.content, terminology=self.terminology, absolute=source.absolute, now=self._now()
                    )
            findings = triage_case(
                bundle,
                specialty=checked.specialty,
                kind=checked.kind,
                patient_identifier=checked.patient,
                problems=collected.problems,
                rules=self.triage_rules,
                now=self._now(),
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
        if self.on_collected is not None:
            await self.on_collected(checked.patient, collected)
        skeleton = await self.blobs.put_bytes(skeleton_bytes(layout))
        stub: Resource = {
            "resourceType": "Bundle",
            "identifier": bundle["identifier"],
            "type": "document",
            "timestamp": bundle["timestamp"],
            "extension": [
                {"url": BLOB_EXTENSION, "valueString": skeleton.digest},
                {"url": BUNDLE_PATIENT, "valueIdentifier": {"system": checked.patient.system,
                                                            "value": checked.patient.value}},
                {"url": CASE_TASK, "valueReference": {"reference": f"Task/{task['id']}"}},
            ],
        }
        stored, _ = await self.store.create(stub, index=self.bundles.stub_index(task["id"]),
                                            unique_key=f"case-bundle:Task/{task['id']}:{generation}")
        current = await self.store.read("Task", task["id"])
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
        await self.queue.enqueue(
            COLLECT_JOB, {"task": task_id, "generation": generation}, job_id=f"collect:{task_id}:{generation}"
        )
        return moved

    async def decline(self, task_id: str, reviewer: str, reason: str) -> Resource:
        task = await self.book.read(task_id)
        request = await self.store.read("ServiceRequest", task["focus"]["reference"].split("/")[-1])
        checked = check_request(request, self.terminology)
        return await self.assignments.decline(task_id, reviewer, reason, request, checked.specialty, checked.kind)

    async def request_documents(self, task_id: str, reviewer: str, text: str) -> Resource:
        return await self.assignments.request_documents(task_id, reviewer, text)

    async def scan_overdue(self) -> list[Resource]:
        return await self.assignments.scan_overdue()

    def _ensure_work_dir(self) -> Path:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return self.work_dir

    def _now(self) -> datetime:
        return self.clock() if self.clock else datetime.now(UTC)

    # -- the bundle -----------------------------------------------------------------------------------

    async def bundle_chunks(self, bundle_id: str, reader: AccessContext | None = None) -> AsyncIterator[bytes]:
        """The case bundle (canonical JSON) with ``id`` and ``meta`` in front and its signature in place; for a
        ``reader`` who :meth:`needs_pseudonym`, the pseudonymised variant, signed as it streams
        (:mod:`fhir_bridge.workflow.case_bundles`)."""
        async for chunk in self.bundles.chunks(bundle_id, reader):
            yield chunk

    # -- pseudonymised readers (fhir_bridge.access.pseudonym) -------------------------------------------------

    def needs_pseudonym(self, reader: AccessContext | None) -> bool:
        """Whether ``reader`` sees cases pseudonymised: a reviewer whose network (``config/reviewers.json``,
        ``config/reviewer-networks.json``) asks for it; a reviewer client naming no known PractitionerRole is
        treated as pseudonymised (fail closed)."""
        return self.bundles.needs_pseudonym(reader)

    def case_pseudonym(self, task_id: str) -> str:
        """The case pseudonym of the case whose Task is ``task_id`` (HMAC of the Task id, bridge secret)."""
        return self.bundles.case_pseudonym(task_id)

    async def case_for_pseudonym(self, pseudonym: str) -> Resource:
        """The Task of the case with this pseudonym (the mapping back, which stays in the bridge); NotFound
        when no packaged case has it."""
        return await self.bundles.case_for_pseudonym(pseudonym)

    async def reader_view(self, resource: Resource, reader: AccessContext | None) -> Resource:
        """A ServiceRequest, Task or DiagnosticReport as ``reader`` may see it: pseudonymised when
        :meth:`needs_pseudonym` (:func:`~fhir_bridge.access.pseudonym.pseudonymise_view`), else as stored."""
        return await self.bundles.reader_view(resource, reader)

    async def reidentified_opinion(self, body: Any, reader: AccessContext | None) -> Any:
        """A DiagnosticReport posted (or amended) by ``reader`` with the INS back in place of the case pseudonym
        when the reader is pseudonymised (else ``body`` as is); give the result to :meth:`submit_opinion` or
        :meth:`amend_opinion`. The pseudonym must be that of the case ``basedOn`` names."""
        return await self.bundles.reidentified_opinion(body, reader)

    # -- the opinion (fhir_bridge.workflow.opinions) ------------------------------------------------------

    async def submit_opinion(self, body: Any, *, if_none_exist: str | None = None, guard: Guard | None = None,
                             author: str | None = None) -> Created:
        """POST DiagnosticReport: a reviewer's (or panel member's) opinion on a ready case; ``guard`` (the
        caller's right to this case) runs as soon as the case is known; ``author`` is the caller's
        PractitionerRole (the bridge signs the opinion with it)."""
        stored, created = await self.opinions.submit(body, if_none_exist=if_none_exist, guard=guard, author=author)
        return Created(stored, created)

    async def amend_opinion(self, report_id: str, body: Any, *, if_match: str | None, guard: Guard | None = None,
                            author: str | None = None) -> Resource:
        """PUT DiagnosticReport/{id}: a new version (amended, corrected, final…); If-Match guards it."""
        return await self.opinions.amend(report_id, body, if_match=if_match, guard=guard, author=author)

    async def delete_opinion(self, report_id: str, *, guard: Guard | None = None, author: str | None = None
                             ) -> None:
        """DELETE DiagnosticReport/{id}: a preliminary opinion retracted by its author (then 410)."""
        await self.opinions.delete(report_id, guard=guard, author=author)


def bundle_patient(stub: Resource) -> PatientIdentifier | None:
    """The patient of a stored case Bundle stub (None for stubs stored before the audit recorded it)."""
    identifier = extension_value(stub, BUNDLE_PATIENT, "valueIdentifier") or {}
    system, value = identifier.get("system"), identifier.get("value")
    return PatientIdentifier(system, value) if isinstance(system, str) and isinstance(value, str) else None


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

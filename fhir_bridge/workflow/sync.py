"""Refreshing open cases from the source, incrementally (``fhir-bridge sync refresh``, issue 8).

Which cases: those waiting for their review (``ready``) or for documents (``on-hold``) — what
:meth:`CaseService.refresh` accepts. A case being collected needs no refresh (its pull is reading the source
now), and a case in review (``in-progress``/``in-review``) is not pulled from under its reviewer, who can ask
for documents instead; closed cases (completed, failed, cancelled…) are done.

How: per *patient* (cases of one patient share one search), a watermark is kept
(:class:`~fhir_bridge.ports.SyncMark`): the newest ``meta.lastUpdated`` seen at the source, in the source's
own words, so its clock and precision decide what is newer, never ours. One search per patient asks what
changed since: ``DocumentReference?patient=<id>&status=current&_lastUpdated=gt<watermark>`` (MHD ITI-67 with
the FHIR ``_lastUpdated`` parameter, search.html#lastUpdated). With ``imaging``, an
``ImagingStudy?patient=<id>&_lastUpdated=gt<watermark>`` search too; without (the default), a new study is
expected to reach the record with its report or KOS DocumentReference, which the first search sees. Nothing
new: nothing else happens. Something new: each of the patient's refreshable cases gets a new collect
generation (a full pull, then triage again), and the watermark moves to the newest change seen.

Where the first watermark comes from: the collect job records the Patient id and the newest lastUpdated it
pulled (:func:`fhir_bridge.workflow.collect.record_pull`, with the marks the composition root gives the case
service). For a case collected before that existed, the Patient is resolved once (one Patient search) and the
watermark is the moment the case's last pull began, by the bridge's clock (the one place our clock meets the
source's; the next change seen replaces it with the source's own).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from fhir_bridge.audit import context as audit_context
from fhir_bridge.case.tasks import state_of, task_patient
from fhir_bridge.case.watermarks import instant_micros, newest_update
from fhir_bridge.errors import BridgeError, BusinessRuleViolation, Conflict
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.ports import SyncStatePort
from fhir_bridge.workflow.cases import CaseService
from fhir_bridge.workflow.collaborators import Ports

log = structlog.get_logger("fhir_bridge.sync")
__all__ = ["REFRESHABLE", "CaseSync", "RefreshReport"]

REFRESHABLE = ("ready", "on-hold")
_PAGE = 500
Progress = Callable[[str, int, int], None]


@dataclass
class RefreshReport:
    """What one refresh did, in counts (no patient is named: the report goes to terminals and logs)."""

    patients: int = 0
    unchanged: int = 0
    changed: int = 0
    cases_refreshed: int = 0
    cases_skipped: int = 0  # moved on between the scan and the refresh (a reviewer took it…)
    searches: int = 0  # requests sent to the source (Patient resolutions included)
    failures: Counter[str] = field(default_factory=Counter)  # error class → patients

    def to_json(self) -> dict[str, object]:
        return {"patients": self.patients, "unchanged": self.unchanged, "changed": self.changed,
                "casesRefreshed": self.cases_refreshed, "casesSkipped": self.cases_skipped,
                "sourceSearches": self.searches, "failed": sum(self.failures.values()),
                "failures": dict(sorted(self.failures.items()))}


class CaseSync:
    """The refresh use case, on the ports (store, source, marks); a changed case is refreshed by
    :meth:`CaseService.refresh`."""

    def __init__(self, ports: Ports, cases: CaseService, marks: SyncStatePort, *, concurrency: int = 4,
                 imaging: bool = False) -> None:
        self.ports, self.cases, self.marks = ports, cases, marks
        self.concurrency, self.imaging = concurrency, imaging

    async def refresh_open_cases(self, progress: Progress | None = None) -> RefreshReport:
        """One incremental search per patient with refreshable cases; refresh the cases of those that changed."""
        by_patient: dict[PatientIdentifier, list[Resource]] = {}
        for task in await self._refreshable_tasks():
            patient = task_patient(task)
            if patient is not None:
                by_patient.setdefault(patient, []).append(task)
        report = RefreshReport(patients=len(by_patient))
        limit, done = asyncio.Semaphore(self.concurrency), 0

        async def one(patient: PatientIdentifier, tasks: list[Resource]) -> None:
            nonlocal done
            async with limit:
                try:
                    await self.refresh_patient(patient, tasks, report)
                except (BridgeError, OSError) as exc:
                    report.failures[type(exc).__name__] += 1
                    log.warning("sync.refresh_failed", error=type(exc).__name__, cases=len(tasks))
            done += 1
            if progress is not None:
                progress("refresh", done, len(by_patient))

        await asyncio.gather(*(one(p, t) for p, t in by_patient.items()))
        log.info("sync.refreshed", **{k: v for k, v in report.to_json().items() if k != "failures"})
        return report

    async def refresh_patient(self, patient: PatientIdentifier, tasks: list[Resource],
                              report: RefreshReport) -> bool:
        """The incremental search for one patient; True when something changed (its cases were refreshed)."""
        mark = await self.marks.get(patient)
        with audit_context.bound(patient=patient):
            async with self.ports.source() as source:
                patient_id = mark.patient_id
                if not patient_id:
                    report.searches += 1
                    patient_id = str((await source.find_patient(patient))["id"])
                watermark = mark.watermark or await self._pull_started(tasks)
                since = {"_lastUpdated": f"gt{watermark}"}
                report.searches += 1
                changed: list[Resource] = await source.find_document_references(patient_id, extra=since)
                if self.imaging:
                    report.searches += 1
                    studies, _ = await source.find_imaging_studies(patient_id, extra=since)
                    changed += studies
        if not changed:
            report.unchanged += 1
            await self.marks.advance(patient, patient_id=patient_id, watermark=None if mark.watermark else watermark)
            return False
        report.changed += 1
        for task in tasks:
            try:
                await self.cases.refresh(task["id"])
                report.cases_refreshed += 1
            except (BusinessRuleViolation, Conflict):
                report.cases_skipped += 1  # it moved on since the scan: collected, taken into review, closed
        # after the refreshes: a crash in between makes the next run see the change again, never miss it
        await self.marks.advance(patient, patient_id=patient_id, watermark=newest_update(changed) or watermark)
        return True

    async def _refreshable_tasks(self) -> list[Resource]:
        tasks: list[Resource] = []
        offset = 0
        while True:
            page = await self.ports.store.search("Task", {"status": list(REFRESHABLE)}, count=_PAGE, offset=offset)
            tasks.extend(page.resources)
            offset += _PAGE
            if offset >= page.total:
                return tasks

    async def _pull_started(self, tasks: list[Resource]) -> str:
        """When the earliest of these cases' last pull began (the Task version that entered ``collecting``)."""
        starts = []
        for task in tasks:
            for version in await self.ports.store.history("Task", task["id"]):  # newest first
                if state_of(version) == "collecting":
                    starts.append(str(version["meta"]["lastUpdated"]))
                    break
        return min(starts, key=instant_micros) if starts else instant(self.ports.clock())

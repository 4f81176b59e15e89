"""Incremental refresh of open cases (issue 8) on the in-memory fakes: one search per patient since its
watermark; only a patient with news gets its cases collected and triaged again."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_bridge.case.watermarks import newest_update
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.workflow.sync import CaseSync
from tests.unit.test_cases import PATIENT, PDF, Bridge, bridge, document, state  # noqa: F401 (fixture)

INS = PatientIdentifier(PATIENT["identifier"]["system"], PATIENT["identifier"]["value"])


def stamped(doc: dict[str, Any], when: str) -> dict[str, Any]:
    return {**doc, "meta": {"versionId": "1", "lastUpdated": when}}


@pytest.fixture
def sync(bridge: Bridge) -> CaseSync:  # noqa: F811
    bridge.source.documents = [stamped(d, "2026-10-01T08:00:00.250Z") for d in bridge.source.documents]
    assert bridge.service.sync is not None  # the bench's marks: every pull records one
    return bridge.service.sync


async def test_a_pull_records_the_patient_id_and_the_newest_update_it_kept(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    await bridge.ready_case()
    mark = await sync.marks.get(INS)
    assert (mark.patient_id, mark.watermark) == ("p1", "2026-10-01T08:00:00.250Z")


async def test_nothing_new_is_one_search_and_nothing_else(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    _, task = await bridge.ready_case()
    bridge.source.calls.clear()
    bridge.source.searches.clear()
    report = await sync.refresh_open_cases()
    assert bridge.source.calls == ["find_document_references"]
    assert bridge.source.searches == [("DocumentReference", {"_lastUpdated": "gt2026-10-01T08:00:00.250Z"})]
    assert report.to_json() == {"patients": 1, "unchanged": 1, "changed": 0, "casesRefreshed": 0,
                                "casesSkipped": 0, "sourceSearches": 1, "failed": 0, "failures": {}}
    assert (await bridge.service.book.for_request(task["focus"]["reference"].split("/")[1]))["meta"]["versionId"] == \
        task["meta"]["versionId"]


async def test_a_new_document_refreshes_the_case_once(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    request, _task = await bridge.ready_case()
    new = stamped(document("d9", PDF), "2026-10-02T09:30:00Z")
    bridge.source.documents.append(new)
    bridge.source.attachments[bridge.source.absolute("Binary/d9")] = PDF
    report = await sync.refresh_open_cases()
    assert (report.changed, report.cases_refreshed) == (1, 1)
    refreshed = await bridge.service.book.for_request(request["id"])
    assert state(refreshed) == ("in-progress", "collecting")
    assert (await sync.marks.get(INS)).watermark == "2026-10-02T09:30:00Z"
    await bridge.queue.drain(bridge.service.cases.run_collect_job)
    assert (await bridge.service.book.for_request(request["id"]))["status"] == "ready"
    bridge.source.searches.clear()
    again = await sync.refresh_open_cases()
    assert (again.changed, again.unchanged) == (0, 1)
    assert bridge.source.searches == [("DocumentReference", {"_lastUpdated": "gt2026-10-02T09:30:00Z"})]


async def test_cases_in_review_or_closed_are_not_searched(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    _request, task = await bridge.ready_case()
    await bridge.service.book.move(task, "in-progress", "in-review")
    bridge.source.calls.clear()
    report = await sync.refresh_open_cases()
    assert (report.patients, bridge.source.calls) == (0, [])


async def test_without_a_mark_the_patient_is_resolved_once_and_the_pull_start_is_the_watermark(
        bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    _request, task = await bridge.ready_case()
    sync.marks.marks.clear()  # type: ignore[attr-defined]  # a case collected before marks were recorded
    history = await bridge.store.history("Task", task["id"])
    started = next(v["meta"]["lastUpdated"] for v in history if state(v)[1] == "collecting")
    bridge.source.calls.clear()
    bridge.source.searches.clear()
    report = await sync.refresh_open_cases()
    assert bridge.source.calls == ["find_patient", "find_document_references"]
    assert bridge.source.searches == [("DocumentReference", {"_lastUpdated": f"gt{started}"})]
    assert report.searches == 2
    assert await sync.marks.get(INS) == type(await sync.marks.get(INS))("p1", started)


async def test_with_imaging_a_second_search_asks_for_new_studies(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    await bridge.ready_case()
    sync.imaging = True
    bridge.source.studies = [{**s, "meta": {"lastUpdated": "2026-10-03T00:00:00Z"}} for s in bridge.source.studies]
    bridge.source.searches.clear()
    report = await sync.refresh_open_cases()
    assert [s[0] for s in bridge.source.searches] == ["DocumentReference", "ImagingStudy"]
    assert (report.changed, report.searches) == (1, 2)


def test_newest_update_compares_instants_not_texts() -> None:
    docs = [{"meta": {"lastUpdated": "2026-10-01T10:00:00+02:00"}}, {"meta": {"lastUpdated": "2026-10-01T09:00:00Z"}},
            {"meta": {"lastUpdated": "not a date"}}, {}]
    assert newest_update(docs) == "2026-10-01T09:00:00Z"
    assert newest_update([]) is None


async def test_the_source_failing_for_a_patient_is_counted_not_raised(bridge: Bridge, sync: CaseSync) -> None:  # noqa: F811
    await bridge.ready_case()
    bridge.source.unavailable = True
    report = await sync.refresh_open_cases()
    assert report.failures == {"SourceUnavailable": 1} and report.changed == 0

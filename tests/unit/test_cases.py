"""The second-opinion use cases (CaseService) on the in-memory fakes: no Redis, no HTTP, no sleeping."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_terminology, load_triage_rules
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.errors import BusinessRuleViolation, InvalidInput, PreconditionFailed, SourceUnavailable
from fhir_bridge.fhir.identity import INS_NIR_TEST, nir_key
from fhir_bridge.fhir.resources import loads, validate
from fhir_bridge.fhir.search_index import tenant_of
from fhir_bridge.ports import Job
from fhir_bridge.workflow.bridge import Bridge as UseCases
from fhir_bridge.workflow.cases import COLLECT_JOB
from tests.fakes import (
    FakeSource,
    InMemoryBlobs,
    InMemoryQueue,
    InMemoryStore,
    InMemorySyncState,
    fake_source_factory,
    make_bridge,
)

TERMS = load_terminology()
LAB_ONLY_RULES = load_triage_rules(extra=[Path(__file__).parent.parent / "data" / "triage-rules-lab-only.json"])
MAX_ATTEMPTS = 3
MASK = "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
NIR = "295109912611193"
PATIENT: dict[str, Any] = {"identifier": {"system": INS_NIR_TEST, "value": NIR}, "specialty": "oncology"}
OTHER_NIR = f"1850775123456{nir_key('1850775123456'):02d}"
OTHER_PATIENT: dict[str, Any] = {"identifier": {"system": INS_NIR_TEST, "value": OTHER_NIR}}
REQUESTS = "https://platform.example/requests"
TENANT = "platform-a"  # the tenant of the platform client that sent the requests (its access token says it)
PDF = b"%PDF-1.4\n" + b"compte rendu operatoire " * 400  # several blob chunks
MASKED = b"%PDF-1.4\nSECRET-MASKED-CONTENT"


def sha1_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data).digest()).decode()


def document(doc_id: str, data: bytes, **extra: Any) -> dict[str, Any]:
    doc = {
        "resourceType": "DocumentReference", "id": doc_id, "status": "current",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:1.2.250.1.999.{doc_id}"},
        "type": {"coding": [{"system": "http://loinc.org", "code": "11502-2"}]},
        "subject": {"reference": "Patient/p1"},
        "content": [{"attachment": {"url": f"Binary/{doc_id}", "contentType": "application/pdf",
                                    "size": len(data), "hash": sha1_b64(data)}}],
    }
    return {**doc, **extra}


def world() -> dict[str, Any]:
    """One patient with a kept document, a masked one, an imaging study and its Endpoint."""
    masked = document("d2", MASKED, securityLabel=[{"coding": [{"system": MASK, "code": "MASQUE_PS"}]}])
    return {
        "patients": [{"resourceType": "Patient", "id": "p1", "identifier": [PATIENT["identifier"]]}],
        "documents": [document("d1", PDF), masked],
        "studies": [{"resourceType": "ImagingStudy", "id": "s1", "status": "available",
                     "subject": {"reference": "Patient/p1"}, "endpoint": [{"reference": "Endpoint/e1"}]}],
        "endpoints": [{"resourceType": "Endpoint", "id": "e1", "status": "active",
                       "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                          "code": "dicom-wado-rs"},
                       "payloadType": [{"text": "DICOM"}], "address": "https://pacs.test/wado"}],
        "attachments": {"Binary/d1": PDF, "Binary/d2": MASKED},
    }


@dataclass
class Bridge:
    service: UseCases
    store: InMemoryStore
    queue: InMemoryQueue
    blobs: InMemoryBlobs
    source: FakeSource

    async def submit(self, request_id: str = "R-1", if_none_exist: str | None = "default", tenant: str = TENANT,
                     **changes: Any) -> Any:
        body = {**second_opinion_request(PATIENT, request_id), **changes}
        ine = f"identifier={REQUESTS}|{request_id}" if if_none_exist == "default" else if_none_exist
        return await self.service.cases.submit_request(body, if_none_exist=ine, tenant=tenant)

    async def ready_case(self) -> tuple[dict[str, Any], dict[str, Any]]:
        request = (await self.submit()).resource
        await self.queue.drain(self.service.cases.run_collect_job)
        task = await self.service.book.for_request(request["id"])
        assert task["status"] == "ready", task.get("statusReason")
        return request, task

    async def total(self, resource_type: str, **criteria: list[str]) -> int:
        return (await self.store.search(resource_type, criteria, count=0)).total

    async def bundle_bytes(self, task: dict[str, Any]) -> bytes:
        reference = output_reference(task, "case-bundle")
        return b"".join([chunk async for chunk in self.service.bundles.chunks(reference.split("/")[1])])


@pytest.fixture
def bridge(tmp_path: Path) -> Bridge:
    store, queue, blobs = InMemoryStore(), InMemoryQueue(max_attempts=MAX_ATTEMPTS), InMemoryBlobs()
    source = FakeSource(world())
    service = make_bridge(store=store, queue=queue, blobs=blobs, source=fake_source_factory(source),
                          terminology=TERMS, work_dir=tmp_path / "work", max_attempts=MAX_ATTEMPTS,
                          triage_rules=LAB_ONLY_RULES, sync_marks=InMemorySyncState())
    return Bridge(service, store, queue, blobs, source)


def output_reference(task: dict[str, Any], code: str) -> str:
    return str(next(o["valueReference"]["reference"] for o in task.get("output", [])
                    if o["type"]["coding"][0]["code"] == code))


def state(task: dict[str, Any]) -> tuple[str, str]:
    return task["status"], task["businessStatus"]["coding"][0]["code"]


def collect_job(task: dict[str, Any], attempt: int = 1) -> Job:
    return Job(f"collect:{task['id']}", COLLECT_JOB, {"task": task["id"]}, attempt)


def opinion(request: dict[str, Any], status: str = "final", patient: dict[str, Any] = PATIENT) -> dict[str, Any]:
    return {**reviewer_opinion(request["id"], patient), "status": status}


# -- the request ----------------------------------------------------------------------------------------


async def test_a_valid_request_creates_the_request_one_task_and_one_collect_job(bridge: Bridge) -> None:
    created = await bridge.submit()
    request = created.resource
    assert created.created and request["meta"]["versionId"] == "1" and request["authoredOn"]
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("requested", "requested")
    assert task["code"]["coding"] == [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]
    assert task["focus"] == {"reference": f"ServiceRequest/{request['id']}"}
    assert task["for"] == {"identifier": PATIENT["identifier"]}
    # due: the earlier of the requester's deadline and authoredOn + 48 h (routine, config/deadlines.json)
    authored = datetime.fromisoformat(request["authoredOn"].replace("Z", "+00:00"))
    expected = min(authored + timedelta(hours=48), datetime(2026, 12, 31, 12, tzinfo=UTC))
    due = datetime.fromisoformat(task["restriction"]["period"]["end"].replace("Z", "+00:00"))
    assert abs((due - expected).total_seconds()) < 1
    validate(task)
    assert await bridge.total("Task") == 1
    assert [(j.kind, j.payload) for j in bridge.queue.enqueued] == [(COLLECT_JOB, {"task": task["id"]})]


async def test_a_retried_request_with_the_same_if_none_exist_returns_the_same_request_and_creates_nothing(
    bridge: Bridge,
) -> None:
    first = await bridge.submit()
    again = await bridge.submit()
    assert not again.created
    assert again.resource == first.resource
    assert (await bridge.total("ServiceRequest"), await bridge.total("Task"), len(bridge.queue.enqueued)) == (1, 1, 1)


async def test_if_none_exist_matches_only_the_requests_of_the_same_tenant(bridge: Bridge) -> None:
    mine = await bridge.submit()
    theirs = await bridge.submit(tenant="platform-b")  # the same identifier, sent by another platform
    assert theirs.created and theirs.resource["id"] != mine.resource["id"]
    assert tenant_of(theirs.resource) == "platform-b" and tenant_of(mine.resource) == TENANT
    assert not (await bridge.submit(tenant="platform-b")).created
    assert (await bridge.total("ServiceRequest"), await bridge.total("Task")) == (2, 2)


async def test_if_none_exist_matching_two_requests_is_a_failed_precondition(bridge: Bridge) -> None:
    await bridge.submit(if_none_exist=None)
    await bridge.submit(if_none_exist=None)
    with pytest.raises(PreconditionFailed):
        await bridge.submit()
    assert await bridge.total("ServiceRequest") == 2


async def test_if_none_exist_with_underscore_parameters_is_refused_not_matched_to_anything(
    bridge: Bridge,
) -> None:
    await bridge.submit("R-1")
    with pytest.raises(InvalidInput):
        await bridge.submit("R-2", if_none_exist="_id=no-such-request")
    assert await bridge.total("ServiceRequest") == 1


async def test_a_request_whose_nir_has_spaces_is_found_and_answered_by_its_normalised_ins(bridge: Bridge) -> None:
    spaced = {"identifier": {"system": INS_NIR_TEST, "value": "2 95 10 99 126 111 93"}}
    request = (await bridge.submit(subject=spaced)).resource
    await bridge.queue.drain(bridge.service.cases.run_collect_job)
    ins = f"{INS_NIR_TEST}|{NIR}"
    assert (await bridge.service.records.search("ServiceRequest", [("subject:identifier", ins)], 10, 0))[1] == 1
    await bridge.service.opinions.submit(opinion(request))


async def test_a_patient_unknown_at_the_source_is_refused_and_nothing_is_stored(bridge: Bridge) -> None:
    bridge.source.patients = []
    with pytest.raises(BusinessRuleViolation) as refused:
        await bridge.submit()
    assert refused.value.expression == ["subject.identifier"]
    assert (await bridge.total("ServiceRequest"), await bridge.total("Task"), bridge.queue.enqueued) == (0, 0, [])


async def test_a_request_is_accepted_while_the_source_is_unavailable(bridge: Bridge) -> None:
    bridge.source.unavailable = True
    created = await bridge.submit()
    assert created.created
    assert state(await bridge.service.book.for_request(created.resource["id"])) == ("requested", "requested")
    assert len(bridge.queue.enqueued) == 1


async def test_an_invalid_request_is_refused_before_the_source_is_asked(bridge: Bridge) -> None:
    with pytest.raises(BusinessRuleViolation):
        await bridge.submit(status="draft")
    assert bridge.source.calls == []
    assert await bridge.total("ServiceRequest") == 0


# -- the collect job ------------------------------------------------------------------------------------


async def test_the_collect_job_makes_the_task_ready_with_the_bundle_and_the_left_out_outcome(bridge: Bridge) -> None:
    _, task = await bridge.ready_case()
    assert state(task) == ("ready", "triaged-ready")
    bundle_ref = output_reference(task, "case-bundle")
    assert bundle_ref.startswith("Bundle/")
    await bridge.store.read("Bundle", bundle_ref.split("/")[1])
    assert output_reference(task, "left-out") == "#left-out"
    outcome, triage = task["contained"]
    assert outcome["resourceType"] == "OperationOutcome" and outcome["id"] == "left-out"
    assert [i["details"]["coding"][0]["code"] for i in outcome["issue"]] == ["masked"]
    assert output_reference(task, "triage") == "#triage" and triage["id"] == "triage"
    assert all(i["severity"] != "error" for i in triage["issue"])
    validate(task)
    assert [state(v)[1] for v in await bridge.store.history("Task", task["id"])] == [
        "triaged-ready", "collecting", "requested"]


async def test_the_served_bundle_is_valid_json_with_id_and_meta_in_front(bridge: Bridge) -> None:
    _, task = await bridge.ready_case()
    served = await bridge.bundle_bytes(task)
    assert len(served) > bridge.blobs.chunk_size  # the head was spliced onto a stream of several chunks
    bundle = json.loads(served)
    stub = await bridge.store.read("Bundle", output_reference(task, "case-bundle").split("/")[1])
    assert list(bundle)[:2] == ["id", "meta"]
    assert (bundle["id"], bundle["meta"]) == (stub["id"], stub["meta"])
    assert bundle["type"] == "document"
    validate(loads(served))
    binaries = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Binary"]
    assert [base64.b64decode(b["data"]) for b in binaries] == [PDF]
    kinds = sorted(e["resource"]["resourceType"] for e in bundle["entry"])
    assert kinds == ["Binary", "Composition", "Device", "DocumentReference", "Endpoint", "ImagingStudy", "Patient"]


async def test_a_masked_document_is_never_packaged(bridge: Bridge) -> None:
    _, task = await bridge.ready_case()
    served = await bridge.bundle_bytes(task)
    assert b"urn:oid:1.2.250.1.999.d2" not in served and b"MASQUE_PS" not in served
    assert base64.b64encode(MASKED) not in served
    assert not any(MASKED in blob for blob in bridge.blobs.blobs.values())
    assert "retrieve https://source.test/fhir/Binary/d2" not in bridge.source.calls


@pytest.mark.parametrize(("attachments", "reason"), [
    ({"Binary/d1": PDF + b"x"}, "size-mismatch"),
    ({"Binary/d1": PDF[:-1] + b"?"}, "hash-mismatch"),
    ({}, "retrieve-failed"),
], ids=["size-mismatch", "hash-mismatch", "retrieve-failed"])
async def test_an_attachment_failing_retrieval_is_left_out_with_its_reason(
    bridge: Bridge, attachments: dict[str, bytes], reason: str
) -> None:
    bridge.source.attachments = {bridge.source.absolute(k): v for k, v in attachments.items()}
    request = (await bridge.submit()).resource
    await bridge.queue.drain(bridge.service.cases.run_collect_job)
    task = await bridge.service.book.for_request(request["id"])
    codes = [i["details"]["coding"][0]["code"] for i in task["contained"][0]["issue"]]
    assert sorted(codes) == sorted(["masked", reason])
    bundle = json.loads(await bridge.bundle_bytes(task))
    assert not [e for e in bundle["entry"] if e["resource"]["resourceType"] in ("Binary", "DocumentReference")]
    # the unreadable document was the required laboratory report: the case waits, saying why
    assert state(task) == ("on-hold", "waiting-for-documents")
    assert "laboratory report" in task["statusReason"]["text"] and reason in task["statusReason"]["text"]
    triage = {i["details"]["coding"][0]["code"]: i["severity"] for i in task["contained"][1]["issue"]}
    assert triage.get("required-document-unreadable") == "error"


async def test_running_the_collect_job_twice_makes_one_bundle_and_no_extra_task_versions(bridge: Bridge) -> None:
    _, task = await bridge.ready_case()
    versions = len(await bridge.store.history("Task", task["id"]))
    await bridge.service.cases.run_collect_job(collect_job(task))
    assert await bridge.total("Bundle") == 1
    assert len(await bridge.store.history("Task", task["id"])) == versions
    assert await bridge.service.book.for_request(task["focus"]["reference"].split("/")[1]) == task


async def test_a_reclaimed_job_reuses_the_bundle_a_crashed_worker_already_stored(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = (await bridge.submit()).resource
    task = await bridge.service.book.for_request(request["id"])

    real_move = bridge.service.book.move

    async def crash(task: dict[str, Any], status: str, *args: Any, **kwargs: Any) -> Any:
        if status in ("ready", "on-hold"):
            raise RuntimeError("worker killed after storing the bundle")
        return await real_move(task, status, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(bridge.service.book, "move", crash)
        with pytest.raises(RuntimeError):
            await bridge.service.cases.run_collect_job(collect_job(task))
    first_bundle = (await bridge.store.search("Bundle", {}, count=10)).resources
    await bridge.service.cases.run_collect_job(collect_job(task, attempt=2))
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("ready", "triaged-ready")
    assert await bridge.total("Bundle") == 1
    assert output_reference(task, "case-bundle") == f"Bundle/{first_bundle[0]['id']}"
    assert len([o for o in task["output"] if o["type"]["coding"][0]["code"] == "case-bundle"]) == 1


async def test_a_source_outage_before_the_last_attempt_is_left_to_the_queue_to_retry(bridge: Bridge) -> None:
    request = (await bridge.submit()).resource
    task = await bridge.service.book.for_request(request["id"])
    bridge.source.unavailable = True
    with pytest.raises(SourceUnavailable):
        await bridge.service.cases.run_collect_job(collect_job(task, attempt=MAX_ATTEMPTS - 1))
    assert state(await bridge.service.book.for_request(request["id"])) == ("in-progress", "collecting")
    assert not list(bridge.service.cases.work_dir.iterdir())  # the work directory is cleaned up anyway


async def test_a_source_outage_on_the_last_attempt_fails_the_task_with_a_reason(bridge: Bridge) -> None:
    request = (await bridge.submit()).resource
    task = await bridge.service.book.for_request(request["id"])
    bridge.source.unavailable = True
    await bridge.service.cases.run_collect_job(collect_job(task, attempt=MAX_ATTEMPTS))
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("failed", "failed")
    assert "SourceUnavailable" in task["statusReason"]["text"]
    assert await bridge.total("Bundle") == 0


async def test_the_queue_retries_an_outage_and_the_case_is_ready_once_the_source_is_back(bridge: Bridge) -> None:
    request = (await bridge.submit()).resource
    bridge.source.unavailable = True

    async def outage_then_recovery(job: Job) -> None:
        bridge.source.unavailable = job.attempt < 2
        await bridge.service.cases.run_collect_job(job)

    assert await bridge.queue.drain(outage_then_recovery) == 2
    assert state(await bridge.service.book.for_request(request["id"])) == ("ready", "triaged-ready")
    assert bridge.queue.dead == []


async def test_a_patient_gone_from_the_source_fails_the_task(bridge: Bridge) -> None:
    request = (await bridge.submit()).resource
    bridge.source.patients = []
    await bridge.queue.drain(bridge.service.cases.run_collect_job)
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("failed", "failed") and task["statusReason"]["text"]
    assert bridge.queue.dead == []  # a permanent failure is recorded on the Task, not retried


async def test_a_redelivered_collect_job_does_not_reopen_a_case_under_review(bridge: Bridge) -> None:
    request, task = await bridge.ready_case()
    await bridge.service.opinions.submit(opinion(request, "preliminary"))
    in_review = await bridge.service.book.for_request(request["id"])
    await bridge.service.cases.run_collect_job(collect_job(task, attempt=2))
    assert await bridge.service.book.for_request(request["id"]) == in_review


# -- the opinion ----------------------------------------------------------------------------------------


async def test_a_final_opinion_completes_the_task_and_is_in_its_output(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    created = await bridge.service.opinions.submit(opinion(request))
    report = created.resource
    assert created.created and report["issued"]
    assert report["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("completed", "opinion-final")
    assert output_reference(task, "opinion") == f"DiagnosticReport/{report['id']}"
    assert output_reference(task, "case-bundle").startswith("Bundle/")
    # the case stays the requesting platform's: the request, its Task and the opinion carry its tenant
    assert tenant_of(request) == tenant_of(task) == tenant_of(report) == TENANT


async def test_a_preliminary_opinion_puts_a_ready_case_in_review(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    await bridge.service.opinions.submit(opinion(request, "preliminary"))
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("in-progress", "in-review")
    assert [o for o in task["output"] if o["type"]["coding"][0]["code"] == "opinion"] == []


async def test_a_final_opinion_after_a_preliminary_one_completes_the_task(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    await bridge.service.opinions.submit(opinion(request, "preliminary"))
    await bridge.service.opinions.submit(opinion(request, "final"))
    assert state(await bridge.service.book.for_request(request["id"])) == ("completed", "opinion-final")


async def test_an_opinion_about_another_patient_is_refused_and_nothing_is_stored(bridge: Bridge) -> None:
    request, task = await bridge.ready_case()
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.submit(opinion(request, patient=OTHER_PATIENT))
    assert await bridge.total("DiagnosticReport") == 0
    assert await bridge.service.book.for_request(request["id"]) == task


async def test_an_opinion_on_an_unknown_request_is_refused(bridge: Bridge) -> None:
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.submit(opinion({"id": "no-such-request"}))
    assert await bridge.total("DiagnosticReport") == 0


@pytest.mark.parametrize("outage", [False, True], ids=["not-collected-yet", "failed"])
async def test_an_opinion_on_a_case_not_ready_for_review_is_refused(bridge: Bridge, outage: bool) -> None:
    request = (await bridge.submit()).resource
    if outage:
        bridge.source.unavailable = True
        await bridge.queue.drain(bridge.service.cases.run_collect_job)
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.submit(opinion(request))
    assert await bridge.total("DiagnosticReport") == 0


async def test_a_new_opinion_must_be_preliminary_or_final(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.submit(opinion(request, "registered"))
    assert await bridge.total("DiagnosticReport") == 0


async def test_a_retried_opinion_with_the_same_if_none_exist_is_stored_once(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    body = {**opinion(request), "identifier": [{"system": "https://reviewer.test/reports", "value": "O-1"}]}
    ine = f"based-on=ServiceRequest/{request['id']}"
    first = await bridge.service.opinions.submit(body, if_none_exist=ine)
    again = await bridge.service.opinions.submit(body, if_none_exist=ine)
    assert not again.created and again.resource == first.resource
    assert await bridge.total("DiagnosticReport") == 1


async def test_amending_with_a_stale_if_match_is_a_failed_precondition(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    report = (await bridge.service.opinions.submit(opinion(request))).resource
    amended = {**report, "status": "amended", "conclusion": "Diagnostic confirmé après relecture."}
    await bridge.service.opinions.amend(report["id"], amended, if_match="1")
    with pytest.raises(PreconditionFailed):
        await bridge.service.opinions.amend(report["id"], amended, if_match="1")
    assert len(await bridge.store.history("DiagnosticReport", report["id"])) == 2


async def test_a_final_opinion_can_not_be_amended_back_to_preliminary(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    report = (await bridge.service.opinions.submit(opinion(request))).resource
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.amend(report["id"], {**report, "status": "preliminary"}, if_match="1")
    assert (await bridge.store.read("DiagnosticReport", report["id"]))["meta"]["versionId"] == "1"


async def test_an_amendment_keeps_the_original_based_on(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    report = (await bridge.service.opinions.submit(opinion(request))).resource
    elsewhere = {**report, "status": "amended", "basedOn": [{"reference": "ServiceRequest/another-one"}]}
    with pytest.raises(BusinessRuleViolation):
        await bridge.service.opinions.amend(report["id"], elsewhere, if_match="1")
    absolute = [{"reference": f"https://bridge.test/fhir/ServiceRequest/{request['id']}/_history/1"}]
    stored = await bridge.service.opinions.amend(report["id"], {**report, "status": "amended", "basedOn": absolute},
                                                if_match="1")
    assert stored["basedOn"] == report["basedOn"] and stored["meta"]["versionId"] == "2"
    found = await bridge.service.records.search("DiagnosticReport",
                                                [("based-on", f"ServiceRequest/{request['id']}")], 10, 0)
    assert found[1] == 1


async def test_an_amended_opinion_is_listed_once_in_the_task_output(bridge: Bridge) -> None:
    request, _ = await bridge.ready_case()
    report = (await bridge.service.opinions.submit(opinion(request))).resource
    await bridge.service.opinions.amend(report["id"], {**report, "status": "amended"}, if_match="1")
    task = await bridge.service.book.for_request(request["id"])
    assert state(task) == ("completed", "opinion-final")
    assert [o["valueReference"] for o in task["output"] if o["type"]["coding"][0]["code"] == "opinion"] == [
        {"reference": f"DiagnosticReport/{report['id']}"}]


# -- deadlines ------------------------------------------------------------------------------------------


async def test_the_overdue_scan_flags_a_late_open_case_once_with_an_injected_clock(tmp_path: Path) -> None:
    now = [datetime(2026, 11, 2, 9, 0, tzinfo=UTC)]
    store, queue = InMemoryStore(clock=lambda: now[0]), InMemoryQueue(max_attempts=MAX_ATTEMPTS)
    service = make_bridge(store=store, queue=queue, blobs=InMemoryBlobs(),
                          source=fake_source_factory(FakeSource(world())), terminology=TERMS,
                          work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES, clock=lambda: now[0])
    body = second_opinion_request(PATIENT, "LATE-1")
    body["occurrenceDateTime"] = "2027-01-01T00:00:00Z"  # the requester's own deadline is later: 48 h rules
    request = (await service.cases.submit_request(body, tenant=TENANT)).resource
    task = await service.book.for_request(request["id"])
    assert task["restriction"]["period"]["end"] == "2026-11-04T09:00:00.000Z"
    now[0] += timedelta(hours=47)
    assert await service.assignments.scan_overdue() == []
    now[0] += timedelta(hours=2)
    [flagged] = await service.assignments.scan_overdue()
    assert any(e["url"].endswith("/overdue") and e["valueBoolean"] for e in flagged["extension"])
    assert "deadline" in flagged["note"][-1]["text"]
    assert await service.assignments.scan_overdue() == []  # flagged once

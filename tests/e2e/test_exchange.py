"""The exchange end to end: real redis-server, `fhir-bridge serve`, `fhir-bridge worker` and the sandbox."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.fhir.resources import validate
from tests.e2e.conftest import Bridge, Sandbox

pytestmark = pytest.mark.e2e
FHIR = {"Content-Type": "application/fhir+json"}


def wait_task(client: httpx.Client, api: str, sr_id: str, statuses: tuple[str, ...] = ("ready", "failed"),
              timeout: float = 60) -> dict[str, Any]:
    """The Task of ServiceRequest ``sr_id`` once in one of ``statuses``, as ``client`` finds it by search."""
    deadline = time.monotonic() + timeout
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = client.get(f"{api}/Task", params={"focus": f"ServiceRequest/{sr_id}"}).raise_for_status().json()
        task = found["entry"][0]["resource"] if found.get("entry") else {}
        if task.get("status") in statuses:
            return task
        time.sleep(0.2)
    raise AssertionError(f"task stayed {task.get('status')}")


def totals(client: httpx.Client, api: str) -> dict[str, int]:
    """What ``client`` (a platform) can count of its own cases."""
    return {t: client.get(f"{api}/{t}", params={"_count": "0"}).raise_for_status().json()["total"]
            for t in ("ServiceRequest", "Task", "DiagnosticReport")}


def post(client: httpx.Client, api: str, path: str, body: object, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"{api}/{path}", content=content, headers={**FHIR, **headers}, timeout=30)


def opinion_as_seen(reviewer: httpx.Client, api: str, sr_id: str) -> dict[str, Any]:
    """The reviewer's opinion on the case, naming the patient as the reviewer sees it: the INS, or the case
    pseudonym when the reviewer's network is pseudonymised (the bridge serves it so)."""
    seen = reviewer.get(f"{api}/ServiceRequest/{sr_id}").raise_for_status().json()
    return reviewer_opinion(sr_id, {"identifier": seen["subject"]["identifier"]})


@pytest.fixture(scope="module")
def platform(bridge: Bridge) -> Iterator[httpx.Client]:
    """The requesting platform (tenant-tagged client with real tokens)."""
    with bridge.client("platform") as client:
        yield client


@pytest.fixture(scope="module")
def reviewer(bridge: Bridge, ready_case: dict[str, Any]) -> Iterator[httpx.Client]:
    """The reviewer the ready case is assigned to."""
    with bridge.client(bridge.reviewer_of(ready_case["task"])) as client:
        yield client


@pytest.fixture(scope="module")
def ready_case(bridge: Bridge, sandbox: Sandbox, platform: httpx.Client) -> dict[str, Any]:
    patient = sandbox.world()["patients"][0]
    answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "E2E-1"),
                  **{"If-None-Exist": "identifier=https://platform.example/requests|E2E-1"})
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"].startswith(f"{bridge.api}/ServiceRequest/")
    sr = answer.json()
    task = wait_task(platform, bridge.api, sr["id"])
    assert task["status"] == "ready", task.get("statusReason")
    return {"patient": patient, "sr": sr, "task": task}


def test_a_request_becomes_a_ready_task_with_a_bundle(
    bridge: Bridge, ready_case: dict[str, Any], platform: httpx.Client, reviewer: httpx.Client
) -> None:
    task = ready_case["task"]
    validate(ready_case["sr"])
    validate(task)
    assert task["code"]["coding"][0]["code"] == "fulfill"
    assert task["focus"]["reference"] == f"ServiceRequest/{ready_case['sr']['id']}"
    assert task["businessStatus"]["coding"][0]["code"] == "triaged-ready"
    bundle_ref = task["output"][0]["valueReference"]["reference"]
    bundle = reviewer.get(f"{bridge.api}/{bundle_ref}").raise_for_status().json()
    validate(bundle)
    assert bundle["type"] == "document" and bundle["id"] == bundle_ref.split("/")[1]
    docs = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    assert len(docs) == len(ready_case["patient"]["documents"]["intact"])
    left_out = {i["details"]["coding"][0]["code"] for i in task["contained"][0]["issue"]}
    assert {"masked", "hash-mismatch"} <= left_out
    history = platform.get(f"{bridge.api}/Task/{task['id']}/_history").json()
    assert [e["resource"]["status"] for e in reversed(history["entry"])] == ["requested", "in-progress", "ready"]
    # the case bundle is for the reviewer: the platform's tokens carry no Bundle scope
    assert platform.get(f"{bridge.api}/{bundle_ref}").status_code == 403


def test_the_reviewers_opinion_is_found_by_based_on(
    bridge: Bridge, ready_case: dict[str, Any], platform: httpx.Client, reviewer: httpx.Client
) -> None:
    sr, patient = ready_case["sr"], ready_case["patient"]
    answer = post(reviewer, bridge.api, "DiagnosticReport", opinion_as_seen(reviewer, bridge.api, sr["id"]))
    assert answer.status_code == 201, answer.text
    report = answer.json()
    validate(report)
    # the requesting platform finds the opinion (it is tagged with the platform's tenant)
    found = platform.get(f"{bridge.api}/DiagnosticReport", params={"based-on": f"ServiceRequest/{sr['id']}"}).json()
    validate(found)
    assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == report["id"]
    ident = patient["identifier"]
    by_patient = platform.get(f"{bridge.api}/DiagnosticReport",
                              params={"subject:identifier": f"{ident['system']}|{ident['value']}"}).json()
    assert [e["resource"]["id"] for e in by_patient["entry"]] == [report["id"]]
    task = platform.get(f"{bridge.api}/Task/{ready_case['task']['id']}").json()
    assert task["status"] == "completed"
    assert {"reference": f"DiagnosticReport/{report['id']}"} in [o["valueReference"] for o in task["output"]]

    # amend with If-Match: new version, history and vread keep the first one
    amended = dict(report, status="amended", conclusion=report["conclusion"] + " (précision ajoutée)")
    stale = reviewer.put(f"{bridge.api}/DiagnosticReport/{report['id']}", json=amended,
                         headers={**FHIR, "If-Match": 'W/"7"'})
    assert stale.status_code == 412 and stale.json()["resourceType"] == "OperationOutcome"
    fresh = reviewer.put(f"{bridge.api}/DiagnosticReport/{report['id']}", json=amended,
                         headers={**FHIR, "If-Match": 'W/"1"'})
    assert fresh.status_code == 200 and fresh.headers["ETag"] == 'W/"2"'
    assert platform.get(f"{bridge.api}/DiagnosticReport/{report['id']}/_history/1").json()["status"] == "final"
    assert platform.get(f"{bridge.api}/DiagnosticReport/{report['id']}/_history").json()["total"] == 2
    assert reviewer.get(f"{bridge.api}/DiagnosticReport/{report['id']}").json()["status"] == "amended"


def test_a_retried_post_with_if_none_exist_creates_no_second_case(
    bridge: Bridge, ready_case: dict[str, Any], platform: httpx.Client
) -> None:
    before = totals(platform, bridge.api)
    again = post(platform, bridge.api, "ServiceRequest", second_opinion_request(ready_case["patient"], "E2E-1"),
                 **{"If-None-Exist": "identifier=https://platform.example/requests|E2E-1"})
    assert again.status_code == 200 and again.json()["id"] == ready_case["sr"]["id"]
    assert totals(platform, bridge.api) == before


def test_prefer_decides_what_a_create_answers(bridge: Bridge, ready_case: dict[str, Any],
                                              platform: httpx.Client) -> None:
    """R4 http.html#ops: Prefer return=minimal (no body), =OperationOutcome, default the resource."""
    key = {"If-None-Exist": "identifier=https://platform.example/requests|E2E-1"}
    minimal = post(platform, bridge.api, "ServiceRequest", second_opinion_request(ready_case["patient"], "E2E-1"),
                   Prefer="return=minimal", **key)
    assert (minimal.status_code, minimal.content) == (200, b"")
    assert minimal.headers["ETag"] == 'W/"1"'
    outcome = post(platform, bridge.api, "ServiceRequest", second_opinion_request(ready_case["patient"], "E2E-1"),
                   Prefer="return=OperationOutcome", **key)
    assert outcome.status_code == 200 and outcome.json()["resourceType"] == "OperationOutcome"
    created = post(platform, bridge.api, "ServiceRequest", second_opinion_request(ready_case["patient"], "E2E-P"),
                   Prefer="return=minimal")
    assert created.status_code == 201 and created.content == b""
    assert created.headers["Location"].startswith(f"{bridge.api}/ServiceRequest/")


def test_another_platform_neither_reads_nor_finds_the_case(bridge: Bridge, ready_case: dict[str, Any]) -> None:
    sr, task = ready_case["sr"], ready_case["task"]
    with bridge.client("platform-other") as other:
        for path in (f"ServiceRequest/{sr['id']}", f"Task/{task['id']}", f"Task/{task['id']}/_history"):
            answer = other.get(f"{bridge.api}/{path}")
            assert answer.status_code == 404 and answer.json()["resourceType"] == "OperationOutcome", path
        found = other.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).json()
        assert found["total"] == 0 and not found.get("entry")


def test_searches_page_with_links(bridge: Bridge, ready_case: dict[str, Any], platform: httpx.Client) -> None:
    first = platform.get(f"{bridge.api}/Task", params={"_count": "1", "status": "ready,completed,failed"}).json()
    assert len(first["entry"]) == 1
    relations = {link["relation"] for link in first["link"]}
    assert "self" in relations
    if first["total"] > 1:
        assert "next" in relations


def unknown_patient_request(sandbox: Sandbox) -> dict[str, Any]:
    return second_opinion_request({"identifier": {"system": "urn:oid:1.2.250.1.213.1.4.10",
                                                  "value": "295109912611193"}, "specialty": "oncology"}, "BAD-1")


BAD_REQUESTS = {
    "unknown patient": ("ServiceRequest", "unknown", 422),
    "malformed NIR": ("ServiceRequest", "bad-nir", 422),
    "malformed JSON": ("ServiceRequest", b'{"resourceType": "ServiceRequest", ', 400),
    "wrong resourceType": ("ServiceRequest", {"resourceType": "Patient", "id": "x"}, 400),
    "not FHIR JSON media type": ("ServiceRequest", "xml", 415),
    "oversized body": ("ServiceRequest", "huge", 413),
    "unknown specialty": ("ServiceRequest", "bad-specialty", 422),
    # the same refusal whether the ServiceRequest exists or is not the reviewer's: no existence leak
    "report for an unknown ServiceRequest": ("DiagnosticReport", "unknown-sr", 403),
    "report for another patient": ("DiagnosticReport", "other-patient", 422),
    "report with a bad status": ("DiagnosticReport", "bad-status", 422),
    "invalid R4": ("DiagnosticReport", {"resourceType": "DiagnosticReport", "status": 12}, 400),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_an_operation_outcome_and_change_nothing(
    case: str, bridge: Bridge, sandbox: Sandbox, ready_case: dict[str, Any], platform: httpx.Client,
    reviewer: httpx.Client,
) -> None:
    path, body, status = BAD_REQUESTS[case]
    patient, sr = ready_case["patient"], ready_case["sr"]
    headers: dict[str, str] = {}
    if body == "unknown":
        body = unknown_patient_request(sandbox)
    elif body == "bad-nir":
        body = second_opinion_request(patient, "BAD-2")
        body["subject"]["identifier"] = {**body["subject"]["identifier"], "value": "295109912611194"}
    elif body == "xml":
        body, headers = b"<ServiceRequest xmlns='http://hl7.org/fhir'/>", {"Content-Type": "text/plain"}
    elif body == "huge":
        body = b'{"resourceType": "ServiceRequest", "note": [{"text": "' + b"x" * (11 * 1024 * 1024) + b'"}]}'
    elif body == "bad-specialty":
        body = second_opinion_request(patient, "BAD-3")
        body["category"][0]["coding"][0]["code"] = "astrology"
    elif body == "unknown-sr":
        body = reviewer_opinion("no-such-request", patient)
    elif body == "other-patient":
        other = sandbox.world()["patients"][1]
        body = reviewer_opinion(sr["id"], other)
    elif body == "bad-status":
        body = dict(opinion_as_seen(reviewer, bridge.api, sr["id"]), status="registered")
    before = totals(platform, bridge.api)
    sender = platform if path == "ServiceRequest" else reviewer  # each the client that may post it
    answer = post(sender, bridge.api, path, body, **headers)
    assert answer.status_code == status, answer.text
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    validate(outcome)
    assert patient["identifier"]["value"] not in answer.text
    assert totals(platform, bridge.api) == before


def test_unknown_resources_and_routes_answer_operation_outcomes(bridge: Bridge, platform: httpx.Client) -> None:
    for url, status in [(f"{bridge.api}/Task/nope", 404), (f"{bridge.api}/Nothing", 404),
                        (f"{bridge.api}/DiagnosticReport?color=blue", 400)]:
        answer = platform.get(url)
        assert answer.status_code == status and answer.json()["resourceType"] == "OperationOutcome"


def test_capability_statement_is_valid(bridge: Bridge) -> None:
    capability = httpx.get(f"{bridge.api}/metadata").raise_for_status().json()  # open: no token needed
    validate(capability)
    assert capability["fhirVersion"] == "4.0.1"


def test_blobs_on_disk_are_encrypted(bridge: Bridge, ready_case: dict[str, Any]) -> None:
    blobs = [p for p in (bridge.data_dir / "blobs").rglob("*") if p.is_file() and ".incoming" not in p.parts]
    assert blobs
    for path in blobs:
        data = path.read_bytes()
        assert data.startswith(b"FHIRBLOB")
        assert b"%PDF" not in data and b"ClinicalDocument" not in data and b"resourceType" not in data

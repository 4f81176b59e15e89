"""FHIR XML end to end (issue 10 item 3, issue 6 item 5): real redis-server, `fhir-bridge serve` and a worker,
the sandbox, real tokens. A platform sends its request in XML and follows the case in XML, the reviewer answers in
XML; hostile XML is refused with nothing stored, read or fetched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.fhir.resources import Resource, validate
from fhir_bridge.fhir.xml import from_xml, to_xml
from tests.e2e.conftest import Bridge, Sandbox
from tests.unit.test_xml_safety import billion_laughs

pytestmark = pytest.mark.e2e
XML = "application/fhir+xml"
LIMIT = 16 * 1024 * 1024
SECRET = "E2E-SECRET-FILE-CONTENT"


def xml_of(answer: httpx.Response) -> Resource:
    assert answer.headers["content-type"] == f"{XML}; charset=utf-8", answer.text
    return from_xml(answer.content, max_bytes=LIMIT)


def totals(client: httpx.Client, api: str) -> dict[str, int]:
    return {t: xml_of(client.get(f"{api}/{t}", params={"_count": "0", "_format": "xml"}))["total"]
            for t in ("ServiceRequest", "Task", "DiagnosticReport")}


def wait_ready(client: httpx.Client, api: str, sr_id: str, timeout: float = 60) -> Resource:
    deadline = time.monotonic() + timeout
    task: Resource = {}
    while time.monotonic() < deadline:
        page = xml_of(client.get(f"{api}/Task", params={"focus": f"ServiceRequest/{sr_id}"}, headers={"Accept": XML}))
        task = page["entry"][0]["resource"] if page.get("entry") else {}
        if task.get("status") in ("ready", "failed"):
            return task
        time.sleep(0.2)
    raise AssertionError(f"task stayed {task.get('status')}")


@pytest.fixture(scope="module")
def platform(bridge: Bridge) -> Iterator[httpx.Client]:
    with bridge.client("platform") as client:
        yield client


def test_a_case_in_xml_from_request_to_opinion(bridge: Bridge, sandbox: Sandbox, platform: httpx.Client) -> None:
    patient = sandbox.world()["patients"][0]
    request = second_opinion_request(patient, "XML-1")
    created = platform.post(f"{bridge.api}/ServiceRequest", content=to_xml(request), headers={
        "Content-Type": XML, "Accept": XML, "If-None-Exist": "identifier=https://platform.example/requests|XML-1"})
    assert created.status_code == 201, created.text
    sr = xml_of(created)
    validate(sr)
    assert sr["identifier"] == request["identifier"] and sr["note"] == request["note"]
    task = wait_ready(platform, bridge.api, sr["id"])
    assert task["status"] == "ready", task.get("statusReason")
    validate(task)
    bundle_ref = next(o["valueReference"]["reference"] for o in task["output"]
                      if o["type"]["coding"][0]["code"] == "case-bundle")
    with bridge.client(bridge.reviewer_of(task)) as reviewer:
        refused = reviewer.get(f"{bridge.api}/{bundle_ref}", headers={"Accept": XML})
        assert refused.status_code == 406 and xml_of(refused)["resourceType"] == "OperationOutcome"
        assert reviewer.get(f"{bridge.api}/{bundle_ref}").json()["type"] == "document"
        opinion = reviewer.post(f"{bridge.api}/DiagnosticReport", content=to_xml(reviewer_opinion(sr["id"], patient)),
                                headers={"Content-Type": XML, "Accept": XML})
        assert opinion.status_code == 201, opinion.text
        assert xml_of(opinion)["status"] == "final"
    reports = xml_of(platform.get(f"{bridge.api}/DiagnosticReport", params={
        "based-on": f"ServiceRequest/{sr['id']}", "_format": "xml"}))
    assert reports["total"] == 1
    validate(reports["entry"][0]["resource"])


def test_hostile_xml_over_http_is_refused_with_nothing_stored_read_or_fetched(
    bridge: Bridge, sandbox: Sandbox, platform: httpx.Client, tmp_path: Path, listener: tuple[int, list[bytes]],
) -> None:
    port, seen = listener
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    patient = sandbox.world()["patients"][0]
    body = to_xml(second_opinion_request(patient, "XML-EVIL")).decode().split("?>", 1)[1]
    leaking = body.replace('<note><text value="', '<note><text value="&leak;')
    payloads: dict[str, bytes] = {
        "XXE file": f'<!DOCTYPE ServiceRequest [<!ENTITY leak SYSTEM "file://{secret}">]>{leaking}'.encode(),
        "XXE network": (f'<!DOCTYPE ServiceRequest [<!ENTITY leak SYSTEM "http://127.0.0.1:{port}/x">]>'
                        f"{leaking}").encode(),
        "external DTD": f'<!DOCTYPE ServiceRequest SYSTEM "http://127.0.0.1:{port}/x.dtd">{body}'.encode(),
        "parameter entities": (f'<!DOCTYPE ServiceRequest [<!ENTITY % f SYSTEM "file://{secret}">'
                               f'<!ENTITY % d SYSTEM "http://127.0.0.1:{port}/d.dtd"> %d;]>{body}').encode(),
        "billion laughs": billion_laughs(),
    }
    before = totals(platform, bridge.api)
    for kind, payload in payloads.items():
        answer = platform.post(f"{bridge.api}/ServiceRequest", content=payload,
                               headers={"Content-Type": XML, "Accept": XML})
        assert answer.status_code == 400, (kind, answer.text)
        outcome: dict[str, Any] = xml_of(answer)
        assert outcome["issue"][0]["diagnostics"] == "DTD/entities are not accepted", kind
        assert SECRET not in answer.text
    huge = to_xml({**second_opinion_request(patient, "XML-BIG"), "note": [{"text": "x" * (11 * 1024 * 1024)}]})
    too_large = platform.post(f"{bridge.api}/ServiceRequest", content=huge, headers={"Content-Type": XML})
    assert too_large.status_code == 413 and too_large.json()["issue"][0]["code"] == "too-long"
    assert totals(platform, bridge.api) == before
    assert seen == []

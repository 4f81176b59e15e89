"""A case without its pathology report waits; once the report reaches the record and a refresh runs, the case
becomes ready and is routed (issue 4). The report is added to the sandbox record through ITI-65, as a
hospital would."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.reference_data import load_registry
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge, start_sandbox
from tests.e2e.test_exchange import post, wait_task
from tests.e2e.test_triage_routing import op, owner

pytestmark = pytest.mark.e2e
PATHOLOGY = "60568-3"


@pytest.fixture(scope="module")
def incomplete(tmp_path_factory: pytest.TempPathFactory, processes: ProcessGroup) -> Iterator[tuple[Bridge, Sandbox]]:
    sandbox = start_sandbox(processes, "sandbox-incomplete", "--patients", "3", "--incomplete", "0", "--no-corrupt")
    data_dir = tmp_path_factory.mktemp("incomplete")
    with EmbeddedRedis(data_dir) as redis, ProcessGroup(data_dir / "logs") as group:
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "incomplete")
        bridge.start_worker("worker-incomplete")
        yield bridge, sandbox


def pathology_report_bundle(patient_id: str, base: str) -> dict[str, Any]:
    """An ITI-65 Provide Document Bundle carrying one pathology report (MHD §2:3.65.4.1.2)."""
    text = "Compte rendu d'anatomie et cytologie pathologiques : adénocarcinome, marges saines.".encode()
    binary_url, doc_url, list_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    now = "2026-11-20T10:00:00Z"
    document = {
        "resourceType": "DocumentReference", "status": "current",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "type": {"coding": [{"system": "http://loinc.org", "code": PATHOLOGY}]},
        "category": [{"coding": [{"system": "https://mos.esante.gouv.fr/NOS/TRE_A03-ClasseDocument/FHIR/"
                                            "TRE-A03-ClasseDocument", "code": "10"}]}],
        "subject": {"reference": f"Patient/{patient_id}"}, "date": now,
        "content": [{"attachment": {"contentType": "text/plain", "url": binary_url, "size": len(text),
                                    "hash": base64.b64encode(hashlib.sha1(text).digest()).decode(),
                                    "title": "Compte rendu ACP", "creation": now}}],
        "context": {"period": {"start": now}},
    }
    submission = {
        "resourceType": "List", "status": "current", "mode": "working", "date": now,
        "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                             "code": "submissionset"}]},
        "extension": [{"url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId",
                       "valueIdentifier": {"value": "urn:oid:1.2.250.1.999.1"}}],
        "subject": {"reference": f"Patient/{patient_id}"}, "entry": [{"item": {"reference": doc_url}}],
    }
    entries = [(list_url, submission, "List"), (doc_url, document, "DocumentReference"),
               (binary_url, {"resourceType": "Binary", "contentType": "text/plain",
                             "data": base64.b64encode(text).decode()}, "Binary")]
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": url, "resource": res, "request": {"method": "POST", "url": kind}}
                      for url, res, kind in entries]}


def test_a_case_missing_its_pathology_waits_then_is_ready_and_routed_after_a_refresh(
    incomplete: tuple[Bridge, Sandbox], tmp_path: Path
) -> None:
    bridge, sandbox = incomplete
    world = sandbox.world()
    patient = next(p for p in world["patients"] if p.get("incomplete"))
    with bridge.client("platform") as platform:
        answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "INCOMPLETE-1"))
        assert answer.status_code == 201, answer.text
        sr = answer.json()
        task = wait_task(platform, bridge.api, sr["id"], statuses=("ready", "failed", "on-hold"))
        assert task["status"] == "on-hold", task.get("statusReason")
        assert task["businessStatus"]["coding"][0]["code"] == "waiting-for-documents"
        reason = task["statusReason"]["text"]
        assert "pathology" in reason and "anatomie" in reason  # exactly what is missing, in English and French
        triage = next(c for c in task["contained"] if c["id"] == "triage")
        blocking = [i for i in triage["issue"] if i["severity"] == "error"]
        assert [i["details"]["coding"][0]["code"] for i in blocking] == ["missing-document"]
        assert not task.get("owner")  # never sent to a reviewer

        provided = httpx.post(f"{sandbox.url}", json=pathology_report_bundle(patient["id"], sandbox.url),
                              headers={"Content-Type": "application/fhir+json"}, timeout=30)
        assert provided.status_code == 200, provided.text

        with bridge.client("operator") as operator:  # hospital IT refreshes open cases (any tenant's)
            assert operator.get(f"{bridge.api}/Task/{task['id']}").status_code == 403  # it runs jobs, reads nothing
            refreshed = op(operator, bridge, task["id"], "refresh")
        assert refreshed.status_code == 200, refreshed.text
        ready = wait_task(platform, bridge.api, sr["id"], statuses=("ready", "failed", "on-hold"))
        assert ready["status"] == "ready", ready.get("statusReason")
        assert patient["specialty"] in load_registry().reviewers[owner(ready)].specialties

"""ITI-65 Provide Document Bundle into the sandbox, then ITI-67/68 find and retrieve what was written."""

from __future__ import annotations

import base64
import copy
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fhir_bridge.fhir.resources import validate
from fhir_bridge.sandbox.app import SandboxConfig, create_app

BASE = "http://sandbox.test"
FHIR_JSON = "application/fhir+json"
OPINION = "Avis de second recours : la proposition de la RCP est confirmée. Réévaluation à trois mois.\n".encode()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(SandboxConfig(page_cap=50))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


async def _patient(client: httpx.AsyncClient, index: int = 0) -> dict[str, Any]:
    patient: dict[str, Any] = (await client.get("/_sandbox/world")).json()["patients"][index]
    return patient


def provide_bundle(patient_id: str, *, data: bytes = OPINION, replaces: str | None = None) -> dict[str, Any]:
    """A minimal MHD ITI-65 Bundle: one SubmissionSet, one DocumentReference, one Binary."""
    list_url, doc_url, bin_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    reference: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4",
                             "display": "CR ou fiche de consultation ou de visite"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": "2025-11-05T10:00:00+01:00",
        "content": [{"attachment": {
            "contentType": "text/plain", "language": "fr-FR", "url": bin_url, "size": len(data),
            "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(), "title": "Avis de second recours",
        }}],
    }
    if replaces:
        reference["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{replaces}"}}]
    submission = {
        "resourceType": "List",
        "extension": [{"url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId",
                       "valueIdentifier": {"value": "urn:oid:2.25.1"}}],
        "identifier": [{"use": "usual", "system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}],
        "status": "current",
        "mode": "working",
        "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                             "code": "submissionset"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "date": "2025-11-05T10:00:00+01:00",
        "entry": [{"item": {"reference": doc_url}}],
    }
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(data).decode()}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": list_url, "resource": submission, "request": {"method": "POST", "url": "List"}},
            {"fullUrl": doc_url, "resource": reference, "request": {"method": "POST", "url": "DocumentReference"}},
            {"fullUrl": bin_url, "resource": binary, "request": {"method": "POST", "url": "Binary"}},
        ],
    }


async def _post(client: httpx.AsyncClient, bundle: dict[str, Any]) -> httpx.Response:
    return await client.post("/fhir", json=bundle, headers={"Content-Type": FHIR_JSON})


async def test_a_provided_document_is_then_found_and_retrieved(client: httpx.AsyncClient) -> None:
    patient = await _patient(client)
    bundle = provide_bundle(patient["id"])
    validate(bundle)
    response = await _post(client, bundle)
    assert response.status_code == 200, response.text
    answer = response.json()
    validate(answer)
    assert answer["type"] == "transaction-response" and len(answer["entry"]) == 3
    assert all(e["response"]["status"] == "201 Created" for e in answer["entry"])
    locations = [e["response"]["location"] for e in answer["entry"]]
    assert locations[0].startswith("List/") and locations[1].startswith("DocumentReference/")
    assert locations[2].startswith("Binary/") and all(loc.endswith("/_history/1") for loc in locations)
    doc_id = locations[1].split("/")[1]
    found = (await client.get("/fhir/DocumentReference", params={"patient": patient["id"], "status": "current",
                                                                 "_count": "50"})).json()
    written = next(e["resource"] for e in found["entry"] if e["resource"]["id"] == doc_id)
    validate(written)
    attachment = written["content"][0]["attachment"]
    assert attachment["url"] == f"{BASE}/fhir/Binary/{doc_id}" and attachment["size"] == len(OPINION)
    assert (await client.get(attachment["url"])).content == OPINION
    submission = (await client.get(f"/fhir/{locations[0].rsplit('/_history', 1)[0]}")).json()
    assert submission["entry"] == [{"item": {"reference": f"DocumentReference/{doc_id}"}}]


def update_document_refs(old_id: str) -> dict[str, Any]:
    """The UpdateDocumentRefs entry of an MHD replace: a FHIRPath Patch setting the old status to superseded."""
    patch = {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"},
        {"name": "path", "valueString": "DocumentReference.status"},
        {"name": "value", "valueCode": "superseded"},
    ]}]}
    return {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": patch,
            "request": {"method": "PATCH", "url": f"DocumentReference/{old_id}"}}


async def test_an_mhd_replace_with_its_patch_entry_supersedes_the_old_document(client: httpx.AsyncClient) -> None:
    patient = await _patient(client)
    old = patient["documents"]["current_unmasked"][1]
    bundle = provide_bundle(patient["id"], replaces=old)
    bundle["entry"].insert(2, update_document_refs(old))
    validate(bundle)
    response = await _post(client, bundle)
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert statuses == ["201 Created", "201 Created", "200 OK", "201 Created"]
    assert response.json()["entry"][2]["response"]["location"] == f"DocumentReference/{old}/_history/2"
    replaced = (await client.get(f"/fhir/DocumentReference/{old}")).json()
    assert replaced["status"] == "superseded" and replaced["meta"]["versionId"] == "2"


async def test_a_patch_without_a_replacing_document_is_refused(client: httpx.AsyncClient) -> None:
    patient = await _patient(client)
    bundle = provide_bundle(patient["id"])
    bundle["entry"].append(update_document_refs(patient["documents"]["current_unmasked"][1]))
    assert (await _post(client, bundle)).status_code == 422


async def test_a_replacing_document_supersedes_the_old_one(client: httpx.AsyncClient) -> None:
    patient = await _patient(client, 2)
    old = patient["documents"]["current_unmasked"][0]
    response = await _post(client, provide_bundle(patient["id"], replaces=old))
    assert response.status_code == 200, response.text
    assert (await client.get(f"/fhir/DocumentReference/{old}")).json()["status"] == "superseded"
    superseded = (await client.get("/fhir/DocumentReference",
                                   params={"patient": patient["id"], "status": "superseded"})).json()
    assert old in {e["resource"]["id"] for e in superseded["entry"]}
    again = await _post(client, provide_bundle(patient["id"], replaces=old))
    assert again.status_code == 422  # an already superseded document cannot be replaced twice


def _unknown_patient(bundle: dict[str, Any]) -> dict[str, Any]:
    for entry in bundle["entry"][:2]:
        entry["resource"]["subject"] = {"reference": "Patient/nobody"}
    return bundle


def _without_binary_url(bundle: dict[str, Any]) -> dict[str, Any]:
    bundle["entry"][1]["resource"]["content"][0]["attachment"]["url"] = "http://elsewhere.example/doc.txt"
    return bundle


def _two_submission_sets(bundle: dict[str, Any]) -> dict[str, Any]:
    twin = copy.deepcopy(bundle["entry"][0])
    twin["fullUrl"] = f"urn:uuid:{uuid.uuid4()}"
    bundle["entry"].append(twin)
    return bundle


def _inline_data(bundle: dict[str, Any]) -> dict[str, Any]:
    bundle["entry"][1]["resource"]["content"][0]["attachment"]["data"] = base64.b64encode(OPINION).decode()
    return bundle


def _wrong_hash(bundle: dict[str, Any]) -> dict[str, Any]:
    bundle["entry"][1]["resource"]["content"][0]["attachment"]["hash"] = base64.b64encode(b"x" * 20).decode()
    return bundle


def _batch(bundle: dict[str, Any]) -> dict[str, Any]:
    bundle["type"] = "batch"
    return bundle


@pytest.mark.parametrize(("spoil", "status"), [
    (_unknown_patient, 422),
    (_without_binary_url, 422),
    (_two_submission_sets, 422),
    (_inline_data, 422),
    (_wrong_hash, 422),
    (_batch, 400),
])
async def test_a_bad_bundle_is_refused_and_nothing_is_stored(
    client: httpx.AsyncClient, spoil: Any, status: int
) -> None:
    patient = await _patient(client)
    before = (await client.get("/_sandbox/world")).json()
    response = await _post(client, spoil(provide_bundle(patient["id"])))
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert (await client.get("/_sandbox/world")).json() == before


async def test_a_known_master_identifier_is_a_conflict(client: httpx.AsyncClient) -> None:
    patient = await _patient(client)
    bundle = provide_bundle(patient["id"])
    assert (await _post(client, bundle)).status_code == 200
    again = provide_bundle(patient["id"])
    again["entry"][1]["resource"]["masterIdentifier"] = bundle["entry"][1]["resource"]["masterIdentifier"]
    assert (await _post(client, again)).status_code == 409


async def test_iti65_takes_fhir_json_only(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir", content=b"<Bundle/>", headers={"Content-Type": "application/fhir+xml"})
    assert response.status_code == 415
    broken = await client.post("/fhir", content=b"{not json", headers={"Content-Type": FHIR_JSON})
    assert broken.status_code == 400

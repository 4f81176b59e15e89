"""The sandbox's FHIR API in process: ITI-67 searches and paging, ITI-68 retrieves, imaging, reads, errors."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fhir_bridge.fhir.resources import validate
from fhir_bridge.sandbox.app import SandboxConfig, create_app
from fhir_bridge.sandbox.render import MASQUE_PS, VISIBILITY_SYSTEM

BASE = "http://sandbox.test"
FHIR_JSON = "application/fhir+json"


def _client(**config: Any) -> httpx.AsyncClient:
    app = create_app(SandboxConfig(**config))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with _client(page_cap=4) as c:
        yield c


async def _expect(client: httpx.AsyncClient, patient: int = 0) -> dict[str, Any]:
    expected: dict[str, Any] = (await client.get("/_sandbox/world")).json()["patients"][patient]
    return expected


async def _all_pages(client: httpx.AsyncClient, path: str, params: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Follow Bundle.link[next] to the end; return every entry and how many pages there were."""
    response = await client.get(path, params=params)
    entries, pages, seen = [], 0, set()
    while True:
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith(FHIR_JSON)
        bundle = response.json()
        assert bundle["type"] == "searchset"
        pages += 1
        entries += bundle.get("entry", [])
        next_url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
        if next_url is None:
            return entries, pages
        assert next_url.startswith(BASE) and next_url not in seen
        seen.add(next_url)
        response = await client.get(next_url)


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"]


async def test_metadata_is_a_truthful_r4_capability_statement(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200 and response.headers["content-type"].startswith(FHIR_JSON)
    statement = response.json()
    validate(statement)
    assert statement["fhirVersion"] == "4.0.1" and statement["implementation"]["url"] == f"{BASE}/fhir"
    types = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {"Patient", "DocumentReference", "Binary", "ImagingStudy", "Endpoint"} <= types


async def test_patient_is_found_by_its_ins_and_read_by_id(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    token = f"{p0['identifier']['system']}|{p0['identifier']['value']}"
    bundle = (await client.get("/fhir/Patient", params={"identifier": token})).json()
    assert bundle["total"] == 1 and bundle["entry"][0]["resource"]["id"] == p0["id"]
    patient = (await client.get(f"/fhir/Patient/{p0['id']}")).json()
    validate(patient)
    ins = patient["identifier"][0]
    assert ins["type"]["coding"][0]["code"] == "INS-NIR-TEST" and ins["value"] == p0["identifier"]["value"]
    unknown = (await client.get("/fhir/Patient", params={"identifier": "urn:oid:1.2.250.1.213.1.4.10|x"})).json()
    assert unknown["total"] == 0 and "entry" not in unknown
    missing = await client.get("/fhir/Patient/nobody")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


async def test_paging_respects_the_cap_and_next_links_chain_to_the_end_without_duplicates(
    client: httpx.AsyncClient,
) -> None:
    p0 = await _expect(client)
    first = (await client.get("/fhir/DocumentReference",
                              params={"patient": p0["id"], "status": "current", "_count": "100"})).json()
    assert len(first["entry"]) == 4 and first["total"] == len(p0["documents"]["current"])
    entries, pages = await _all_pages(client, "/fhir/DocumentReference", {"patient": p0["id"], "status": "current"})
    ids = _ids(entries)
    assert len(ids) == len(set(ids)) and set(ids) == set(p0["documents"]["current"])
    assert pages == -(-len(ids) // 4)


async def test_status_filter_and_its_comma_or(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    superseded, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient": p0["id"], "status": "superseded"})
    assert set(_ids(superseded)) == set(p0["documents"]["superseded"])
    both, _ = await _all_pages(client, "/fhir/DocumentReference",
                               {"patient": p0["id"], "status": "current,superseded"})
    assert set(_ids(both)) == set(p0["documents"]["current"]) | set(p0["documents"]["superseded"])
    bad = await client.get("/fhir/DocumentReference", params={"patient": p0["id"], "status": "final"})
    assert bad.status_code == 400


@pytest.mark.parametrize("params", [{"status": "current"}, {"patient": "x"}, {"patient": "", "status": "current"}, {}])
async def test_iti67_without_patient_or_status_is_a_400_operation_outcome(
    client: httpx.AsyncClient, params: dict[str, str]
) -> None:
    response = await client.get("/fhir/DocumentReference", params=params)
    assert response.status_code == 400
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"


async def test_chained_patient_identifier_and_post_search_give_the_same_documents(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client, 1)
    token = f"{p0['identifier']['system']}|{p0['identifier']['value']}"
    by_id, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient": p0["id"], "status": "current"})
    chained, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient.identifier": token, "status": "current"})
    posted = await client.post("/fhir/DocumentReference/_search", data={"patient": p0["id"], "status": "current"})
    assert posted.status_code == 200 and posted.json()["total"] == len(by_id)
    assert _ids(by_id) == _ids(chained) and _ids(posted.json()["entry"]) == _ids(by_id)[:4]
    wrong_type = await client.post("/fhir/DocumentReference/_search", json={"patient": p0["id"]})
    assert wrong_type.status_code == 415


async def test_type_and_last_updated_filters(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    entries, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient": p0["id"], "status": "current"})
    resources = [e["resource"] for e in entries]
    code = resources[0]["type"]["coding"][0]["code"]
    typed, _ = await _all_pages(client, "/fhir/DocumentReference",
                                {"patient": p0["id"], "status": "current", "type": f"http://loinc.org|{code}"})
    assert {r["id"] for r in resources if r["type"]["coding"][0]["code"] == code} == set(_ids(typed))
    stamps = sorted(r["meta"]["lastUpdated"] for r in resources)
    middle = stamps[len(stamps) // 2]
    newer, _ = await _all_pages(client, "/fhir/DocumentReference",
                                {"patient": p0["id"], "status": "current", "_lastUpdated": f"ge{middle}"})
    older, _ = await _all_pages(client, "/fhir/DocumentReference",
                                {"patient": p0["id"], "status": "current", "_lastUpdated": f"lt{middle}"})
    assert sorted(_ids(newer) + _ids(older)) == sorted(_ids(entries))
    assert all(e["resource"]["meta"]["lastUpdated"] >= middle for e in newer)
    bad = await client.get("/fhir/DocumentReference",
                           params={"patient": p0["id"], "status": "current", "_lastUpdated": "ge-yesterday"})
    assert bad.status_code == 400


async def test_masked_and_superseded_documents_look_as_mhd_says(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    masked = (await client.get(f"/fhir/DocumentReference/{p0['documents']['masked'][0]}")).json()
    labels = [c for label in masked["securityLabel"] for c in label["coding"]]
    assert {"system": VISIBILITY_SYSTEM, "code": MASQUE_PS} in [{"system": c["system"], "code": c["code"]}
                                                                for c in labels]
    for new_id, old_id in p0["documents"]["replaces"].items():
        new = (await client.get(f"/fhir/DocumentReference/{new_id}")).json()
        assert new["relatesTo"] == [{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}]
        assert (await client.get(f"/fhir/DocumentReference/{old_id}")).json()["status"] == "superseded"


async def _check_attachments(client: httpx.AsyncClient, patient: dict[str, Any]) -> set[str]:
    """Retrieve every current document; return the ids whose bytes do not match size and hash."""
    entries, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient": patient["id"], "status": "current"})
    mismatched = set()
    for entry in entries:
        resource = entry["resource"]
        assert len(resource["content"]) == 1
        attachment = resource["content"][0]["attachment"]
        assert "data" not in attachment and attachment["url"].startswith(f"{BASE}/fhir/Binary/")
        response = await client.get(attachment["url"])
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == attachment["contentType"]
        assert int(response.headers["content-length"]) == len(response.content)
        digest = base64.b64encode(hashlib.sha1(response.content).digest()).decode()
        if (len(response.content), digest) != (attachment["size"], attachment["hash"]):
            mismatched.add(resource["id"])
    return mismatched


async def test_corrupt_bytes_differ_from_the_hash_only_when_corruption_is_on() -> None:
    async with _client(page_cap=50) as on:
        p0 = await _expect(on)
        expected = set(p0["documents"]["corrupt"]) | set(p0["documents"]["truncated"])
        assert len(expected) == 2
        assert await _check_attachments(on, p0) == expected
    async with _client(page_cap=50, corrupt=False) as off:
        p0 = await _expect(off)
        assert p0["documents"]["corrupt"] == [] and await _check_attachments(off, p0) == set()


async def test_intact_pdf_attachments_are_whole_pdfs(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    entries, _ = await _all_pages(client, "/fhir/DocumentReference", {"patient": p0["id"], "status": "current"})
    pdfs = [e["resource"]["content"][0]["attachment"] for e in entries
            if e["resource"]["content"][0]["attachment"]["contentType"] == "application/pdf"
            and e["resource"]["id"] in p0["documents"]["intact"]]
    assert pdfs
    for attachment in pdfs:
        data = (await client.get(attachment["url"])).content
        assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")


async def test_binary_as_a_fhir_resource_and_unknown_binary(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client, 1)
    doc_id = p0["documents"]["intact"][0]
    raw = (await client.get(f"/fhir/Binary/{doc_id}")).content
    binary = await client.get(f"/fhir/Binary/{doc_id}", headers={"Accept": FHIR_JSON})
    assert binary.headers["content-type"].startswith(FHIR_JSON)
    validate(binary.json())
    assert base64.b64decode(binary.json()["data"]) == raw
    assert (await client.get(f"/fhir/Binary/{doc_id}", headers={"Accept": "image/png"})).status_code == 406
    assert (await client.get("/fhir/Binary/nothing")).status_code == 404


async def test_imaging_studies_with_their_endpoint(client: httpx.AsyncClient) -> None:
    p0 = await _expect(client)
    bundle = (await client.get("/fhir/ImagingStudy",
                               params={"patient": p0["id"], "_include": "ImagingStudy:endpoint"})).json()
    matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
    included = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert {e["resource"]["id"] for e in matches} == set(p0["studies"])
    for entry in matches:
        study = entry["resource"]
        assert study["identifier"][0] == {"system": "urn:dicom:uid",
                                          "value": f"urn:oid:{p0['study_uids'][study['id']]}"}
        assert all(not s["uid"].startswith("urn:") for s in study["series"])
    assert len(included) == 1 and included[0]["resourceType"] == "Endpoint"
    endpoint = (await client.get(f"/fhir/Endpoint/{included[0]['id']}")).json()
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["address"].startswith(BASE) and not endpoint["address"].endswith("/")
    study_id = p0["studies"][0]
    assert (await client.get(f"/fhir/ImagingStudy/{study_id}")).json()["id"] == study_id


async def test_unknown_routes_are_404_outcomes_and_unknown_parameters_are_ignored(client: httpx.AsyncClient) -> None:
    for path in ("/fhir/Observation", "/fhir/Endpoint/none", "/fhir/DocumentReference/none", "/nowhere"):
        response = await client.get(path)
        assert response.status_code == 404 and response.json()["resourceType"] == "OperationOutcome"
    p0 = await _expect(client)
    bundle = (await client.get("/fhir/DocumentReference",
                               params={"patient": p0["id"], "status": "current", "colour": "blue"})).json()
    assert bundle["total"] == len(p0["documents"]["current"])
    assert "colour" not in bundle["link"][0]["url"]


async def test_public_base_url_is_used_in_every_url() -> None:
    async with _client(public_base_url="https://records.example.fr/") as client:
        p0 = await _expect(client)
        bundle = (await client.get("/fhir/DocumentReference", params={"patient": p0["id"], "status": "current"})).json()
        assert bundle["link"][0]["url"].startswith("https://records.example.fr/fhir/DocumentReference?")
        assert bundle["entry"][0]["fullUrl"].startswith("https://records.example.fr/fhir/")
        url = bundle["entry"][0]["resource"]["content"][0]["attachment"]["url"]
        assert url.startswith("https://records.example.fr/fhir/Binary/")


async def test_every_emitted_resource_is_valid_r4() -> None:
    async with _client(page_cap=50, patients=6) as client:
        summary = (await client.get("/_sandbox/world")).json()
        for patient in summary["patients"]:
            validate((await client.get(f"/fhir/Patient/{patient['id']}")).json())
            for status in ("current", "superseded", "entered-in-error"):
                bundle = (await client.get("/fhir/DocumentReference",
                                           params={"patient": patient["id"], "status": status})).json()
                validate(bundle)
                for entry in bundle.get("entry", []):
                    validate(entry["resource"])
            studies = (await client.get("/fhir/ImagingStudy",
                                        params={"patient": patient["id"], "_include": "ImagingStudy:endpoint"})).json()
            validate(studies)
        validate((await client.get("/fhir/Organization/org-chu")).json())
        validate((await client.get("/fhir/Patient/none")).json())

"""Case packaging: a valid R4 document Bundle whose references resolve inside it."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

from fhir_bridge.packaging import CaseContent, PackagedDocument, build_case_bundle, write_bundle
from fhir_bridge.resources import validate
from fhir_bridge.terminology import load_terminology

BASE = "https://source.test/fhir"
TERMS = load_terminology()


def absolute(ref: str) -> str:
    return ref if "://" in ref else f"{BASE}/{ref}"


def make_case(tmp_path: Path) -> CaseContent:
    patient = {"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"},
               "identifier": [{"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "295109912611193"}],
               "name": [{"family": "Lefèvre", "given": ["Hélène"]}]}
    data = b"%PDF-1.4\n" + b"x" * 5000
    (tmp_path / "a.pdf").write_bytes(data)
    sha1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
    doc = {"resourceType": "DocumentReference", "id": "d1", "status": "current",
           "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4"},
           "type": {"coding": [{"system": "http://loinc.org", "code": "60568-3"}]},
           "subject": {"reference": "Patient/p1"}, "author": [{"reference": "Practitioner/pr1"}],
           "securityLabel": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                                          "code": "R"}]}],
           "content": [{"attachment": {"url": f"{BASE}/Binary/b1", "contentType": "application/pdf"}}]}
    study = {"resourceType": "ImagingStudy", "id": "s1", "status": "available",
             "subject": {"reference": f"{BASE}/Patient/p1"}, "endpoint": [{"reference": "Endpoint/e1"}]}
    endpoint = {"resourceType": "Endpoint", "id": "e1", "status": "active",
                "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                   "code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}], "address": "https://pacs.test/wado"}
    return CaseContent(patient=patient,
                       documents=[PackagedDocument(doc, tmp_path / "a.pdf", "application/pdf", len(data), sha1)],
                       studies=[study], endpoints={f"{BASE}/Endpoint/e1": endpoint})


def test_case_bundle_is_a_valid_r4_document_with_resolving_references(tmp_path: Path) -> None:
    bundle = build_case_bundle(make_case(tmp_path), terminology=TERMS, absolute=absolute,
                               now=datetime(2026, 11, 21, tzinfo=UTC), new_uuid=uuid.uuid4)
    path = tmp_path / "bundle.json"
    write_bundle(bundle, path)
    written = json.loads(path.read_text("utf-8"))
    validate(written)
    entries = written["entry"]
    assert entries[0]["resource"]["resourceType"] == "Composition"  # bdl-11
    assert written["identifier"]["system"] and written["timestamp"]  # bdl-9, bdl-10
    full_urls = {e["fullUrl"] for e in entries}
    assert all(u.startswith("urn:uuid:") for u in full_urls)
    refs: list[str] = []

    def walk(obj: object) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "reference":
                    refs.append(v)
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    walk(written)
    internal = [r for r in refs if r.startswith("urn:uuid:")]
    assert internal and all(r in full_urls for r in internal)
    assert f"{BASE}/Practitioner/pr1" in refs  # outside references become absolute at the source
    by_type = {}
    for e in entries:
        by_type.setdefault(e["resource"]["resourceType"], []).append(e)
    doc = by_type["DocumentReference"][0]["resource"]
    binary = next(e for e in entries if e["fullUrl"] == doc["content"][0]["attachment"]["url"])["resource"]
    assert base64.b64decode(binary["data"]) == (tmp_path / "a.pdf").read_bytes()
    assert doc["masterIdentifier"]["value"] == "urn:oid:1.2.3.4"
    assert doc["meta"]["source"] == f"{BASE}/DocumentReference/d1"
    assert by_type["Patient"][0]["resource"]["meta"]["source"] == f"{BASE}/Patient/p1/_history/2"
    composition = entries[0]["resource"]
    assert composition["confidentiality"] == "R"
    assert [s["code"]["coding"][0]["code"] for s in composition["section"]] == ["pathology", "imaging"]


def test_bundle_file_is_canonical_json(tmp_path: Path) -> None:
    bundle = build_case_bundle(make_case(tmp_path), terminology=TERMS, absolute=absolute,
                               now=datetime(2026, 11, 21, tzinfo=UTC))
    path = tmp_path / "bundle.json"
    write_bundle(bundle, path)
    text = path.read_text("utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

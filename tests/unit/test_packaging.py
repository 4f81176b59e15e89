"""Case packaging: a valid R4 document Bundle whose references resolve inside it, stored as a skeleton, signed
(detached ES384 JWS over the R4 canonical form) and refused when tampered with."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_terminology
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.case.packaging import CaseContent, FileBase64, PackagedDocument, build_case_bundle, write_bundle
from fhir_bridge.case.signature import (
    SKELETON_PREFIX,
    BundleLayout,
    SignatureCheck,
    check_bundle_signature,
    layout_of,
    parse_skeleton,
    served_chunks,
    sign_from_files,
    signed_payload,
    skeleton_bytes,
)
from fhir_bridge.fhir.resources import dumps, loads, validate

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
    by_type: dict[str, list[dict[str, Any]]] = {}
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


# -- the stored skeleton and the signature (STANDARDS.md §6) -------------------------------------------------

SIGNED_AT = "2026-11-21T12:00:00Z"


@dataclass
class Packaged:
    layout: BundleLayout
    blobs: dict[str, bytes]
    signer: Es384Signer


def package(tmp_path: Path, signer: Es384Signer | None = None) -> Packaged:
    """What the collect job does: the documents into blobs, the layout signed over the files on disk."""
    signer = signer or Es384Signer.generate()
    content = make_case(tmp_path)
    bundle = build_case_bundle(content, terminology=TERMS, absolute=absolute, now=datetime(2026, 11, 21, tzinfo=UTC))
    blobs = {hashlib.sha256(d.path.read_bytes()).hexdigest(): d.path.read_bytes() for d in content.documents}
    digests = {d.path: hashlib.sha256(d.path.read_bytes()).hexdigest() for d in content.documents}
    layout = sign_from_files(layout_of(bundle, digests), {v: k for k, v in digests.items()}, signer, SIGNED_AT)
    return Packaged(layout, blobs, signer)


def reader(blobs: dict[str, bytes], size: int = 1000) -> Callable[[str], AsyncIterator[bytes]]:
    async def chunks(digest: str) -> AsyncIterator[bytes]:
        data = blobs[digest]
        for start in range(0, len(data), size):  # 1000 is not a multiple of 3: base64 must re-cut
            yield data[start:start + size]
    return chunks


def serve(packaged: Packaged, head: dict[str, Any] | None = None, **kwargs: Any) -> bytes:
    async def collect() -> bytes:
        chunks = served_chunks(packaged.layout, head if head is not None else HEAD, reader(packaged.blobs), **kwargs)
        return b"".join([chunk async for chunk in chunks])
    return asyncio.run(collect())


HEAD = {"id": "b1", "meta": {"versionId": "1", "lastUpdated": "2026-11-21T12:00:01.000Z"}}


def check(bundle: dict[str, Any], signer: Es384Signer) -> SignatureCheck:
    return check_bundle_signature(bundle, signer.verify_unencoded, signer.key_ids)


def test_the_served_bundle_is_signed_over_its_canonical_form_and_verifies(tmp_path: Path) -> None:
    packaged = package(tmp_path)
    served = serve(packaged)
    bundle = loads(served)
    assert list(bundle)[:2] == ["id", "meta"]
    validate(bundle)
    signature = bundle["signature"]
    assert signature["type"] == [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                                  "display": "Verification Signature"}]
    assert signature["sigFormat"] == "application/jose" and signature["when"] == SIGNED_AT
    device = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Device")
    assert signature["who"] == {"reference": device["fullUrl"]}
    assert check(bundle, packaged.signer) == SignatureCheck(True, "signature valid", packaged.signer.key_id,
                                                            SIGNED_AT)
    # the served bytes are the signed bytes with id, meta and signature added, not a re-serialised copy
    signed = b"".join(signed_payload(bundle))
    member = b',"signature":' + dumps(signature, canonical=True)
    head = dumps(HEAD, canonical=True)[:-1] + b","
    assert served == head + signed[1:].replace(b',"timestamp"', member + b',"timestamp"', 1)
    binary = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Binary")
    assert base64.b64decode(binary["data"]) == (tmp_path / "a.pdf").read_bytes()


def test_the_skeleton_is_small_and_round_trips(tmp_path: Path) -> None:
    packaged = package(tmp_path)
    stored = skeleton_bytes(packaged.layout)
    assert stored.startswith(SKELETON_PREFIX)
    assert base64.b64encode((tmp_path / "a.pdf").read_bytes())[:200] not in stored  # only the blob is named
    assert parse_skeleton(stored) == packaged.layout
    assert [p.digest for p in packaged.layout.binaries] == list(packaged.blobs)


def test_id_meta_and_formatting_are_not_signed(tmp_path: Path) -> None:
    packaged = package(tmp_path)
    bundle = loads(serve(packaged, head={"id": "other", "meta": {"versionId": "7"}}))
    assert check(bundle, packaged.signer).ok
    pretty = json.dumps(json.loads(serve(packaged)), indent=2, ensure_ascii=False)
    assert check(loads(pretty), packaged.signer).ok  # the verifier re-encodes canonically


def tampered(bundle: dict[str, Any], how: str) -> dict[str, Any]:
    bundle = copy.deepcopy(bundle)
    entries = bundle["entry"]
    if how == "entry":
        doc = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "DocumentReference")
        doc["masterIdentifier"]["value"] = doc["masterIdentifier"]["value"][:-1] + "5"
    elif how == "binary":
        binary = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Binary")
        binary["data"] = ("B" if binary["data"][40] != "B" else "C").join((binary["data"][:40], binary["data"][41:]))
    elif how == "removed":
        del entries[-2]
    elif how == "when":
        bundle["signature"]["when"] = "2026-11-22T12:00:00Z"
    elif how == "unsigned":
        del bundle["signature"]
    return bundle


@pytest.mark.parametrize(("how", "reason"), [
    ("entry", "does not match"), ("binary", "does not match"), ("removed", "does not match"),
    ("when", "not the signed time"), ("unsigned", "no signature"),
])
def test_a_tampered_bundle_is_refused(tmp_path: Path, how: str, reason: str) -> None:
    packaged = package(tmp_path)
    bundle = loads(serve(packaged))
    result = check(tampered(bundle, how), packaged.signer)
    assert not result.ok and reason in result.reason


def test_a_signature_swapped_from_another_bundle_or_key_is_refused(tmp_path: Path) -> None:
    signer = Es384Signer.generate()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, two = package(tmp_path / "one", signer), package(tmp_path / "two", signer)
    bundle = loads(serve(one))
    bundle["signature"] = loads(serve(two))["signature"]
    assert not check(bundle, signer).ok
    stranger = Es384Signer.generate()
    own = loads(serve(one))
    result = check_bundle_signature(own, stranger.verify_unencoded, stranger.key_ids)
    assert not result.ok and "not a trusted key" in result.reason


@pytest.mark.parametrize("alg", ["none", "ES256", "HS384", "RS384"])
def test_an_algorithm_other_than_es384_is_refused(tmp_path: Path, alg: str) -> None:
    packaged = package(tmp_path)
    bundle = loads(serve(packaged))
    jws = base64.b64decode(bundle["signature"]["data"]).decode()
    header, _, signature = jws.split(".")
    fields = json.loads(base64.urlsafe_b64decode(header + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**fields, "alg": alg}).encode()).rstrip(b"=").decode()
    bundle["signature"]["data"] = base64.b64encode(f"{forged}..{signature if alg != 'none' else ''}".encode()).decode()
    result = check(bundle, packaged.signer)
    assert not result.ok and "ES384 only" in result.reason
    # and the adapter refuses it too, whatever the core says
    assert not packaged.signer.verify_unencoded(signed_payload(bundle), f"{forged}..{signature}")


def test_a_bundle_signed_while_served_verifies_and_its_base64_is_cut_anywhere(tmp_path: Path) -> None:
    packaged = package(tmp_path)
    unsigned = BundleLayout(packaged.layout.parts, packaged.layout.signature_at, packaged.layout.who)
    served = loads(serve(Packaged(unsigned, packaged.blobs, packaged.signer), signer=packaged.signer,
                         when="2026-11-21T13:00:00Z"))
    assert served["signature"]["when"] == "2026-11-21T13:00:00Z" and check(served, packaged.signer).ok
    assert "signature" not in loads(serve(Packaged(unsigned, packaged.blobs, packaged.signer)))
    for size in (1, 2, 3, 4, 4096):
        async def collect(size: int = size) -> bytes:
            chunks = served_chunks(packaged.layout, HEAD, reader(packaged.blobs, size))
            return b"".join([c async for c in chunks])
        assert asyncio.run(collect()) == serve(packaged)


def test_signing_a_large_case_reads_the_files_in_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "scan.bin"
    with big.open("wb") as out:
        for i in range(16):
            out.write(bytes([i]) * (1 << 20))
    digest = "ab" * 32
    bundle = {"resourceType": "Bundle", "type": "document", "timestamp": "2026-11-21T12:00:00Z",
              "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:1"},
              "entry": [{"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Binary", "data": FileBase64(big)}},
                        {"fullUrl": "urn:uuid:3", "resource": {"resourceType": "Device",
                                                               "deviceName": [{"name": "fhir-bridge"}]}}]}
    layout = layout_of(bundle, {big: digest})
    signer = Es384Signer.generate()
    tracemalloc.start()
    try:
        signed = sign_from_files(layout, {digest: big}, signer, SIGNED_AT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"signing 16 MiB peaked at {peak} bytes"
    assert signed.signature is not None and signed.signature["who"] == {"reference": "urn:uuid:3"}


def test_written_bundle_is_byte_for_byte_the_canonical_json(tmp_path: Path) -> None:
    """write_bundle streams Binary data from disk as bytes; the file is still exactly the canonical form."""
    case = make_case(tmp_path)
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 12_000 + b"\x00tail")  # several base64 chunks, not a multiple of 3
    doc = case.documents[0]
    case.documents.append(PackagedDocument(resource={**doc.resource, "id": "d2"}, path=big,
                                           content_type="application/octet-stream", size=big.stat().st_size,
                                           sha1_b64=doc.sha1_b64))
    bundle = build_case_bundle(case, terminology=TERMS, absolute=absolute, now=datetime(2026, 11, 21, tzinfo=UTC))
    path = tmp_path / "bundle.json"
    size = write_bundle(bundle, path)
    expected = dumps(bundle, canonical=True)
    assert path.read_bytes() == expected and size == len(expected)
    binaries = [e["resource"] for e in loads(expected)["entry"] if e["resource"]["resourceType"] == "Binary"]
    assert [base64.b64decode(b["data"]) for b in binaries] == [doc.path.read_bytes(), big.read_bytes()]

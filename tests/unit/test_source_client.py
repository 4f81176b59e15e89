"""The source client against scripted HTTP answers (httpx MockTransport): paging, retries, ITI-68 checks.

The same behaviours are exercised against the sandbox over real HTTP in tests/adapters.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.errors import (
    AmbiguousPatient,
    AttachmentError,
    NotAFhirSource,
    PagingError,
    SourceProtocolError,
    SourceRejected,
    SourceUnavailable,
    UnknownPatient,
)
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier

BASE = "https://source.test/fhir"
IDENT = PatientIdentifier(INS_NIR_TEST, "295109912611193")
FAST = SourceSettings(backoff_initial=0.001, backoff_max=0.002, retry_after_cap=0.01, max_retries=3,
                      total_deadline=5, page_size=2, max_pages=10)


def fhir(body: object, status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers={"Content-Type": "application/fhir+json",
                                                                               **headers})


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle: dict = {"resourceType": "Bundle", "type": "searchset",
                    "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def client(handler: Callable[[httpx.Request], httpx.Response], settings: SourceSettings = FAST) -> SourceClient:
    return SourceClient(BASE, settings, transport=httpx.MockTransport(handler))


def doc(i: int) -> dict:
    return {"resourceType": "DocumentReference", "id": f"d{i}", "status": "current"}


async def test_every_page_is_followed_whatever_the_page_size() -> None:
    pages = {0: ([doc(1), doc(2)], f"{BASE}/DocumentReference?page=1"),
             1: ([doc(3), doc(4)], f"{BASE}/DocumentReference?page=2"), 2: ([doc(5)], None)}
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        resources, next_url = pages[int(request.url.params.get("page", 0))]
        return fhir(searchset(resources, next_url))

    async with client(handler) as source:
        docs = await source.find_document_references("p1")
    assert [d["id"] for d in docs] == ["d1", "d2", "d3", "d4", "d5"]
    first = seen[0].url.params
    assert first["patient"] == "p1" and first["status"] == "current"  # MHD ITI-67 needs both


async def test_a_next_link_loop_is_an_error_not_an_endless_loop() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", 0))
        return fhir(searchset([doc(page)], f"{BASE}/DocumentReference?page={(page + 1) % 2}"))

    async with client(handler) as source:
        with pytest.raises(PagingError, match="loop"):
            await source.find_document_references("p1")


async def test_more_pages_than_allowed_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", 0))
        return fhir(searchset([doc(page)], f"{BASE}/DocumentReference?page={page + 1}"))

    async with client(handler) as source:
        with pytest.raises(PagingError, match="more than 10 pages"):
            await source.find_document_references("p1")


async def test_a_next_link_to_another_origin_is_not_followed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return fhir(searchset([doc(1)], "https://elsewhere.test/fhir/DocumentReference?page=1"))

    async with client(handler) as source:
        with pytest.raises(SourceProtocolError, match="another origin"):
            await source.find_document_references("p1")


async def test_a_page_that_is_not_a_bundle_is_a_protocol_error() -> None:
    async with client(lambda r: fhir({"resourceType": "Patient", "id": "x"})) as source:
        with pytest.raises(SourceProtocolError, match="searchset Bundle"):
            await source.find_document_references("p1")


async def test_an_html_page_is_not_a_fhir_source() -> None:
    html = httpx.Response(200, content=b"<html>hello</html>", headers={"Content-Type": "text/html"})
    async with client(lambda r: html) as source:
        with pytest.raises(NotAFhirSource):
            await source.find_patient(IDENT)
    async with client(lambda r: httpx.Response(404, content=b"nope")) as source:
        with pytest.raises(NotAFhirSource):
            await source.find_patient(IDENT)


async def test_transient_failures_are_retried_honouring_retry_after() -> None:
    answers = iter([fhir({}, 503, **{"Retry-After": "0"}), fhir({}, 429, **{"Retry-After": "1"}),
                    httpx.ConnectError("boom"), fhir(searchset([doc(1)]))])

    def handler(request: httpx.Request) -> httpx.Response:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with client(handler) as source:
        docs = await source.find_document_references("p1")
        assert len(docs) == 1 and source.requests_made == 4


async def test_a_source_that_never_recovers_gives_up_after_the_retries() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return fhir({}, 503)

    async with client(handler) as source:
        with pytest.raises(SourceUnavailable, match="4 tries"):
            await source.find_document_references("p1")
    assert calls == 4


async def test_other_4xx_are_not_retried_and_keep_the_operation_outcome() -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "required",
                                                              "diagnostics": "status is required"}]}
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return fhir(outcome, 400)

    async with client(handler) as source:
        with pytest.raises(SourceRejected) as caught:
            await source.find_document_references("p1")
    assert calls == 1
    assert caught.value.status == 400 and caught.value.outcome == outcome
    assert "status is required" in str(caught.value)
    assert "p1" not in str(caught.value)  # the query (patient) is not in the message


async def test_patient_resolution_checks_the_identifier() -> None:
    good = {"resourceType": "Patient", "id": "p1", "identifier": [{"system": IDENT.system, "value": IDENT.value}]}
    other = {"resourceType": "Patient", "id": "p2", "identifier": [{"system": IDENT.system, "value": "1"}]}
    async with client(lambda r: fhir(searchset([good]))) as source:
        assert (await source.find_patient(IDENT))["id"] == "p1"
    async with client(lambda r: fhir(searchset([]))) as source:
        with pytest.raises(UnknownPatient):
            await source.find_patient(IDENT)
    async with client(lambda r: fhir(searchset([other]))) as source:
        with pytest.raises(SourceProtocolError):
            await source.find_patient(IDENT)
    async with client(lambda r: fhir(searchset([good, {**good, "id": "p3"}]))) as source:
        with pytest.raises(AmbiguousPatient):
            await source.find_patient(IDENT)


async def test_endpoints_not_included_are_read_one_by_one() -> None:
    study = {"resourceType": "ImagingStudy", "id": "s1", "status": "available", "subject": {"reference": "Patient/p1"},
             "endpoint": [{"reference": "Endpoint/e1"}, {"reference": "Endpoint/e2"}]}
    e1 = {"resourceType": "Endpoint", "id": "e1"}
    e2 = {"resourceType": "Endpoint", "id": "e2"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ImagingStudy"):
            bundle = searchset([study])
            bundle["entry"].append({"resource": e1, "search": {"mode": "include"}})
            return fhir(bundle)
        assert request.url.path.endswith("/Endpoint/e2")
        return fhir(e2)

    async with client(handler) as source:
        studies, endpoints = await source.find_imaging_studies("p1")
    assert [s["id"] for s in studies] == ["s1"]
    assert set(endpoints) == {f"{BASE}/Endpoint/e1", f"{BASE}/Endpoint/e2"}


BYTES = b"%PDF-1.4 compte rendu" * 1000
SHA1 = base64.b64encode(hashlib.sha1(BYTES).digest()).decode()


async def test_retrieve_streams_to_disk_and_checks_size_and_hash(tmp_path: Path) -> None:
    async with client(lambda r: httpx.Response(200, content=BYTES, headers={"Content-Type": "application/pdf"})) as s:
        got = await s.retrieve(f"{BASE}/Binary/1", tmp_path / "a.pdf", expected_size=len(BYTES),
                               expected_sha1_b64=SHA1)
        assert got.path.read_bytes() == BYTES and got.sha1_b64 == SHA1 and got.content_type == "application/pdf"
        with pytest.raises(AttachmentError) as caught:
            await s.retrieve(f"{BASE}/Binary/1", tmp_path / "b.pdf", expected_sha1_b64=base64.b64encode(
                b"\0" * 20).decode())
        assert caught.value.reason == "hash-mismatch"
        with pytest.raises(AttachmentError) as caught:
            await s.retrieve(f"{BASE}/Binary/1", tmp_path / "c.pdf", expected_size=len(BYTES) - 1)
        assert caught.value.reason == "size-mismatch"
        with pytest.raises(AttachmentError) as caught:
            await s.retrieve(f"{BASE}/Binary/1", tmp_path / "d.pdf", expected_size=len(BYTES) + 1)
        assert caught.value.reason == "size-mismatch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf"]  # nothing partial left behind


async def test_retrieve_caps_the_size(tmp_path: Path) -> None:
    settings = FAST.model_copy(update={"max_attachment_bytes": 1000})
    async with client(lambda r: httpx.Response(200, content=BYTES), settings) as source:
        with pytest.raises(AttachmentError) as caught:
            await source.retrieve(f"{BASE}/Binary/1", tmp_path / "a.bin")
    assert caught.value.reason == "too-large"


async def test_retrieve_failures_are_attachment_errors(tmp_path: Path) -> None:
    async with client(lambda r: httpx.Response(410)) as source:
        with pytest.raises(AttachmentError) as caught:
            await source.retrieve(f"{BASE}/Binary/1", tmp_path / "a.bin")
    assert caught.value.reason == "retrieve-failed" and caught.value.status == 410


async def test_credentials_go_only_to_the_source_origin(tmp_path: Path) -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.host] = request.headers.get("Authorization")
        return httpx.Response(200, content=BYTES)

    settings = FAST.model_copy(update={"bearer_token": "s3cret"})
    async with client(handler, settings) as source:
        await source.retrieve(f"{BASE}/Binary/1", tmp_path / "a.bin")
        await source.retrieve("https://repository.test/doc/1", tmp_path / "b.bin")
    assert seen == {"source.test": "Bearer s3cret", "repository.test": None}

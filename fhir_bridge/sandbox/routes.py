"""The sandbox's FHIR REST surface under ``/fhir``: thin routes over :mod:`search`, :mod:`render` and
:mod:`transaction`. Errors are raised as :mod:`fhir_bridge.errors` and turned into OperationOutcomes at the
app's edge.

| route | spec |
|---|---|
| ``GET metadata`` | R4 http.html#capabilities |
| ``GET/POST Patient[/_search]``, ``GET Patient/{id}`` | patient resolution before ITI-67 (STANDARDS.md §1) |
| ``GET/POST DocumentReference[/_search]``, ``GET DocumentReference/{id}`` | MHD ITI-67 §2:3.67.4 |
| ``GET Binary/{id}`` | MHD ITI-68 §2:3.68.4: the document's bytes, streamed |
| ``GET/POST ImagingStudy[/_search]`` (+ ``_include=ImagingStudy:endpoint``), reads of ImagingStudy, Endpoint | R4 |
| ``POST /fhir`` | MHD ITI-65 §2:3.65.4: Provide Document Bundle |
"""

from __future__ import annotations

import base64
import email.utils
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from fhir_bridge.errors import NotAcceptable, NotFound, UnsupportedMediaType
from fhir_bridge.fhir.resources import FHIR_JSON, iterencode, parse_resource
from fhir_bridge.sandbox import render, search, transaction
from fhir_bridge.sandbox.capability import capability_statement
from fhir_bridge.sandbox.model import SandboxDocument
from fhir_bridge.sandbox.state import FhirResponse, SandboxState, StateDep, UrlsDep
from fhir_bridge.sandbox.world import iter_content, served_size

router = APIRouter(prefix="/fhir")
_STREAM_CHUNK = 256 * 1024  # a multiple of 3, so base64 pieces concatenate into one valid base64 text
_FORM = "application/x-www-form-urlencoded"
_JSON_TYPES = (FHIR_JSON, "application/json", "application/json+fhir")


async def _params(request: Request) -> list[tuple[str, str]]:
    """The query string, plus the form body of a ``POST _search`` (R4 http.html#search)."""
    params = list(request.query_params.multi_items())
    if request.method == "POST":
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != _FORM:
            raise UnsupportedMediaType(f"POST _search takes {_FORM}")
        params += parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True)
    return params


def _missing(resource_type: str) -> NotFound:
    return NotFound(f"{resource_type} not found")


@router.get("/metadata")
async def metadata(state: StateDep, urls: UrlsDep) -> FhirResponse:
    return FhirResponse(capability_statement(urls, page_cap=state.config.page_cap))


# -- Patient ------------------------------------------------------------------------------------------


@router.api_route("/Patient", methods=["GET"])
@router.api_route("/Patient/_search", methods=["POST"])
async def search_patients(request: Request, state: StateDep, urls: UrlsDep) -> FhirResponse:
    params = await _params(request)
    found, used = search.patient_matches(state.world, params)
    page = search.paging(params, state.config.page_cap)
    return FhirResponse(search.searchset("Patient", found, used, page, state.world, urls))


@router.get("/Patient/{patient_id}")
async def read_patient(patient_id: str, state: StateDep) -> FhirResponse:
    patient = state.world.patient(patient_id)
    if patient is None:
        raise _missing("Patient")
    return FhirResponse(render.patient(patient))


# -- DocumentReference (ITI-67) -----------------------------------------------------------------------


@router.api_route("/DocumentReference", methods=["GET"])
@router.api_route("/DocumentReference/_search", methods=["POST"])
async def find_document_references(request: Request, state: StateDep, urls: UrlsDep) -> FhirResponse:
    """ITI-67 Find Document References (MHD §2:3.67.4.1); ``patient``/``patient.identifier`` and ``status``."""
    params = await _params(request)
    found, used = search.document_matches(state.world, params)
    page = search.paging(params, state.config.page_cap)
    return FhirResponse(search.searchset("DocumentReference", found, used, page, state.world, urls))


@router.get("/DocumentReference/{document_id}")
async def read_document_reference(document_id: str, state: StateDep, urls: UrlsDep) -> FhirResponse:
    doc = state.world.document(document_id)
    if doc is None:
        raise _missing("DocumentReference")
    return FhirResponse(render.document_reference(doc, state.world, urls))


# -- Binary (ITI-68) ----------------------------------------------------------------------------------


def _wants_raw(accept: str, content_type: str) -> bool | None:
    """True: the native bytes; False: a FHIR Binary resource; None: nothing acceptable (406)."""
    types = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    major = content_type.split("/")[0]
    if not types or any(t in ("*/*", content_type, f"{major}/*") for t in types):
        return True
    if any(t in _JSON_TYPES for t in types):
        return False
    return None


class _Base64Data:
    """``Binary.data`` streamed as base64 (:class:`fhir_bridge.fhir.resources.StreamedText`)."""

    def __init__(self, doc: SandboxDocument, faults: bool) -> None:
        self.doc, self.faults = doc, faults

    def iter_chunks(self) -> Iterator[str]:
        for piece in iter_content(self.doc, _STREAM_CHUNK, faults=self.faults):
            yield base64.b64encode(piece).decode("ascii")


@router.get("/Binary/{document_id}")
async def retrieve_document(document_id: str, request: Request, state: StateDep) -> Response:
    """ITI-68 Retrieve Document (MHD §2:3.68.4.1.2): the bytes, streamed, with their own Content-Type.

    With corruption switched on, a corrupt document is served with altered bytes of the declared length and a
    truncated one stops early (its Content-Length says so); ``attachment.size``/``hash`` stay the correct ones.
    """
    doc = state.world.document(document_id)
    if doc is None:
        raise _missing("Binary")
    faults = state.config.corrupt
    raw = _wants_raw(request.headers.get("accept", ""), doc.content_type)
    if raw is None:
        raise NotAcceptable(f"this document is only available as {doc.content_type} or a FHIR Binary")
    headers = {"ETag": f'W/"{doc.version}"',
               "Last-Modified": email.utils.format_datetime(doc.last_updated, usegmt=True)}
    if not raw:
        binary = {"resourceType": "Binary", "id": doc.id, "contentType": doc.content_type,
                  "data": _Base64Data(doc, faults)}
        return StreamingResponse((s.encode("utf-8") for s in iterencode(binary)), media_type=FHIR_JSON,
                                 headers=headers)
    headers["Content-Length"] = str(served_size(doc, faults=faults))
    return StreamingResponse(_in_loop(iter_content(doc, _STREAM_CHUNK, faults=faults)), media_type=doc.content_type,
                             headers=headers)


async def _in_loop(pieces: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The pieces from the event loop: generating them is a little CPU and no I/O, and Starlette would hand a
    plain iterator to a worker thread for every piece (BENCHMARKS.md part 1: most of the sandbox's CPU when it
    serves 300 MB, which made the source, not the clients, the benchmark's limit)."""
    for piece in pieces:
        yield piece


# -- ImagingStudy, Endpoint and other reads -----------------------------------------------------------


@router.api_route("/ImagingStudy", methods=["GET"])
@router.api_route("/ImagingStudy/_search", methods=["POST"])
async def search_imaging_studies(request: Request, state: StateDep, urls: UrlsDep) -> FhirResponse:
    params = await _params(request)
    found, used = search.study_matches(state.world, params)
    page = search.paging(params, state.config.page_cap)
    include = any(k == "_include" and v in ("ImagingStudy:endpoint", "ImagingStudy:endpoint:Endpoint")
                  for k, v in params)
    return FhirResponse(search.searchset("ImagingStudy", found, used, page, state.world, urls,
                                         include_endpoints=include))


def _read(state: SandboxState, resource_type: str, resource_id: str, urls: render.Urls) -> FhirResponse:
    world = state.world
    lookups: dict[str, Any] = {
        "ImagingStudy": world.study, "Endpoint": world.endpoint, "Organization": world.organization,
    }
    if resource_type == "List":
        found = world.submission_sets.get(resource_id)
        if found is None:
            raise _missing("List")
        return FhirResponse(found)
    item = lookups[resource_type](resource_id)
    if item is None:
        raise _missing(resource_type)
    return FhirResponse(render.any_resource(resource_type, item, world, urls))


@router.get("/ImagingStudy/{study_id}")
async def read_imaging_study(study_id: str, state: StateDep, urls: UrlsDep) -> FhirResponse:
    return _read(state, "ImagingStudy", study_id, urls)


@router.get("/Endpoint/{endpoint_id}")
async def read_endpoint(endpoint_id: str, state: StateDep, urls: UrlsDep) -> FhirResponse:
    return _read(state, "Endpoint", endpoint_id, urls)


@router.get("/Organization/{organization_id}")
async def read_organization(organization_id: str, state: StateDep, urls: UrlsDep) -> FhirResponse:
    return _read(state, "Organization", organization_id, urls)


@router.get("/List/{list_id}")
async def read_list(list_id: str, state: StateDep, urls: UrlsDep) -> FhirResponse:
    return _read(state, "List", list_id, urls)


# -- ITI-65 -------------------------------------------------------------------------------------------


@router.post("")
@router.post("/")
async def provide_document_bundle(request: Request, state: StateDep) -> FhirResponse:
    """ITI-65 Provide Document Bundle (MHD §2:3.65.4.1): a transaction Bundle, stored atomically."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _JSON_TYPES:
        raise UnsupportedMediaType("ITI-65 takes application/fhir+json")
    body = await request.body()
    bundle = parse_resource(body, expected_type="Bundle", max_bytes=state.config.max_body_bytes)
    return FhirResponse(transaction.provide(state.world, bundle))

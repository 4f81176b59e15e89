"""The FHIR REST surface, registered in a few readable lines (base ``/fhir``): metadata, the creates, updates and
deletes, the case Bundle, and the reads, histories and searches of :data:`READABLE`.

Routes are thin: read the body, call a use case of the :class:`~fhir_bridge.workflow.bridge.Bridge` (the case
service, opinions, reads), write the answer. Every error is raised and turned into an OperationOutcome in
:mod:`fhir_bridge.api.errors`. What they declare and share (the use cases, the verified caller, the base URL)
is :mod:`fhir_bridge.api.deps`. This module's :data:`router` is mounted by :func:`fhir_bridge.api.app.create_app`
before the AuditEvent routes (:mod:`fhir_bridge.api.audit_routes`) and the Task operations
(:mod:`fhir_bridge.api.operations`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Header, Request
from starlette.responses import Response, StreamingResponse

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.access.tenancy import Tenancy, require_scope
from fhir_bridge.api.capability import capability_statement
from fhir_bridge.api.deps import Caller, UseCases, base_url, fhir_router, max_body, search_form, seen_by
from fhir_bridge.api.fhir_io import (
    fhir_response,
    paging,
    parse_if_match,
    read_body,
    searchset,
    version_headers,
    written,
)
from fhir_bridge.errors import BridgeError, Forbidden
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import FHIR_JSON, Resource, check_resource_type
from fhir_bridge.opinion.report import based_on_request
from fhir_bridge.ports import system_clock
from fhir_bridge.workflow.bridge import Bridge
from fhir_bridge.workflow.case_bundles import bundle_patient

router = fhir_router()
READABLE = ("ServiceRequest", "Task", "DiagnosticReport")


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    return fhir_response(request, capability_statement(base_url(request), instant(system_clock()),
                                                       request.app.state.profiles))


@router.post("/ServiceRequest")
async def create_service_request(
    request: Request, bridge: UseCases, who: Caller, if_none_exist: Annotated[str | None, Header()] = None
) -> Response:
    require_scope(who, "ServiceRequest", "c")
    if who.role != "platform":
        raise Forbidden("only platform clients submit requests for an opinion")
    body = await read_body(request, max_body(request))
    result = await bridge.cases.submit_request(body, if_none_exist=if_none_exist, tenant=who.tenant,
                                               client=who.client_id)
    return _created(request, "ServiceRequest", result.resource, result.created)


@router.post("/DiagnosticReport")
async def create_diagnostic_report(
    request: Request, bridge: UseCases, who: Caller, if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "c")
    body = await read_body(request, max_body(request))

    body = await _reidentified(bridge, who, body)
    result = await bridge.opinions.submit(body, if_none_exist=if_none_exist, guard=_opinion_guard(bridge.tenancy, who),
                                          author=who.reviewer)
    seen = await seen_by(request, bridge, who, result.resource)
    return _created(request, "DiagnosticReport", seen, result.created)


@router.put("/DiagnosticReport/{resource_id}")
async def update_diagnostic_report(
    request: Request, resource_id: str, bridge: UseCases, who: Caller,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "u")
    await bridge.records.read(who, "DiagnosticReport", resource_id)
    body = await read_body(request, max_body(request))

    body = await _reidentified(bridge, who, body)
    stored = await bridge.opinions.amend(resource_id, body, if_match=parse_if_match(if_match),
                                         guard=_opinion_guard(bridge.tenancy, who), author=who.reviewer)
    seen = await seen_by(request, bridge, who, stored)
    return written(request, seen, status=200, location=_location(request, "DiagnosticReport", stored))


@router.delete("/DiagnosticReport/{resource_id}")
async def delete_diagnostic_report(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
    """R4 http.html#delete: a reviewer retracts their own preliminary opinion; reads then answer 410 Gone."""
    require_scope(who, "DiagnosticReport", "d")
    await bridge.records.read(who, "DiagnosticReport", resource_id)

    await bridge.opinions.delete(resource_id, guard=_opinion_guard(bridge.tenancy, who), author=who.reviewer)
    return Response(status_code=204)


def _opinion_guard(rules: Tenancy, who: AccessContext) -> Callable[[str], Awaitable[None]]:
    """The caller's right to act on the case of a ServiceRequest id (checked as soon as the case is known)."""

    async def guard(request_id: str) -> None:
        await rules.check_opinion_allowed(who, request_id)

    return guard


async def _reidentified(bridge: Bridge, who: AccessContext, body: Any) -> Any:
    """A reviewer abroad names the patient by the case pseudonym: put the INS back. The right to the case is
    checked first, so the pseudonym lookup never tells a stranger whether a ServiceRequest exists."""
    if not bridge.bundles.needs_pseudonym(who):
        return body
    try:
        request_id: str | None = based_on_request(check_resource_type(body, "DiagnosticReport"))
    except BridgeError:
        request_id = None  # the opinion's own checks will say what is wrong with it
    if request_id:
        await bridge.tenancy.check_opinion_allowed(who, request_id)
    return await bridge.bundles.reidentified_opinion(body, who)


def _location(request: Request, rtype: str, resource: Resource) -> str:
    return f"{base_url(request)}/{rtype}/{resource['id']}/_history/{resource['meta']['versionId']}"


def _created(request: Request, rtype: str, resource: Resource, created: bool) -> Response:
    return written(
        request,
        resource,
        status=201 if created else 200,
        location=_location(request, rtype, resource) if created else None,
    )


@router.get("/Bundle/{resource_id}")
async def read_bundle(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
    require_scope(who, "Bundle", "r")
    stub = await bridge.records.read(who, "Bundle", resource_id)
    # the answer is streamed, so the audit can not read the patient from it: the stub knows (audit_middleware)
    request.state.audit_patient = bundle_patient(stub)
    chunks = bridge.bundles.chunks(resource_id, who)  # pseudonymised for a reviewer whose network asks for it
    return StreamingResponse(chunks, media_type=f"{FHIR_JSON}; charset=utf-8", headers=version_headers(stub))


def _register_reads(rtype: str) -> None:
    async def read(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
        require_scope(who, rtype, "r")
        resource = await bridge.records.read(who, rtype, resource_id)
        return fhir_response(request, await seen_by(request, bridge, who, resource),
                             headers=version_headers(resource))

    async def vread(request: Request, resource_id: str, version_id: str, bridge: UseCases, who: Caller) -> Response:
        require_scope(who, rtype, "r")
        resource = await bridge.records.vread(who, rtype, resource_id, version_id)
        return fhir_response(request, await seen_by(request, bridge, who, resource),
                             headers=version_headers(resource))

    async def history(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
        require_scope(who, rtype, "r")
        stored = await bridge.records.history(who, rtype, resource_id)
        versions = [await seen_by(request, bridge, who, v) for v in stored]
        base = base_url(request)
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "total": len(versions),
            "link": [{"relation": "self", "url": f"{base}/{rtype}/{resource_id}/_history"}],
            "entry": [
                {
                    "fullUrl": f"{base}/{rtype}/{resource_id}",
                    "resource": v,
                    "request": {
                        "method": "POST" if v["meta"]["versionId"] == "1" else "PUT",
                        "url": f"{rtype}/{resource_id}" if v["meta"]["versionId"] != "1" else rtype,
                    },
                    "response": {
                        "status": "201" if v["meta"]["versionId"] == "1" else "200",
                        "etag": f'W/"{v["meta"]["versionId"]}"',
                        "lastModified": v["meta"]["lastUpdated"],
                    },
                }
                for v in versions
            ],
        }
        return fhir_response(request, bundle)

    async def search(request: Request, bridge: UseCases, who: Caller) -> Response:
        scope = _search_scope(who, bridge.tenancy, rtype)
        return await _search(request, bridge, who, rtype, list(request.query_params.multi_items()), scope)

    async def search_post(request: Request, bridge: UseCases, who: Caller) -> Response:
        scope = _search_scope(who, bridge.tenancy, rtype)
        return await _search(request, bridge, who, rtype, await search_form(request), scope)

    router.add_api_route(f"/{rtype}", search, methods=["GET"], name=f"search-{rtype}")
    router.add_api_route(f"/{rtype}/_search", search_post, methods=["POST"], name=f"search-post-{rtype}")
    router.add_api_route(f"/{rtype}/{{resource_id}}", read, methods=["GET"], name=f"read-{rtype}")
    router.add_api_route(f"/{rtype}/{{resource_id}}/_history", history, methods=["GET"], name=f"history-{rtype}")
    router.add_api_route(
        f"/{rtype}/{{resource_id}}/_history/{{version_id}}", vread, methods=["GET"], name=f"vread-{rtype}"
    )


def _search_scope(who: AccessContext, rules: Tenancy, rtype: str) -> dict[str, list[str]]:
    require_scope(who, rtype, "s")
    return rules.search_scope(who, rtype)


async def _search(request: Request, bridge: Bridge, who: AccessContext, rtype: str,
                  params: list[tuple[str, str]], scope: dict[str, list[str]]) -> Response:
    count, offset = paging(request, params)
    found, total = await bridge.records.search(rtype, params, count, offset, scope=scope)
    bundles = bridge.bundles
    resources = [await bundles.reader_view(r, who) for r in found] if bundles.needs_pseudonym(who) else found
    return fhir_response(request, searchset(base_url(request), rtype, resources, total, params, count, offset))


for _rtype in READABLE:
    _register_reads(_rtype)

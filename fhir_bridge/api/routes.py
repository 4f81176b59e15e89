"""The FHIR REST surface, registered in a few readable lines (base ``/fhir``).

Routes are thin: read the body, call the :class:`~fhir_bridge.workflow.cases.CaseService`, write the answer.
Every error is raised and turned into an OperationOutcome in :mod:`fhir_bridge.api.errors`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response, StreamingResponse

from fhir_bridge.access import AccessContext
from fhir_bridge.api.capability import capability_statement
from fhir_bridge.api.fhir_io import (
    fhir_response,
    negotiate,
    paging,
    parse_if_match,
    read_body,
    read_form,
    searchset,
    version_headers,
    written,
)
from fhir_bridge.errors import Forbidden
from fhir_bridge.resources import FHIR_JSON, Resource
from fhir_bridge.workflow.cases import CaseService, bundle_patient, now_instant
from fhir_bridge.workflow.tenancy import Tenancy, require_scope

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)])
READABLE = ("ServiceRequest", "Task", "DiagnosticReport")


def cases(request: Request) -> CaseService:
    service: CaseService = request.app.state.cases
    return service


Cases = Annotated[CaseService, Depends(cases)]


def tenancy(request: Request) -> Tenancy:
    rules: Tenancy | None = getattr(request.app.state, "tenancy", None)
    if rules is None:  # the runtime's CaseService arrives with the lifespan, after create_app
        service = cases(request)
        rules = request.app.state.tenancy = Tenancy(service.store, service.assignments.registry)
    return rules


Tenants = Annotated[Tenancy, Depends(tenancy)]


async def current_caller(request: Request) -> AccessContext:
    from fhir_bridge.api.security import caller  # security imports base_url from here

    return await caller(request)


Caller = Annotated[AccessContext, Depends(current_caller)]


def base_url(request: Request) -> str:
    configured: str = request.app.state.settings.api.public_base_url
    return (configured.rstrip("/") if configured else str(request.base_url).rstrip("/")) + "/fhir"


def max_body(request: Request) -> int:
    return int(request.app.state.settings.api.max_body_bytes)


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    return fhir_response(request, capability_statement(base_url(request), now_instant()))


@router.post("/ServiceRequest")
async def create_service_request(
    request: Request, service: Cases, who: Caller, if_none_exist: Annotated[str | None, Header()] = None
) -> Response:
    require_scope(who, "ServiceRequest", "c")
    if who.role != "platform":
        raise Forbidden("only platform clients submit requests for an opinion")
    body = await read_body(request, max_body(request))
    result = await service.submit_request(body, if_none_exist=if_none_exist, tenant=who.tenant)
    return _created(request, "ServiceRequest", result.resource, result.created)


@router.post("/DiagnosticReport")
async def create_diagnostic_report(
    request: Request, service: Cases, who: Caller, rules: Tenants,
    if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "c")
    body = await read_body(request, max_body(request))

    async def guard(request_id: str) -> None:
        await rules.check_opinion_allowed(who, request_id)

    result = await service.submit_opinion(body, if_none_exist=if_none_exist, guard=guard)
    return _created(request, "DiagnosticReport", result.resource, result.created)


@router.put("/DiagnosticReport/{resource_id}")
async def update_diagnostic_report(
    request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "u")
    await rules.check_visible(who, "DiagnosticReport", await service.store.read("DiagnosticReport", resource_id))
    body = await read_body(request, max_body(request))

    async def guard(request_id: str) -> None:
        await rules.check_opinion_allowed(who, request_id)

    stored = await service.amend_opinion(resource_id, body, if_match=parse_if_match(if_match), guard=guard)
    return written(request, stored, status=200, location=_location(request, "DiagnosticReport", stored))


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
async def read_bundle(request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants) -> Response:
    require_scope(who, "Bundle", "r")
    stub = await service.store.read("Bundle", resource_id)
    await rules.check_visible(who, "Bundle", stub)
    # the answer is streamed, so the audit can not read the patient from it: the stub knows (audit_middleware)
    request.state.audit_patient = bundle_patient(stub)
    chunks = service.bundle_chunks(resource_id)
    return StreamingResponse(chunks, media_type=f"{FHIR_JSON}; charset=utf-8", headers=version_headers(stub))


def _register_reads(rtype: str) -> None:
    async def visible(service: CaseService, who: AccessContext, rules: Tenancy, resource_id: str) -> Resource:
        require_scope(who, rtype, "r")
        resource = await service.store.read(rtype, resource_id)
        await rules.check_visible(who, rtype, resource)
        return resource

    async def read(request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants) -> Response:
        resource = await visible(service, who, rules, resource_id)
        return fhir_response(request, resource, headers=version_headers(resource))

    async def vread(request: Request, resource_id: str, version_id: str, service: Cases, who: Caller,
                    rules: Tenants) -> Response:
        await visible(service, who, rules, resource_id)
        resource = await service.store.vread(rtype, resource_id, version_id)
        return fhir_response(request, resource, headers=version_headers(resource))

    async def history(request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants) -> Response:
        await visible(service, who, rules, resource_id)
        versions = await service.store.history(rtype, resource_id)
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

    async def search(request: Request, service: Cases, who: Caller, rules: Tenants) -> Response:
        scope = _search_scope(who, rules, rtype)
        return await _search(request, service, rtype, list(request.query_params.multi_items()), scope)

    async def search_post(request: Request, service: Cases, who: Caller, rules: Tenants) -> Response:
        scope = _search_scope(who, rules, rtype)
        return await _search(request, service, rtype, await search_form(request), scope)

    router.add_api_route(f"/{rtype}", search, methods=["GET"], name=f"search-{rtype}")
    router.add_api_route(f"/{rtype}/_search", search_post, methods=["POST"], name=f"search-post-{rtype}")
    router.add_api_route(f"/{rtype}/{{resource_id}}", read, methods=["GET"], name=f"read-{rtype}")
    router.add_api_route(f"/{rtype}/{{resource_id}}/_history", history, methods=["GET"], name=f"history-{rtype}")
    router.add_api_route(
        f"/{rtype}/{{resource_id}}/_history/{{version_id}}", vread, methods=["GET"], name=f"vread-{rtype}"
    )


async def search_form(request: Request) -> list[tuple[str, str]]:
    """The parameters of ``POST [type]/_search``: the URL's and the form body's (R4 http.html#search)."""
    return [*request.query_params.multi_items(), *await read_form(request, max_body(request), "POST _search")]


def _search_scope(who: AccessContext, rules: Tenancy, rtype: str) -> dict[str, list[str]]:
    require_scope(who, rtype, "s")
    return rules.search_scope(who, rtype)


async def _search(request: Request, service: CaseService, rtype: str, params: list[tuple[str, str]],
                  scope: dict[str, list[str]]) -> Response:
    count, offset = paging(request, params)
    resources, total = await service.search(rtype, params, count, offset, scope=scope)
    return fhir_response(request, searchset(base_url(request), rtype, resources, total, params, count, offset))


for _rtype in READABLE:
    _register_reads(_rtype)

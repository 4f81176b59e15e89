"""The FHIR REST surface, registered in a few readable lines (base ``/fhir``).

Routes are thin: read the body, call the :class:`~fhir_bridge.workflow.cases.CaseService`, write the answer.
Every error is raised and turned into an OperationOutcome in :mod:`fhir_bridge.api.errors`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response, StreamingResponse

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.access.tenancy import Tenancy, require_scope
from fhir_bridge.api.audit_middleware import resource_patient
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
from fhir_bridge.errors import BridgeError, Forbidden, Gone
from fhir_bridge.fhir.resources import FHIR_JSON, Resource, check_resource_type
from fhir_bridge.opinion.report import based_on_request
from fhir_bridge.workflow.cases import CaseService, bundle_patient, now_instant

router = APIRouter(prefix="/fhir", dependencies=[Depends(negotiate)])
READABLE = ("ServiceRequest", "Task", "DiagnosticReport")


async def cases(request: Request) -> CaseService:
    service: CaseService = request.app.state.cases
    return service


Cases = Annotated[CaseService, Depends(cases)]


async def tenancy(request: Request) -> Tenancy:
    rules: Tenancy | None = getattr(request.app.state, "tenancy", None)
    if rules is None:  # the runtime's CaseService arrives with the lifespan, after create_app
        service: CaseService = request.app.state.cases
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
    return fhir_response(request, capability_statement(base_url(request), now_instant(), request.app.state.profiles))


@router.post("/ServiceRequest")
async def create_service_request(
    request: Request, service: Cases, who: Caller, if_none_exist: Annotated[str | None, Header()] = None
) -> Response:
    require_scope(who, "ServiceRequest", "c")
    if who.role != "platform":
        raise Forbidden("only platform clients submit requests for an opinion")
    body = await read_body(request, max_body(request))
    result = await service.submit_request(body, if_none_exist=if_none_exist, tenant=who.tenant, client=who.client_id)
    return _created(request, "ServiceRequest", result.resource, result.created)


@router.post("/DiagnosticReport")
async def create_diagnostic_report(
    request: Request, service: Cases, who: Caller, rules: Tenants,
    if_none_exist: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "c")
    body = await read_body(request, max_body(request))

    body = await _reidentified(service, who, rules, body)
    result = await service.submit_opinion(body, if_none_exist=if_none_exist, guard=_opinion_guard(rules, who),
                                          author=who.reviewer)
    seen = await seen_by(request, service, who, result.resource)
    return _created(request, "DiagnosticReport", seen, result.created)


@router.put("/DiagnosticReport/{resource_id}")
async def update_diagnostic_report(
    request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    require_scope(who, "DiagnosticReport", "u")
    await visible_resource(service, who, rules, "DiagnosticReport", resource_id)
    body = await read_body(request, max_body(request))

    body = await _reidentified(service, who, rules, body)
    stored = await service.amend_opinion(resource_id, body, if_match=parse_if_match(if_match),
                                         guard=_opinion_guard(rules, who), author=who.reviewer)
    seen = await seen_by(request, service, who, stored)
    return written(request, seen, status=200, location=_location(request, "DiagnosticReport", stored))


@router.delete("/DiagnosticReport/{resource_id}")
async def delete_diagnostic_report(request: Request, resource_id: str, service: Cases, who: Caller,
                                   rules: Tenants) -> Response:
    """R4 http.html#delete: a reviewer retracts their own preliminary opinion; reads then answer 410 Gone."""
    require_scope(who, "DiagnosticReport", "d")
    await visible_resource(service, who, rules, "DiagnosticReport", resource_id)

    await service.delete_opinion(resource_id, guard=_opinion_guard(rules, who), author=who.reviewer)
    return Response(status_code=204)


def _opinion_guard(rules: Tenancy, who: AccessContext) -> Callable[[str], Awaitable[None]]:
    """The caller's right to act on the case of a ServiceRequest id (checked as soon as the case is known)."""

    async def guard(request_id: str) -> None:
        await rules.check_opinion_allowed(who, request_id)

    return guard


async def _reidentified(service: CaseService, who: AccessContext, rules: Tenancy, body: Any) -> Any:
    """A reviewer abroad names the patient by the case pseudonym: put the INS back. The right to the case is
    checked first, so the pseudonym lookup never tells a stranger whether a ServiceRequest exists."""
    if not service.needs_pseudonym(who):
        return body
    try:
        request_id: str | None = based_on_request(check_resource_type(body, "DiagnosticReport"))
    except BridgeError:
        request_id = None  # the opinion's own checks will say what is wrong with it
    if request_id:
        await rules.check_opinion_allowed(who, request_id)
    return await service.reidentified_opinion(body, who)


async def seen_by(request: Request, service: CaseService, who: AccessContext, resource: Resource) -> Resource:
    """``resource`` as ``who`` may see it: pseudonymised for a reviewer whose network asks for it
    (:mod:`fhir_bridge.access.pseudonym`), the audit still naming the real patient (``request.state.audit_patient``)."""
    if not service.needs_pseudonym(who):
        return resource
    if getattr(request.state, "audit_patient", None) is None:
        request.state.audit_patient = resource_patient(resource)
    return await service.reader_view(resource, who)


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
    chunks = service.bundle_chunks(resource_id, who)  # pseudonymised for a reviewer whose network asks for it
    return StreamingResponse(chunks, media_type=f"{FHIR_JSON}; charset=utf-8", headers=version_headers(stub))


async def visible_resource(service: CaseService, who: AccessContext, rules: Tenancy, rtype: str, resource_id: str,
                           *, deleted_ok: bool = False) -> Resource:
    """The current version if ``who`` may see it. A deleted resource (R4 http.html#delete) is judged by its last
    version: a stranger gets 404 as for any unknown id (no existence leak), the others 410, or with
    ``deleted_ok`` (``_history``, vread) its last version."""
    try:
        resource = await service.store.read(rtype, resource_id)
    except Gone:
        last = (await service.store.history(rtype, resource_id))[:1]
        if not last:
            raise
        await rules.check_visible(who, rtype, last[0])
        if not deleted_ok:
            raise
        return last[0]
    await rules.check_visible(who, rtype, resource)
    return resource


def _register_reads(rtype: str) -> None:
    async def visible(service: CaseService, who: AccessContext, rules: Tenancy, resource_id: str, *,
                      deleted_ok: bool = False) -> Resource:
        require_scope(who, rtype, "r")
        return await visible_resource(service, who, rules, rtype, resource_id, deleted_ok=deleted_ok)

    async def read(request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants) -> Response:
        resource = await visible(service, who, rules, resource_id)
        return fhir_response(request, await seen_by(request, service, who, resource),
                             headers=version_headers(resource))

    async def vread(request: Request, resource_id: str, version_id: str, service: Cases, who: Caller,
                    rules: Tenants) -> Response:
        await visible(service, who, rules, resource_id, deleted_ok=True)
        resource = await service.store.vread(rtype, resource_id, version_id)
        return fhir_response(request, await seen_by(request, service, who, resource),
                             headers=version_headers(resource))

    async def history(request: Request, resource_id: str, service: Cases, who: Caller, rules: Tenants) -> Response:
        await visible(service, who, rules, resource_id, deleted_ok=True)
        versions = [await seen_by(request, service, who, v) for v in await service.store.history(rtype, resource_id)]
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
        return await _search(request, service, who, rtype, list(request.query_params.multi_items()), scope)

    async def search_post(request: Request, service: Cases, who: Caller, rules: Tenants) -> Response:
        scope = _search_scope(who, rules, rtype)
        return await _search(request, service, who, rtype, await search_form(request), scope)

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


async def _search(request: Request, service: CaseService, who: AccessContext, rtype: str,
                  params: list[tuple[str, str]], scope: dict[str, list[str]]) -> Response:
    count, offset = paging(request, params)
    found, total = await service.search(rtype, params, count, offset, scope=scope)
    resources = [await service.reader_view(r, who) for r in found] if service.needs_pseudonym(who) else found
    return fhir_response(request, searchset(base_url(request), rtype, resources, total, params, count, offset))


for _rtype in READABLE:
    _register_reads(_rtype)

"""Task operations where FHIR has no interaction (R4 operations.html: ``POST [base]/Task/{id}/$name``).

* ``$refresh``: pull the case again from the source and triage it again (new documents appeared);
* ``$decline``: the assigned reviewer declines, the case is re-routed (Parameters: ``reason``);
* ``$request-documents``: the reviewer needs more, the case waits (Parameters: ``text``).

Bodies are ``Parameters`` resources; each answers the updated Task. Each needs ``system/Task.u``; who may call
which on which case is :meth:`fhir_bridge.access.tenancy.Tenancy.check_task_operation`. The reviewer is the
one the access token names: a ``reviewer`` parameter, if sent, must be that same PractitionerRole.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.access.tenancy import require_scope
from fhir_bridge.api.capability import TASK_OPERATIONS
from fhir_bridge.api.deps import Caller, UseCases, fhir_router, max_body, seen_by
from fhir_bridge.api.fhir_io import fhir_response, read_body, version_headers
from fhir_bridge.errors import Forbidden, InvalidInput
from fhir_bridge.fhir.resources import check_resource_type
from fhir_bridge.workflow.bridge import Bridge

__all__ = ["TASK_OPERATIONS", "parameter", "router"]

router = fhir_router()


def parameter(parameters: dict[str, Any], name: str, *, required: bool = True) -> str:
    """A ``valueString``/``valueCode`` parameter of a Parameters resource (R4 parameters.html)."""
    for item in parameters.get("parameter", []) or []:
        if item.get("name") == name:
            value = item.get("valueString", item.get("valueCode"))
            if isinstance(value, str):
                return value
    if required:
        raise InvalidInput(f"parameter {name!r} is required", expression=[f"Parameters.parameter[{name}]"])
    return ""


async def _parameters(request: Request) -> dict[str, Any]:
    if not int(request.headers.get("content-length") or 0) and "transfer-encoding" not in request.headers:
        return {"resourceType": "Parameters"}
    return check_resource_type(await read_body(request, max_body(request)), "Parameters")


async def _answer(request: Request, bridge: Bridge, who: AccessContext, task: dict[str, Any]) -> Response:
    return fhir_response(request, await seen_by(request, bridge, who, task), headers=version_headers(task))


def _reviewer(who: AccessContext, body: dict[str, Any]) -> str:
    named = parameter(body, "reviewer", required=False)
    if not who.reviewer or (named and named != who.reviewer):
        raise Forbidden("a reviewer acts only as the PractitionerRole its access token names")
    return who.reviewer


def register(target: APIRouter) -> None:
    async def allowed(bridge: Bridge, who: AccessContext, operation: str, task_id: str) -> None:
        require_scope(who, "Task", "u")
        await bridge.tenancy.check_task_operation(who, operation, await bridge.book.read(task_id))

    async def refresh(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
        await allowed(bridge, who, "refresh", resource_id)
        await _parameters(request)
        return await _answer(request, bridge, who, await bridge.cases.refresh(resource_id))

    async def decline(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
        await allowed(bridge, who, "decline", resource_id)
        body = await _parameters(request)
        reason = parameter(body, "reason", required=False)
        task = await bridge.assignments.decline(resource_id, _reviewer(who, body), reason)
        return await _answer(request, bridge, who, task)

    async def request_documents(request: Request, resource_id: str, bridge: UseCases, who: Caller) -> Response:
        await allowed(bridge, who, "request-documents", resource_id)
        body = await _parameters(request)
        task = await bridge.assignments.request_documents(resource_id, _reviewer(who, body), parameter(body, "text"))
        return await _answer(request, bridge, who, task)

    for name, handler in (("refresh", refresh), ("decline", decline), ("request-documents", request_documents)):
        target.add_api_route(f"/Task/{{resource_id}}/${name}", handler, methods=["POST"], name=f"task-{name}")


register(router)

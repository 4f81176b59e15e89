"""What the FHIR route modules share (:mod:`~fhir_bridge.api.routes`, :mod:`~fhir_bridge.api.operations`,
:mod:`~fhir_bridge.api.audit_routes`): the FastAPI dependencies a handler declares and the few helpers they
all call.

* :func:`fhir_router`: a router of the FHIR surface (base ``/fhir``, format negotiated first), one per module,
  each mounted by :func:`fhir_bridge.api.app.create_app`;
* :data:`UseCases`: the use cases of the app (:class:`~fhir_bridge.workflow.bridge.Bridge`, ``app.state.bridge``,
  set by the lifespan of :func:`fhir_bridge.main.build_app` or by a test): the case service, opinions, reads,
  tenancy… — routes call them, never the store behind them;
* :data:`Caller`: the verified caller (:func:`current_caller`, the bearer-token gate of
  :mod:`fhir_bridge.api.security`); in-process tests replace it with a dependency override of
  :func:`current_caller` (``tests/callers.py``);
* :func:`base_url` and :func:`max_body` (defined in :mod:`fhir_bridge.api.fhir_io`, below the security layer
  that needs the base as the tokens' audience); :func:`search_form`, the parameters of ``POST _search``;
  :func:`seen_by`, a resource as the caller may see it.

The import graph of ``fhir_bridge.api`` goes one way: ``fhir_io`` ← ``auth_routes`` ← ``security`` ← ``deps``
← the route modules ← ``app``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.api.audit_middleware import resource_patient
from fhir_bridge.api.fhir_io import base_url, max_body, negotiate, read_form
from fhir_bridge.api.security import caller
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.workflow.bridge import Bridge

__all__ = ["FHIR_BASE", "Caller", "UseCases", "base_url", "current_caller", "fhir_router", "max_body",
           "search_form", "seen_by", "use_cases"]  # fmt: skip

FHIR_BASE = "/fhir"


def fhir_router() -> APIRouter:
    """A router of the FHIR REST surface: its paths under ``/fhir``, the answer's format negotiated before anything
    else (:func:`fhir_bridge.api.fhir_io.negotiate`: 406 before the handler runs)."""
    return APIRouter(prefix=FHIR_BASE, dependencies=[Depends(negotiate)])


async def use_cases(request: Request) -> Bridge:
    bridge: Bridge = request.app.state.bridge
    return bridge


UseCases = Annotated[Bridge, Depends(use_cases)]


async def current_caller(request: Request) -> AccessContext:
    """The verified caller of this request (:func:`fhir_bridge.api.security.caller`); the seam tests override."""
    return await caller(request)


Caller = Annotated[AccessContext, Depends(current_caller)]


async def search_form(request: Request) -> list[tuple[str, str]]:
    """The parameters of ``POST [type]/_search``: the URL's and the form body's (R4 http.html#search)."""
    return [*request.query_params.multi_items(), *await read_form(request, max_body(request), "POST _search")]


async def seen_by(request: Request, bridge: Bridge, who: AccessContext, resource: Resource) -> Resource:
    """``resource`` as ``who`` may see it: pseudonymised for a reviewer whose network asks for it
    (:mod:`fhir_bridge.access.pseudonym`), the audit still naming the real patient (``request.state.audit_patient``)."""
    if not bridge.bundles.needs_pseudonym(who):
        return resource
    if getattr(request.state, "audit_patient", None) is None:
        request.state.audit_patient = resource_patient(resource)
    return await bridge.bundles.reader_view(resource, who)

"""Who calls, for in-process API tests: the AccessContext a verified token would give, chosen by the test.

The real gate (:func:`fhir_bridge.api.security.caller`: bearer token, signature, audience, role ceiling) runs
over real HTTP with real tokens in ``tests/e2e``. In process, :class:`Callers` replaces it through FastAPI's
dependency override of :func:`fhir_bridge.api.deps.current_caller`, so the routes' own rules (scopes,
tenants, reviewer assignment) still decide. Like the real gate it writes the client id and the token's jti on
``request.state`` (the audit trail's seam, :func:`fhir_bridge.api.audit_middleware.client_party`), and with no
caller set it refuses as a missing token does (401).
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, Request

from fhir_bridge.access.scopes import AccessContext, Role
from fhir_bridge.adapters.reference_data import load_role_ceilings
from fhir_bridge.api.deps import current_caller
from fhir_bridge.api.security import MissingToken
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.review.reviewers import ReviewerRegistry

__all__ = ["Callers", "assigned_reviewer", "caller"]

CEILINGS = load_role_ceilings()
TENANTS = {"platform": "platform-a", "reviewer": "reviewers", "auditor": "audit", "operator": "operations"}


def caller(role: Role, client_id: str | None = None, *, tenant: str | None = None, reviewer: str | None = None,
           scopes: tuple[str, ...] | None = None) -> AccessContext:
    """A caller of ``role`` holding that role's whole ceiling (config/roles.json) unless ``scopes`` is given.

    A reviewer's client id is ``reviewer-<PractitionerRole id>`` as the dev clients name them."""
    name = client_id or (f"reviewer-{reviewer}" if reviewer else role)
    return AccessContext(client_id=name, role=role, tenant=tenant or TENANTS[role],
                         scopes=frozenset(CEILINGS[role] if scopes is None else scopes), jti=f"jti-{uuid.uuid4()}",
                         reviewer=reviewer)


def assigned_reviewer(task: Resource, registry: ReviewerRegistry) -> str:
    """The PractitionerRole id of a reviewer the case of ``task`` is assigned to (a panel: its first member)."""
    kind, _, ident = str(task["owner"]["reference"]).rpartition("/")
    return sorted(registry.panels[ident].members)[0] if kind == "CareTeam" else ident


class Callers:
    """The caller of the next requests to ``app``: set :attr:`current` (None: no token, 401)."""

    def __init__(self, app: FastAPI, current: AccessContext | None = None) -> None:
        self.current = current
        app.dependency_overrides[current_caller] = self._verified

    async def _verified(self, request: Request) -> AccessContext:
        who = self.current
        if who is None:
            raise MissingToken("this endpoint needs an access token")
        request.state.client_id = who.client_id
        request.state.jti = who.jti
        request.state.caller = who
        return who

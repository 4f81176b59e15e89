"""Who may see and change which case: roles and tenants on top of scopes (issue 6 "Roles and tenants").

Scopes (:mod:`fhir_bridge.access.scopes`) say which *kinds* of resource a client may touch; this module says which
*ones*:

* **platform** clients see the cases of their own tenant only: every stored ServiceRequest, Task and
  DiagnosticReport carries its tenant in ``meta.tag`` (:data:`~fhir_bridge.fhir.search_index.TENANT_TAG`, copied from
  the request to its Task and opinions) and searches are narrowed to it;
* **reviewers** see only the cases currently assigned to them (``Task.owner`` is their PractitionerRole or a
  panel they sit on): the Task, its ServiceRequest, its case Bundles and its DiagnosticReports. They find their
  work by searching Task; searching anything else is refused (403) since it could only be narrowed after the
  fact. A case re-routed after a decline is no longer theirs;
* **auditors** read the audit only, **operators** run jobs (``$refresh``) on any case.

Anything a caller may not see answers exactly like something that does not exist (404, R4 http.html §3.1.0.4
lets a server hide existence; our rule: no existence leak), never 403, so identifiers can not be probed.
A refusal of *kind* (no scope, wrong role) is 403, it reveals nothing about any case.
"""

from __future__ import annotations

from collections.abc import Mapping

from fhir_bridge.access.scopes import AccessContext, Interaction, has_scope
from fhir_bridge.errors import Forbidden, InsufficientScope, NotFound
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import OUTPUT_TERM, OWNER_TERM, TENANT_TERM, tenant_of
from fhir_bridge.ports import ResourceStorePort
from fhir_bridge.review.reviewers import ReviewerRegistry

__all__ = ["Tenancy", "require_scope"]

_HIDDEN = "{rtype}/{id} is not known"  # word for word what the store says of an unknown id
_CASE_TYPES = frozenset({"ServiceRequest", "Task", "DiagnosticReport", "Bundle"})


def require_scope(caller: AccessContext, resource_type: str, interaction: Interaction) -> None:
    """403 unless the caller's token grants ``interaction`` on ``resource_type`` (SMART scopes)."""
    if not has_scope(caller, resource_type, interaction):
        raise InsufficientScope(f"the access token does not grant system/{resource_type}.{interaction}")


class Tenancy:
    """The per-case access decisions, against the store (reads) and the reviewer registry (panels)."""

    def __init__(self, store: ResourceStorePort, registry: ReviewerRegistry) -> None:
        self.store = store
        self.registry = registry

    # -- searches -------------------------------------------------------------------------------------

    def search_scope(self, caller: AccessContext, resource_type: str) -> dict[str, list[str]]:
        """Criteria ANDed into every search of ``caller`` (the store ANDs parameters, ORs values)."""
        if caller.role == "platform" and resource_type in _CASE_TYPES - {"Bundle"}:
            return {TENANT_TERM: [caller.tenant]}
        if caller.role == "reviewer" and resource_type == "Task":
            return {OWNER_TERM: self.owner_references(caller)}
        raise Forbidden(f"a {caller.role} client can not search {resource_type}"
                        + ("; reviewers find their cases by searching Task" if caller.role == "reviewer" else ""))

    def owner_references(self, caller: AccessContext) -> list[str]:
        """The ``Task.owner`` values that make a case the reviewer's: themself and each panel they sit on."""
        me = caller.reviewer
        if not me:
            return ["PractitionerRole/-"]  # a reviewer client registered without its PractitionerRole owns nothing
        panels = [f"CareTeam/{pid}" for pid, panel in self.registry.panels.items() if me in panel.members]
        return [f"PractitionerRole/{me}", *panels]

    # -- one resource ---------------------------------------------------------------------------------

    async def check_visible(self, caller: AccessContext, resource_type: str, resource: Resource) -> None:
        """NotFound unless ``caller`` may see ``resource`` (current version decides, for vread/history too)."""
        if not await self.visible(caller, resource_type, resource):
            raise NotFound(_HIDDEN.format(rtype=resource_type, id=resource.get("id")))

    async def visible(self, caller: AccessContext, resource_type: str, resource: Resource) -> bool:
        if resource_type not in _CASE_TYPES:
            return False
        if caller.role == "platform":
            if resource_type == "Bundle":
                task = await self._task_of_bundle(resource)
                return task is not None and tenant_of(task) == caller.tenant
            return tenant_of(resource) == caller.tenant
        if caller.role == "reviewer":
            task = await self.case_task(resource_type, resource)
            return task is not None and self.assigned(caller, task)
        return False

    def assigned(self, caller: AccessContext, task: Resource) -> bool:
        owner = str((task.get("owner") or {}).get("reference") or "").split("/_history/")[0]
        return bool(owner) and owner in self.owner_references(caller)

    async def case_task(self, resource_type: str, resource: Resource) -> Resource | None:
        """The Task of the case ``resource`` belongs to (None if there is none)."""
        if resource_type == "Task":
            return resource
        if resource_type == "Bundle":
            return await self._task_of_bundle(resource)
        if resource_type == "ServiceRequest":
            request_id = str(resource.get("id"))
        else:  # DiagnosticReport
            refs = [str(r.get("reference") or "") for r in resource.get("basedOn", []) or []]
            request_id = next((r.split("/")[1] for r in refs if r.startswith("ServiceRequest/")), "")
        return await self._first("Task", {"focus": [f"ServiceRequest/{request_id}"]}) if request_id else None

    async def _task_of_bundle(self, bundle: Resource) -> Resource | None:
        return await self._first("Task", {OUTPUT_TERM: [f"Bundle/{bundle.get('id')}"]})

    async def _first(self, resource_type: str, criteria: Mapping[str, list[str]]) -> Resource | None:
        page = await self.store.search(resource_type, dict(criteria), count=1)
        return page.resources[0] if page.resources else None

    # -- changes --------------------------------------------------------------------------------------

    async def check_opinion_allowed(self, caller: AccessContext, request_id: str | None) -> None:
        """A reviewer may post or amend an opinion only on a case assigned to them now (403 otherwise, the
        same answer whether the ServiceRequest exists or not)."""
        refused = Forbidden("basedOn does not name a case assigned to this reviewer")
        if caller.role != "reviewer" or not request_id:
            raise refused
        task = await self._first("Task", {"focus": [f"ServiceRequest/{request_id}"]})
        if task is None or not self.assigned(caller, task):
            raise refused

    async def check_task_operation(self, caller: AccessContext, operation: str, task: Resource) -> None:
        """``$refresh``: the requesting platform or an operator; ``$decline`` / ``$request-documents``: the
        reviewer the case is assigned to. Others get 404 (the case is not theirs) or 403 (wrong role)."""
        if operation == "refresh":
            if caller.role == "operator" or (caller.role == "platform" and tenant_of(task) == caller.tenant):
                return
            if caller.role == "reviewer" and self.assigned(caller, task):
                raise Forbidden("a reviewer can not refresh a case; ask for documents with $request-documents")
        elif caller.role == "reviewer":
            if self.assigned(caller, task):
                return
        elif caller.role in ("platform", "operator") and (caller.role == "operator"
                                                          or tenant_of(task) == caller.tenant):
            raise Forbidden(f"only the assigned reviewer can call ${operation}")
        raise NotFound(_HIDDEN.format(rtype="Task", id=task.get("id")))

"""Reading the exchange's resources for one caller: what they may see (tenancy), as they may see it.

The read side of the FHIR API (R4 http.html#read, #vread, #history, #search) on the store, each answer
judged by :class:`~fhir_bridge.access.tenancy.Tenancy` first, so that something a caller may not see answers
like something that does not exist. A deleted resource (R4 http.html#delete) is judged by its last version:
a stranger gets 404 as for any unknown id (no existence leak), its readers 410 on read, and on ``_history`` and
vread its versions. Pseudonymised views for reviewers abroad are the readers' concern
(:class:`~fhir_bridge.workflow.case_bundles.CaseBundles.reader_view`), applied by the API to what this returns.
"""

from __future__ import annotations

from collections.abc import Mapping

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.access.tenancy import Tenancy
from fhir_bridge.errors import Gone
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import parse_criteria
from fhir_bridge.ports import ResourceStorePort


class Records:
    """Reads of ServiceRequest, Task, DiagnosticReport and case Bundle stubs, for a caller."""

    def __init__(self, store: ResourceStorePort, tenancy: Tenancy) -> None:
        self.store = store
        self.tenancy = tenancy

    async def read(self, who: AccessContext, resource_type: str, resource_id: str, *,
                   deleted_ok: bool = False) -> Resource:
        """The current version if ``who`` may see it; a deleted one: Gone, or with ``deleted_ok`` (history,
        vread) its last version — NotFound for a caller who could not see it."""
        try:
            resource = await self.store.read(resource_type, resource_id)
        except Gone:
            last = (await self.store.history(resource_type, resource_id))[:1]
            if not last:
                raise
            await self.tenancy.check_visible(who, resource_type, last[0])
            if not deleted_ok:
                raise
            return last[0]
        await self.tenancy.check_visible(who, resource_type, resource)
        return resource

    async def vread(self, who: AccessContext, resource_type: str, resource_id: str, version_id: str) -> Resource:
        """One version of a resource ``who`` may see (the current or last version decides)."""
        await self.read(who, resource_type, resource_id, deleted_ok=True)
        return await self.store.vread(resource_type, resource_id, version_id)

    async def history(self, who: AccessContext, resource_type: str, resource_id: str) -> list[Resource]:
        """Every version, newest first, of a resource ``who`` may see."""
        await self.read(who, resource_type, resource_id, deleted_ok=True)
        return await self.store.history(resource_type, resource_id)

    async def search(self, resource_type: str, params: list[tuple[str, str]], count: int, offset: int, *,
                     scope: Mapping[str, list[str]] | None = None) -> tuple[list[Resource], int]:
        """A search, ANDed with ``scope`` (the caller's criteria, :meth:`Tenancy.search_scope`)."""
        criteria = {**parse_criteria(resource_type, params), **(scope or {})}
        page = await self.store.search(resource_type, criteria, count=count, offset=offset)
        return page.resources, page.total

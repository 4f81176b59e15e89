"""Conditional create (FHIR R4 http.html#ccreate), shared by the request and the opinion use cases.

``If-None-Exist`` is a search on the type's own parameters: no match → create, one match → that one (200, not
created again), more → 412. It is matched within the caller's ``scope`` only (its tenant, the case), so a
client's conditional create never finds, nor collides with, a resource it could not read. The search key it
returns is the store's unique key for the create, so two concurrent creates with one condition make one
resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from fhir_bridge.errors import InvalidInput, PreconditionFailed
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import parse_criteria
from fhir_bridge.ports import ResourceStorePort


async def conditional_match(store: ResourceStorePort, resource_type: str, if_none_exist: str | None,
                            scope: Mapping[str, list[str]]) -> tuple[Resource | None, str | None]:
    """The resource ``If-None-Exist`` finds (or None) and the unique key of a create under that condition
    (None when there is no condition)."""
    if not if_none_exist:
        return None, None
    params = parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)
    if not params or any(name.startswith("_") for name, _ in params):
        raise InvalidInput("If-None-Exist must be a search on this type's parameters, such as identifier=system|value")
    criteria = {**parse_criteria(resource_type, params), **scope}
    page = await store.search(resource_type, criteria, count=2)
    if page.total > 1:
        raise PreconditionFailed("If-None-Exist matches more than one resource")
    key = f"ine:{resource_type}?" + "&".join(f"{k}={','.join(sorted(v))}" for k, v in sorted(criteria.items()))
    return (page.resources[0] if page.resources else None), key

"""The CapabilityStatement says exactly what the mounted routes do (STANDARDS.md §9)."""

from __future__ import annotations

from fastapi.routing import APIRoute

from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api.app import create_app
from fhir_bridge.api.capability import AUDIT_SEARCH_PARAMS, capability_statement
from fhir_bridge.api.operations import router
from fhir_bridge.resources import validate
from fhir_bridge.search_index import SEARCH_PARAMS

SHAPES = {
    ("GET", "/fhir/{T}/{resource_id}"): "read",
    ("GET", "/fhir/{T}/{resource_id}/_history/{version_id}"): "vread",
    ("GET", "/fhir/{T}/{resource_id}/_history"): "history-instance",
    ("GET", "/fhir/{T}"): "search-type",
    ("POST", "/fhir/{T}/_search"): "search-type",
    ("POST", "/fhir/{T}"): "create",
    ("PUT", "/fhir/{T}/{resource_id}"): "update",
}


def served_interactions() -> dict[str, set[str]]:
    create_app(Settings(), None)  # the app mounts this router as it is
    served: dict[str, set[str]] = {}
    for route in router.routes:
        if not isinstance(route, APIRoute) or not route.path.startswith("/fhir/") or route.path == "/fhir/metadata":
            continue
        rtype = route.path.split("/")[2]
        shape = route.path.replace(f"/fhir/{rtype}", "/fhir/{T}", 1)
        for method in route.methods:
            if "/$" in shape:
                served.setdefault(rtype, set()).add("$" + shape.rsplit("/$", 1)[1])
                continue
            served.setdefault(rtype, set()).add(SHAPES[(method, shape)])
    return served


def test_capability_statement_lists_exactly_the_routes() -> None:
    statement = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z")
    validate(statement)
    declared = {r["type"]: {i["code"] for i in r["interaction"]} | {"$" + o["name"] for o in r.get("operation", [])}
                for r in statement["rest"][0]["resource"]}
    assert declared == served_interactions()


def test_declared_search_parameters_are_the_ones_we_index() -> None:
    statement = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z")
    for resource in statement["rest"][0]["resource"]:
        names = {p["name"] for p in resource.get("searchParam", [])} - {"_count", "_offset"}
        # AuditEvents are searched over the audit log's own index (fhir_bridge.api.audit_routes)
        indexed = AUDIT_SEARCH_PARAMS if resource["type"] == "AuditEvent" else SEARCH_PARAMS.get(resource["type"], {})
        assert names == set(indexed)

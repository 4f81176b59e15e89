"""The CapabilityStatement says exactly what the mounted routes do (STANDARDS.md §9), and how to get in (§8)."""

from __future__ import annotations

import httpx
from fastapi import APIRouter
from fastapi.routing import APIRoute

from fhir_bridge.adapters.reference_data import load_profiles
from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api.app import FHIR_ROUTERS, create_app
from fhir_bridge.api.capability import AUDIT_SEARCH_PARAMS, capability_statement
from fhir_bridge.fhir.resources import validate
from fhir_bridge.fhir.search_index import SEARCH_PARAMS

router = APIRouter(routes=[route for fhir in FHIR_ROUTERS for route in fhir.routes])  # the /fhir routes mounted

SHAPES = {
    ("GET", "/fhir/{T}/{resource_id}"): "read",
    ("GET", "/fhir/{T}/{resource_id}/_history/{version_id}"): "vread",
    ("GET", "/fhir/{T}/{resource_id}/_history"): "history-instance",
    ("GET", "/fhir/{T}"): "search-type",
    ("POST", "/fhir/{T}/_search"): "search-type",
    ("POST", "/fhir/{T}"): "create",
    ("PUT", "/fhir/{T}/{resource_id}"): "update",
    ("DELETE", "/fhir/{T}/{resource_id}"): "delete",
}


def served_interactions() -> dict[str, set[str]]:
    create_app(Settings(), None, profiles=load_profiles())  # the app mounts this router as it is
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
    statement = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z", load_profiles())
    validate(statement)
    declared = {r["type"]: {i["code"] for i in r["interaction"]} | {"$" + o["name"] for o in r.get("operation", [])}
                for r in statement["rest"][0]["resource"]}
    assert declared == served_interactions()


def test_declared_search_parameters_are_the_ones_we_index() -> None:
    statement = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z", load_profiles())
    for resource in statement["rest"][0]["resource"]:
        names = {p["name"] for p in resource.get("searchParam", [])} - {"_count", "_offset"}
        # AuditEvents are searched over the audit log's own index (fhir_bridge.api.audit_routes)
        indexed = AUDIT_SEARCH_PARAMS if resource["type"] == "AuditEvent" else SEARCH_PARAMS.get(resource["type"], {})
        assert names == set(indexed)


async def test_metadata_and_discovery_are_open_and_name_the_same_token_endpoint() -> None:
    # SMART App Launch 2.2 conformance.html: a server SHALL publish .well-known/smart-configuration; the
    # CapabilityStatement's rest.security says SMART-on-FHIR (R4 restful-security-service) and oauth-uris agrees
    transport = httpx.ASGITransport(app=create_app(Settings(), None, profiles=load_profiles()))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
        metadata = await client.get("/fhir/metadata")
        discovery = await client.get("/fhir/.well-known/smart-configuration")
    assert metadata.status_code == discovery.status_code == 200  # no token asked for either
    security = metadata.json()["rest"][0]["security"]
    assert {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR"} in security["service"][0]["coding"]  # fmt: skip
    [uris] = [e for e in security["extension"] if e["url"].endswith("/oauth-uris")]
    token = next(e["valueUri"] for e in uris["extension"] if e["url"] == "token")
    assert token == discovery.json()["token_endpoint"] == "http://bridge.test/auth/token"

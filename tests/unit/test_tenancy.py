"""Roles and tenants in the core (fhir_bridge.access.tenancy, access ceilings), on the in-memory store.

The same rules are proven over real HTTP in tests/e2e/test_security.py; these pin each decision down fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.access.scopes import AccessContext, within_ceiling
from fhir_bridge.access.tenancy import Tenancy, require_scope
from fhir_bridge.adapters.clients import add_client, generate_client_keypair
from fhir_bridge.adapters.reference_data import load_registry, load_role_ceilings
from fhir_bridge.errors import Forbidden, InsufficientScope, InvalidInput, NotFound
from fhir_bridge.fhir.search_index import OUTPUT_TERM, OWNER_TERM, TENANT_TERM, index_terms, tenant_of, with_tenant
from tests.fakes import InMemoryStore

REGISTRY = load_registry()
PANEL_ID, PANEL = next(iter(REGISTRY.panels.items()))
MEMBER = sorted(PANEL.members)[0]
LONER = next(r for r in sorted(REGISTRY.reviewers) if all(r not in p.members for p in REGISTRY.panels.values()))


def who(role: str, tenant: str = "t1", reviewer: str | None = None, scopes: str = "system/*.cruds") -> AccessContext:
    return AccessContext(client_id=f"{role}-c", role=role, tenant=tenant,  # type: ignore[arg-type]
                         scopes=frozenset(scopes.split()), jti="j", reviewer=reviewer)


async def stored(store: InMemoryStore, resource: dict[str, Any]) -> dict[str, Any]:
    created, _ = await store.create(resource, index=index_terms(resource))
    return created


async def a_case(store: InMemoryStore, tenant: str, owner: str | None) -> dict[str, dict[str, Any]]:
    sr = await stored(store, with_tenant({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                                         "subject": {"identifier": {"system": "s", "value": "1"}}}, tenant))
    bundle = await stored(store, {"resourceType": "Bundle", "type": "document"})
    task: dict[str, Any] = {"resourceType": "Task", "status": "ready", "intent": "order",
                            "focus": {"reference": f"ServiceRequest/{sr['id']}"},
                            "output": [{"type": {"text": "case"},
                                        "valueReference": {"reference": f"Bundle/{bundle['id']}"}}]}
    if owner:
        task["owner"] = {"reference": owner}
    task = await stored(store, with_tenant(task, tenant))
    report = await stored(store, with_tenant({"resourceType": "DiagnosticReport", "status": "final",
                                             "basedOn": [{"reference": f"ServiceRequest/{sr['id']}"}]}, tenant))
    return {"ServiceRequest": sr, "Task": task, "Bundle": bundle, "DiagnosticReport": report}


def test_tenant_tags_round_trip_and_are_indexed() -> None:
    sr = with_tenant({"resourceType": "ServiceRequest", "meta": {"tag": [{"system": "x", "code": "y"}]}}, "t1")
    assert tenant_of(sr) == "t1" and {"system": "x", "code": "y"} in sr["meta"]["tag"]
    assert tenant_of(with_tenant(sr, "t2")) == "t2"  # never two tenants
    assert index_terms(sr)[TENANT_TERM] == ["t1"]
    task = with_tenant({"resourceType": "Task", "owner": {"reference": "CareTeam/p"},
                        "output": [{"valueReference": {"reference": "Bundle/b"}},
                                   {"valueReference": {"reference": "#triage"}}]}, "t1")
    terms = index_terms(task)
    assert terms[OWNER_TERM] == ["CareTeam/p"] and terms[OUTPUT_TERM] == ["Bundle/b"]


async def test_platforms_see_their_own_tenant_only() -> None:
    store = InMemoryStore()
    rules = Tenancy(store, REGISTRY)
    case = await a_case(store, "t1", f"PractitionerRole/{LONER}")
    for rtype, resource in case.items():
        assert await rules.visible(who("platform", "t1"), rtype, resource), rtype
        assert not await rules.visible(who("platform", "t2"), rtype, resource), rtype
        with pytest.raises(NotFound, match=f"{rtype}/{resource['id']} is not known"):
            await rules.check_visible(who("platform", "t2"), rtype, resource)
    assert rules.search_scope(who("platform", "t2"), "Task") == {TENANT_TERM: ["t2"]}
    with pytest.raises(Forbidden):
        rules.search_scope(who("platform"), "Bundle")


async def test_reviewers_see_the_cases_assigned_to_them_or_their_panel() -> None:
    store = InMemoryStore()
    rules = Tenancy(store, REGISTRY)
    mine = await a_case(store, "t1", f"PractitionerRole/{LONER}")
    panel = await a_case(store, "t1", f"CareTeam/{PANEL_ID}")
    nobody = await a_case(store, "t1", None)
    loner, member = who("reviewer", "r", LONER), who("reviewer", "r", MEMBER)
    for rtype in mine:
        assert await rules.visible(loner, rtype, mine[rtype])
        assert not await rules.visible(member, rtype, mine[rtype])
        assert await rules.visible(member, rtype, panel[rtype])
        assert not await rules.visible(loner, rtype, panel[rtype])
        assert not await rules.visible(loner, rtype, nobody[rtype])
    assert f"CareTeam/{PANEL_ID}" in rules.search_scope(member, "Task")[OWNER_TERM]
    with pytest.raises(Forbidden, match="searching Task"):
        rules.search_scope(loner, "DiagnosticReport")
    # a reviewer client registered without its PractitionerRole owns nothing
    assert not await rules.visible(who("reviewer", "r", None), "Task", mine["Task"])


async def test_opinions_and_task_operations_follow_the_assignment() -> None:
    store = InMemoryStore()
    rules = Tenancy(store, REGISTRY)
    case = await a_case(store, "t1", f"PractitionerRole/{LONER}")
    sr_id, task = case["ServiceRequest"]["id"], case["Task"]
    await rules.check_opinion_allowed(who("reviewer", "r", LONER), sr_id)
    for caller, request_id in ((who("reviewer", "r", MEMBER), sr_id), (who("reviewer", "r", LONER), "unknown"),
                               (who("platform", "t1"), sr_id), (who("auditor"), sr_id)):
        with pytest.raises(Forbidden, match="not name a case assigned"):
            await rules.check_opinion_allowed(caller, request_id)
    await rules.check_task_operation(who("reviewer", "r", LONER), "decline", task)
    await rules.check_task_operation(who("platform", "t1"), "refresh", task)
    await rules.check_task_operation(who("operator", "ops"), "refresh", task)
    with pytest.raises(NotFound):
        await rules.check_task_operation(who("platform", "t2"), "refresh", task)
    with pytest.raises(NotFound):
        await rules.check_task_operation(who("reviewer", "r", MEMBER), "decline", task)
    with pytest.raises(Forbidden):
        await rules.check_task_operation(who("platform", "t1"), "decline", task)
    with pytest.raises(Forbidden):
        await rules.check_task_operation(who("reviewer", "r", LONER), "refresh", task)


def test_scopes_are_required_and_capped_by_the_role() -> None:
    require_scope(who("platform", scopes="system/Task.rs"), "Task", "r")
    with pytest.raises(InsufficientScope):
        require_scope(who("platform", scopes="system/Task.rs"), "Task", "u")
    ceilings = load_role_ceilings()
    assert within_ceiling("auditor", ["system/*.cruds"], ceilings) == ("system/AuditEvent.rs",)
    assert within_ceiling("operator", ["system/Task.cruds"], ceilings) == ("system/Task.u",)


def test_a_client_is_never_registered_beyond_its_role(tmp_path: Path) -> None:
    _, public = generate_client_keypair(tmp_path)
    with pytest.raises(InvalidInput, match=r"can not hold system/ServiceRequest\.c"):
        add_client(tmp_path / "clients.json", "aud", "auditor", public, ["system/AuditEvent.rs",
                                                                         "system/ServiceRequest.c"], "t")
    assert not (tmp_path / "clients.json").exists()
    add_client(tmp_path / "clients.json", "aud", "auditor", public, ["system/AuditEvent.read"], "t")


def test_the_role_ceilings_file_must_name_every_role(tmp_path: Path) -> None:
    bad = tmp_path / "roles.json"
    bad.write_text('{"platform": ["system/Task.rs"]}')
    with pytest.raises(InvalidInput, match="exactly the roles"):
        load_role_ceilings(bad)

"""Everything the bridge emits, read back over the API as the clients who read it, is valid base R4 and
conforms to our profiles (issue 10, items 1 and 4): the request and its Task (every version) as the platform,
the case Bundle and its Composition as the reviewer, the opinion as both, the AuditEvents as the auditor.
Real redis-server, `fhir-bridge serve`, a worker and the sandbox."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.reference_data import load_profiles, load_terminology
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.fhir.profile_check import conform
from fhir_bridge.fhir.profiles import Profiles
from fhir_bridge.fhir.resources import Resource, validate
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.test_exchange import opinion_as_seen, post, wait_task

pytestmark = pytest.mark.e2e


def every_page(client: httpx.Client, url: str, params: dict[str, str]) -> list[Resource]:
    """Every resource of a search, following Bundle.link[next] (each page validated as R4 too)."""
    found: list[Resource] = []
    page = client.get(url, params=params).raise_for_status().json()
    while True:
        validate(page)
        found += [e["resource"] for e in page.get("entry", [])]
        following = [link["url"] for link in page.get("link", []) if link["relation"] == "next"]
        if not following:
            return found
        page = client.get(following[0]).raise_for_status().json()


@pytest.fixture(scope="module")
def emitted(bridge: Bridge, sandbox: Sandbox) -> Iterator[dict[str, list[Resource]]]:
    """A second-opinion case end to end and a tumor-board case up to its Bundle; what each party reads of
    them, by resource type."""
    patient = sandbox.world()["patients"][0]
    out: dict[str, list[Resource]] = {}
    with bridge.client("platform") as platform:
        created = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "CONFORMANCE-1"))
        assert created.status_code == 201, created.text
        sr_id = created.json()["id"]
        task = wait_task(platform, bridge.api, sr_id)
        assert task["status"] == "ready", task.get("statusReason")
        with bridge.client(bridge.reviewer_of(task)) as reviewer:
            case_bundle = reviewer.get(f"{bridge.api}/{task['output'][0]['valueReference']['reference']}")
            report = post(reviewer, bridge.api, "DiagnosticReport", opinion_as_seen(reviewer, bridge.api, sr_id))
            assert report.status_code == 201, report.text
            reviewer_view = [reviewer.get(f"{bridge.api}/ServiceRequest/{sr_id}").raise_for_status().json(),
                             reviewer.get(f"{bridge.api}/Task/{task['id']}").raise_for_status().json()]
        # a tumor-board case: its Task is owned by a panel (CareTeam), its Bundle read by a panel member
        board_body = second_opinion_request(patient, "CONFORMANCE-BOARD")
        board_body["code"]["coding"][0]["code"] = "tumor-board-opinion"
        board = post(platform, bridge.api, "ServiceRequest", board_body)
        assert board.status_code == 201, board.text
        board_task = wait_task(platform, bridge.api, board.json()["id"])
        assert board_task["owner"]["reference"].startswith("CareTeam/")
        with bridge.client(bridge.reviewer_of(board_task)) as member:
            board_bundle = member.get(f"{bridge.api}/{board_task['output'][0]['valueReference']['reference']}")
            board_bundle = board_bundle.raise_for_status().json()
        bundle = case_bundle.raise_for_status().json()
        versions = platform.get(f"{bridge.api}/Task/{task['id']}/_history").raise_for_status().json()
        out["ServiceRequest"] = [platform.get(f"{bridge.api}/ServiceRequest/{sr_id}").raise_for_status().json(),
                                 reviewer_view[0], board.json()]
        out["Task"] = [e["resource"] for e in versions["entry"]] + [reviewer_view[1], board_task]
        out["Bundle"] = [bundle, board_bundle]
        out["Composition"] = [b["entry"][0]["resource"] for b in out["Bundle"]]
        out["DiagnosticReport"] = [report.json(), *every_page(platform, f"{bridge.api}/DiagnosticReport",
                                                              {"based-on": f"ServiceRequest/{sr_id}"})]
    with bridge.client("auditor") as auditor:
        out["AuditEvent"] = every_page(auditor, f"{bridge.api}/AuditEvent", {"_count": "50"})
    yield out


@pytest.fixture(scope="module")
def profiles() -> Profiles:
    return load_profiles()


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return load_terminology()


@pytest.mark.parametrize("resource_type",
                         ["ServiceRequest", "Task", "Bundle", "Composition", "DiagnosticReport", "AuditEvent"])
def test_every_emitted_resource_is_valid_r4_and_conforms_to_our_profile(
    emitted: dict[str, list[Resource]], resource_type: str, profiles: Profiles, terminology: Terminology
) -> None:
    assert emitted[resource_type], f"no {resource_type} was read"
    for resource in emitted[resource_type]:
        validate(resource)
        conform(resource, profiles, terminology)  # raises naming the paths and invariants it breaks


def test_every_code_of_our_systems_is_defined_in_mappings(
    emitted: dict[str, list[Resource]], terminology: Terminology
) -> None:
    systems = {r["url"]: r for r in terminology.resources.values() if r.get("resourceType") == "CodeSystem"}

    def codes(concepts: list[Resource]) -> set[str]:
        return {c["code"] for c in concepts} | {x for c in concepts for x in codes(c.get("concept", []))}

    def codings(node: Any) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            if isinstance(node.get("system"), str) and isinstance(node.get("code"), str):
                yield node["system"], node["code"]
            for value in node.values():
                yield from codings(value)
        elif isinstance(node, list):
            for value in node:
                yield from codings(value)

    ours = {pair for resources in emitted.values() for pair in codings(resources)
            if pair[0].startswith(f"{CANONICAL_BASE}/CodeSystem/")}
    assert ours
    unknown = {(s, c) for s, c in ours if s not in systems
               or (systems[s]["content"] != "not-present" and c not in codes(systems[s].get("concept", [])))}
    assert unknown == set()


def test_last_updated_finds_what_changed_in_a_window(bridge: Bridge, emitted: dict[str, list[Resource]]) -> None:
    # search.html#lastUpdated: incremental sync (STANDARDS.md §9); the store orders by meta.lastUpdated
    with bridge.client("platform") as platform:
        request = platform.get(f"{bridge.api}/ServiceRequest/{emitted['ServiceRequest'][0]['id']}").json()
        changed = datetime.fromisoformat(request["meta"]["lastUpdated"].replace("Z", "+00:00"))
        before, after = (changed - timedelta(seconds=1)).isoformat(), (changed + timedelta(seconds=1)).isoformat()

        def ids(*window: str) -> set[str]:
            params = [("identifier", "https://platform.example/requests|CONFORMANCE-1"),
                      *(("_lastUpdated", w) for w in window)]
            page = platform.get(f"{bridge.api}/ServiceRequest", params=params).raise_for_status().json()
            return {e["resource"]["id"] for e in page.get("entry", [])}

        assert ids(f"ge{before}") == {request["id"]} == ids(f"ge{before}", f"lt{after}")
        assert ids(f"lt{before}") == set() == ids(f"gt{after}")
        tasks = platform.get(f"{bridge.api}/Task", params={"_lastUpdated": f"ge{before}"}).raise_for_status().json()
        assert tasks["total"] >= 1
        assert platform.get(f"{bridge.api}/Task", params={"_lastUpdated": "ge2026-13-01"}).status_code == 400
        assert platform.get(f"{bridge.api}/Task", params={"_lastUpdated": "ge2026-01-01,lt2026-02-01"}).status_code \
            == 400
        now = datetime.now(UTC)
        late = platform.get(f"{bridge.api}/DiagnosticReport", params={"_lastUpdated": f"gt{now.isoformat()}"})
        assert late.raise_for_status().json()["total"] == 0


def test_what_a_reviewer_abroad_reads_pseudonymised_conforms_too(
    bridge: Bridge, sandbox: Sandbox, profiles: Profiles, terminology: Terminology
) -> None:
    from tests.e2e.test_cross_border import cross_border_reviewers

    patient = next(p for p in sandbox.world()["patients"] if p.get("specialty") == "oncology")
    abroad = cross_border_reviewers(bridge)
    with bridge.client("platform") as platform:
        created = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "CONFORMANCE-XB"))
        sr_id = created.raise_for_status().json()["id"]
        task = wait_task(platform, bridge.api, sr_id)
        for _ in range(6):  # French reviewers decline until the case reaches one abroad
            if task["owner"]["reference"].split("/")[1] in abroad:
                break
            with bridge.client(bridge.reviewer_of(task)) as french:
                french.post(f"{bridge.api}/Task/{task['id']}/$decline", json={
                    "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "away"}],
                }, headers={"Content-Type": "application/fhir+json"}).raise_for_status()
            task = platform.get(f"{bridge.api}/Task/{task['id']}").raise_for_status().json()
        assert task["owner"]["reference"].split("/")[1] in abroad
        history = platform.get(f"{bridge.api}/Task/{task['id']}/_history").raise_for_status().json()
    with bridge.client(bridge.reviewer_of(task)) as reviewer:
        seen = [reviewer.get(f"{bridge.api}/ServiceRequest/{sr_id}").raise_for_status().json(),
                reviewer.get(f"{bridge.api}/Task/{task['id']}").raise_for_status().json()]
        bundle = reviewer.get(f"{bridge.api}/{task['output'][0]['valueReference']['reference']}")
        seen += [bundle.raise_for_status().json(), bundle.json()["entry"][0]["resource"]]
    assert seen[2]["meta"]["security"], "the reviewer abroad reads the pseudonymised Bundle"
    for resource in [*seen, *(e["resource"] for e in history["entry"])]:
        validate(resource)
        conform(resource, profiles, terminology)

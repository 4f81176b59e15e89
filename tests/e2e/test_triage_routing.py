"""Triage and routing end to end: real processes, the sandbox as the source, config/reviewers.json as data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.reference_data import load_registry
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.fhir.resources import validate
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.test_exchange import post, wait_task

pytestmark = pytest.mark.e2e
REGISTRY = load_registry()


def op(client: httpx.Client, bridge: Bridge, task_id: str, name: str, **params: str) -> httpx.Response:
    """``POST Task/{id}/$name`` with ``params`` as a Parameters body, as ``client``."""
    body = {"resourceType": "Parameters", "parameter": [{"name": k, "valueString": v} for k, v in params.items()]}
    return post(client, bridge.api, f"Task/{task_id}/${name}", body)


def owner(task: dict[str, Any]) -> str:
    return str(task["owner"]["reference"]).rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def platform(bridge: Bridge) -> Iterator[httpx.Client]:
    with bridge.client("platform") as client:
        yield client


@pytest.fixture(scope="module")
def routed_case(bridge: Bridge, sandbox: Sandbox, platform: httpx.Client) -> dict[str, Any]:
    patient = sandbox.world()["patients"][0]
    answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "ROUTE-1"))
    assert answer.status_code == 201, answer.text
    task = wait_task(platform, bridge.api, answer.json()["id"])
    assert task["status"] == "ready", task.get("statusReason")
    return {"patient": patient, "sr": answer.json(), "task": task}


def test_a_ready_case_is_routed_to_a_reviewer_of_its_specialty(routed_case: dict[str, Any]) -> None:
    task = routed_case["task"]
    validate(task)
    assert task["owner"]["reference"].startswith("PractitionerRole/")
    assert "oncology" in REGISTRY.reviewers[owner(task)].specialties
    triage = next(c for c in task["contained"] if c["id"] == "triage")
    assert all(issue["severity"] != "error" for issue in triage["issue"])
    assert task["restriction"]["period"]["end"]


def test_a_decline_re_routes_to_someone_else(bridge: Bridge, routed_case: dict[str, Any]) -> None:
    task = routed_case["task"]
    first = owner(task)
    with bridge.client(bridge.reviewer_of(task)) as reviewer:
        answer = op(reviewer, bridge, task["id"], "decline", reviewer=first, reason="conflit d'intérêts")
        assert answer.status_code == 200, answer.text
        # no longer theirs: the case is hidden from the reviewer who declined it
        assert reviewer.get(f"{bridge.api}/Task/{task['id']}").status_code == 404
    declined = answer.json()
    assert first in [e["valueString"] for e in declined["extension"] if e["url"].endswith("declined-by")]
    if declined.get("owner"):
        assert owner(declined) != first
        assert "oncology" in REGISTRY.reviewers[owner(declined)].specialties
    routed_case["task"] = declined


def test_only_the_assigned_reviewer_may_decline(
    bridge: Bridge, routed_case: dict[str, Any], platform: httpx.Client
) -> None:
    task = platform.get(f"{bridge.api}/Task/{routed_case['task']['id']}").json()
    assert owner(task) != "cardio-fr-1"
    with bridge.client("reviewer-cardio-fr-1") as stranger:  # a reviewer the case is not assigned to: not theirs
        answer = op(stranger, bridge, task["id"], "decline", reviewer="cardio-fr-1")
        assert answer.status_code == 404 and answer.json()["resourceType"] == "OperationOutcome"
    with bridge.client(bridge.reviewer_of(task)) as assigned:  # the reviewer comes from the token, not the body
        answer = op(assigned, bridge, task["id"], "decline", reviewer="cardio-fr-1")
        assert answer.status_code == 403 and answer.json()["resourceType"] == "OperationOutcome"
    answer = op(platform, bridge, task["id"], "decline")  # the requesting platform is no reviewer
    assert answer.status_code == 403 and answer.json()["resourceType"] == "OperationOutcome"
    assert platform.get(f"{bridge.api}/Task/{task['id']}").json()["meta"] == task["meta"]  # nothing changed


def test_a_request_for_documents_holds_the_case_and_a_refresh_brings_it_back(
    bridge: Bridge, routed_case: dict[str, Any], platform: httpx.Client
) -> None:
    task = platform.get(f"{bridge.api}/Task/{routed_case['task']['id']}").json()
    reviewer = owner(task)
    text = "Merci de joindre le compte rendu de TEP le plus récent"
    with bridge.client(bridge.reviewer_of(task)) as assigned:
        held = op(assigned, bridge, task["id"], "request-documents", reviewer=reviewer, text=text)
        assert held.status_code == 200, held.text
        assert op(assigned, bridge, task["id"], "refresh").status_code == 403  # a reviewer asks, it can not pull
    held_task = held.json()
    assert held_task["status"] == "on-hold"
    assert held_task["businessStatus"]["coding"][0]["code"] == "waiting-for-documents"
    assert held_task["statusReason"]["text"] == text and held_task["note"][-1]["text"] == text
    refreshed = op(platform, bridge, task["id"], "refresh")  # the requesting platform, once it has added them
    assert refreshed.status_code == 200 and refreshed.json()["status"] == "in-progress"
    back = wait_task(platform, bridge.api, routed_case["sr"]["id"])
    assert back["status"] == "ready" and owner(back) == reviewer  # the reviewer who asked keeps the case
    bundles = [o for o in back["output"] if o["type"]["coding"][0]["code"] == "case-bundle"]
    assert len(bundles) == 1 and bundles[0]["valueReference"] != task["output"][0]["valueReference"]


def test_operations_refuse_what_does_not_fit(
    bridge: Bridge, routed_case: dict[str, Any], platform: httpx.Client
) -> None:
    task = platform.get(f"{bridge.api}/Task/{routed_case['task']['id']}").json()
    with bridge.client(bridge.reviewer_of(task)) as assigned:
        assert op(assigned, bridge, task["id"], "request-documents").status_code == 400  # text missing
        assert op(assigned, bridge, task["id"], "request-documents", reviewer="x", text="t").status_code == 403
        wrong = post(assigned, bridge.api, f"Task/{task['id']}/$decline", {"resourceType": "Patient"})
        assert wrong.status_code == 400
    assert op(platform, bridge, "no-such-task", "refresh").status_code == 404
    assert platform.get(f"{bridge.api}/Task/{task['id']}").json()["meta"] == task["meta"]  # nothing changed


def test_metrics_show_cases_and_the_queue(bridge: Bridge, routed_case: dict[str, Any]) -> None:
    text = httpx.get(bridge.api.removesuffix("/fhir") + "/metrics").text
    assert 'fhir_bridge_cases_open{status="ready"}' in text
    assert "fhir_bridge_jobs_waiting" in text and "fhir_bridge_cases_overdue" in text


def test_a_tumor_board_case_goes_to_a_panel_covering_its_disciplines(
    bridge: Bridge, sandbox: Sandbox, platform: httpx.Client
) -> None:
    patient = sandbox.world()["patients"][0]
    body = second_opinion_request(patient, "BOARD-1")
    body["code"]["coding"][0]["code"] = "tumor-board-opinion"
    answer = post(platform, bridge.api, "ServiceRequest", body)
    assert answer.status_code == 201, answer.text
    task = wait_task(platform, bridge.api, answer.json()["id"])
    assert task["status"] == "ready", task.get("statusReason")
    assert task["owner"]["reference"].startswith("CareTeam/")
    panel = REGISTRY.panels[owner(task)]
    assert "oncology" in panel.specialties
    covered = set().union(*(REGISTRY.reviewers[m].disciplines for m in panel.members))
    assert panel.required <= covered
    # every member of the panel finds the case by searching Task; a reviewer outside it does not
    for member in panel.members:
        with bridge.client(f"reviewer-{member}") as reviewer:
            mine = reviewer.get(f"{bridge.api}/Task", params={"_count": "100"}).raise_for_status().json()
            assert task["id"] in [e["resource"]["id"] for e in mine.get("entry", [])], member
    outsider = next(r for r in sorted(REGISTRY.reviewers) if r not in panel.members)
    with bridge.client(f"reviewer-{outsider}") as reviewer:
        assert reviewer.get(f"{bridge.api}/Task/{task['id']}").status_code == 404

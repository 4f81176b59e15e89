"""Routing a ready case (fhir_bridge.review.routing) over the reviewer registry of config/reviewers.json: specialty,
language, load and deadline, declines, tumor-board panels."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_bridge.adapters.reference_data import load_deadline_policy, load_registry
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import validate
from fhir_bridge.review.reviewers import CAPACITY, SPECIALTY, ReviewerRegistry
from fhir_bridge.review.routing import Assignment, RoutingRequest, load_from_tasks, route
from tests.reference import REGISTRY_FILE

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
REGISTRY = load_registry()
SPECIALTIES = ["oncology", "neurology", "cardiology", "rare-disease", "device", "medication-review"]


def ask(specialty: str, language: str | None = "fr", kind: str = "second-opinion", **kwargs: Any) -> RoutingRequest:
    return RoutingRequest(specialty=specialty, kind=kind, language=language, **kwargs)


def assign(request: RoutingRequest, load: dict[str, int] | None = None, registry: ReviewerRegistry = REGISTRY,
           **kwargs: Any) -> Assignment | None:
    return route(request, registry, load or {}, now=kwargs.pop("now", NOW), **kwargs)


def test_the_registry_is_valid_r4_and_covers_every_specialty() -> None:
    bundle = json.loads(REGISTRY_FILE.read_text("utf-8"))
    validate(bundle)
    assert bundle["type"] == "collection"
    for specialty in SPECIALTIES:
        assert assign(ask(specialty)) is not None, specialty
    assert len(REGISTRY.panels) == 3
    assert all(panel.coordinator in panel.members for panel in REGISTRY.panels.values())


def test_specialty_and_language_are_respected() -> None:
    french = assign(ask("oncology", "fr"))
    german = assign(ask("oncology", "de"))
    assert french is not None and german is not None
    assert (french.kind, french.id, french.owner_reference) == ("reviewer", "onco-fr-1", "PractitionerRole/onco-fr-1")
    assert french.display == "Dr Claire Martin" and french.members == ["PractitionerRole/onco-fr-1"]
    assert german.id == "onco-de-1"
    assert assign(ask("oncology", "fr-FR")) == french  # a BCP 47 tag with a region is the same language
    cardio = assign(ask("cardiology", "en"))
    assert cardio is not None and cardio.id == "cardio-fr-1"


def test_nobody_speaking_the_language_falls_back_unless_the_language_is_strict() -> None:
    fallback = assign(ask("medication-review", "it"))
    assert fallback is not None and fallback.id == "pharm-fr-1"
    assert assign(ask("medication-review", "it", strict_language=True)) is None


def test_a_busy_speaker_does_not_hold_the_case_when_another_reviewer_has_room() -> None:
    chosen = assign(ask("oncology", "fr"), {"onco-fr-1": 5})
    assert chosen is not None and chosen.id == "onco-de-1"


def test_reviewers_who_only_sit_on_panels_never_get_single_cases() -> None:
    full = {"onco-fr-1": 5, "onco-de-1": 4}
    assert assign(ask("oncology"), full) is None  # radiologist, pathologist, surgeon... are panel-only


def test_load_is_spread_relative_to_capacity_until_everyone_is_full() -> None:
    load: dict[str, int] = {}
    order = []
    while (chosen := assign(ask("oncology", "en"), load)) is not None:
        order.append(chosen.id)
        load[chosen.id] = load.get(chosen.id, 0) + 1
        assert len(order) < 20
    assert load == {"onco-fr-1": 5, "onco-de-1": 4}  # capacity is never exceeded
    # a tie goes to the smaller id; then whoever is less loaded relative to capacity (1/5 < 1/4, then 1/4 < 2/5)
    assert order[:4] == ["onco-de-1", "onco-fr-1", "onco-fr-1", "onco-de-1"]


def test_a_declined_case_is_routed_to_someone_else_and_never_back() -> None:
    first = assign(ask("neurology", "fr"))
    assert first is not None and first.id == "neuro-ch-1"  # 0/2 and 0/4 tie on load: id order
    second = assign(ask("neurology", "fr", excluded=frozenset({first.id})))
    assert second is not None and second.id == "neuro-fr-1"
    assert assign(ask("neurology", "fr", excluded=frozenset({"neuro-ch-1", "neuro-fr-1", "onco-de-1"}))) is None


def test_a_reviewer_on_holiday_gets_nothing() -> None:
    in_august = datetime(2026, 8, 10, 9, 0, tzinfo=UTC)
    chosen = assign(ask("neurology", "fr"), {"neuro-ch-1": 1}, now=in_august)
    assert chosen is not None and chosen.id != "neuro-fr-1"
    assert assign(ask("neurology", "fr"), {"neuro-ch-1": 1}) == Assignment(
        "reviewer", "neuro-fr-1", "PractitionerRole/neuro-fr-1", "Dr Julie Moreau", ["PractitionerRole/neuro-fr-1"])


def test_the_requester_can_restrict_countries() -> None:
    swiss = assign(ask("neurology", "fr", countries=frozenset({"CH"})), {"neuro-ch-1": 1})
    assert swiss is not None and swiss.id == "neuro-ch-1"
    assert assign(ask("neurology", "fr", countries=frozenset({"IT"}))) is None


def test_a_near_deadline_prefers_the_reviewer_with_most_spare_places(tmp_path: Path) -> None:
    registry = load_registry(registry_file(tmp_path, [("small", 2), ("large", 10)]))
    load = {"small": 0, "large": 1}
    relaxed = assign(ask("oncology", deadline=NOW + timedelta(days=2)), load, registry)
    hurried = assign(ask("oncology", deadline=NOW + timedelta(hours=6)), load, registry)
    assert relaxed is not None and relaxed.id == "small"  # 0/2 beats 1/10
    assert hurried is not None and hurried.id == "large"  # 9 spare places beat 2
    policy = load_deadline_policy()
    assert assign(ask("oncology", deadline=NOW + timedelta(hours=30)), load, registry,
                  near=policy.near + timedelta(hours=12)) == hurried


def test_a_tumor_board_case_gets_a_panel_covering_its_disciplines() -> None:
    panel = assign(ask("oncology", kind="tumor-board-opinion"))
    assert panel is not None and (panel.kind, panel.id, panel.owner_reference) == (
        "panel", "rcp-thoracic", "CareTeam/rcp-thoracic")
    covered = {d for m in panel.members for d in REGISTRY.reviewers[m.split("/")[1]].disciplines}
    assert REGISTRY.panels["rcp-thoracic"].required <= covered
    assert {"oncologist", "radiologist", "pathologist", "surgeon", "radiotherapist"} <= covered
    neuro = assign(ask("neurology", kind="tumor-board-opinion"))
    assert neuro is not None and neuro.id == "rcp-neuro-oncology"


def test_a_panel_with_a_member_at_capacity_or_a_missing_discipline_is_not_chosen() -> None:
    assert assign(ask("oncology", kind="tumor-board-opinion"), {"surg-fr-1": 3}) is None
    assert assign(ask("oncology", kind="tumor-board-opinion", disciplines=frozenset({"geneticist"}))) is None
    assert assign(ask("oncology", kind="tumor-board-opinion", excluded=frozenset({"rcp-thoracic"}))) is None


def test_a_panel_loses_a_required_discipline_when_its_member_leaves(tmp_path: Path) -> None:
    bundle = json.loads(REGISTRY_FILE.read_text("utf-8"))
    team = next(e["resource"] for e in bundle["entry"] if e["resource"].get("id") == "rcp-thoracic")
    team["participant"] = [p for p in team["participant"] if p["member"]["reference"] != "PractitionerRole/surg-fr-1"]
    path = tmp_path / "reviewers.json"
    path.write_text(json.dumps(bundle), "utf-8")
    assert assign(ask("oncology", kind="tumor-board-opinion"), registry=load_registry(path)) is None


def test_nobody_can_take_it() -> None:
    everyone_full = {r.id: r.capacity for r in REGISTRY.reviewers.values()}
    for specialty in SPECIALTIES:
        assert assign(ask(specialty), everyone_full) is None
        assert assign(ask(specialty, kind="tumor-board-opinion"), everyone_full) is None
    assert assign(ask("dermatology")) is None


@settings(max_examples=300, deadline=None)
@given(
    loads=st.dictionaries(st.sampled_from(sorted(REGISTRY.reviewers)), st.integers(0, 10)),
    specialty=st.sampled_from([*SPECIALTIES, "dermatology"]),
    kind=st.sampled_from(["second-opinion", "tumor-board-opinion"]),
    language=st.sampled_from([None, "fr", "en", "de", "nl", "es", "it"]),
    excluded=st.frozensets(st.sampled_from(sorted([*REGISTRY.reviewers, *REGISTRY.panels]))),
    hours_left=st.one_of(st.none(), st.integers(-5, 100)),
)
def test_no_reviewer_ever_gets_a_case_outside_their_specialty_or_over_capacity(
        loads: dict[str, int], specialty: str, kind: str, language: str | None, excluded: frozenset[str],
        hours_left: int | None) -> None:
    deadline = None if hours_left is None else NOW + timedelta(hours=hours_left)
    request = RoutingRequest(specialty, kind, language, deadline, excluded)
    chosen = route(request, REGISTRY, loads, now=NOW)
    if chosen is None:
        if kind == "second-opinion":  # nobody was eligible
            assert not [r for r in REGISTRY.reviewers.values()
                        if specialty in r.specialties and kind in r.kinds and r.id not in excluded
                        and loads.get(r.id, 0) < r.capacity and r.available(NOW)]
        return
    assert chosen.id not in excluded
    for member in chosen.members:
        reviewer = REGISTRY.reviewers[member.removeprefix("PractitionerRole/")]
        assert specialty in reviewer.specialties
        assert loads.get(reviewer.id, 0) < reviewer.capacity
    if chosen.kind == "panel":
        panel = REGISTRY.panels[chosen.id]
        assert kind == "tumor-board-opinion" and specialty in panel.specialties
        assert panel.required <= {d for m in chosen.members
                                  for d in REGISTRY.reviewers[m.removeprefix("PractitionerRole/")].disciplines}


def test_open_tasks_make_the_load_and_a_panel_case_counts_for_each_member() -> None:
    tasks: list[dict[str, Any]] = [
        {"resourceType": "Task", "status": "in-progress", "owner": {"reference": "PractitionerRole/onco-fr-1"}},
        {"resourceType": "Task", "status": "ready", "owner": {"reference": "CareTeam/rcp-thoracic"}},
        {"resourceType": "Task", "status": "completed", "owner": {"reference": "PractitionerRole/onco-fr-1"}},
        {"resourceType": "Task", "status": "requested"},
    ]
    assert load_from_tasks(tasks, REGISTRY) == {"onco-fr-1": 2, "radio-fr-1": 1, "path-fr-1": 1, "surg-fr-1": 1,
                                                "rt-be-1": 1}


# -- a broken registry is refused at start-up ----------------------------------------------------------------


def registry_file(tmp_path: Path, roles: list[tuple[str, int]]) -> Path:
    """A small registry of oncology reviewers speaking French, with the given capacities."""
    entries = []
    for rid, capacity in roles:
        entries.append({"fullUrl": f"https://fhir-bridge.dev/fhir/Practitioner/p-{rid}", "resource": {
            "resourceType": "Practitioner", "id": f"p-{rid}", "name": [{"family": rid}],
            "communication": [{"coding": [{"system": "urn:ietf:bcp:47", "code": "fr"}]}]}})
        entries.append({"fullUrl": f"https://fhir-bridge.dev/fhir/PractitionerRole/{rid}", "resource": {
            "resourceType": "PractitionerRole", "id": rid, "extension": [{"url": CAPACITY, "valueInteger": capacity}],
            "practitioner": {"reference": f"Practitioner/p-{rid}"},
            "code": [{"coding": [{"system": "https://fhir-bridge.dev/fhir/CodeSystem/case-codes",
                                  "code": "second-opinion"}]}],
            "specialty": [{"coding": [{"system": SPECIALTY, "code": "oncology"}]}]}})
    path = tmp_path / "reviewers.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}), "utf-8")
    return path


def _break(bundle: dict[str, Any], rid: str, change: dict[str, Any]) -> dict[str, Any]:
    broken = copy.deepcopy(bundle)
    next(e["resource"] for e in broken["entry"] if e["resource"]["id"] == rid).update(change)
    return broken


@pytest.mark.parametrize(("rid", "change", "message"), [
    ("onco-fr-1", {"extension": []}, "reviewer-capacity"),
    ("onco-fr-1", {"practitioner": {"reference": "Practitioner/nobody"}}, "does not resolve"),
    ("onco-fr-1", {"specialty": []}, "specialty"),
    ("onco-fr-1", {"period": {"start": "tomorrow"}}, "not valid R4"),
    ("rcp-thoracic", {"participant": [{"member": {"reference": "PractitionerRole/ghost"}}]}, "does not resolve"),
    ("rcp-thoracic", {"participant": [{"member": {"reference": "PractitionerRole/pharm-fr-1"}}]},
     "outside their specialty"),
    ("rcp-thoracic", {"participant": [
        {"role": [{"coding": [{"system": "https://fhir-bridge.dev/fhir/CodeSystem/panel-role",
                               "code": "coordinator"}]}],
         "member": {"reference": f"PractitionerRole/{rid}"}} for rid in ("onco-fr-1", "radio-fr-1")]},
     "at most one coordinator"),
    ("rcp-thoracic", {"participant": [{"member": {"reference": "PractitionerRole/onco-fr-1"}}]}, "needs a coordinator"),
    ("rcp-thoracic", {"extension": [{"url": "https://fhir-bridge.dev/fhir/StructureDefinition/consensus-method",
                                     "valueCoding": {"code": "coin-toss"}}]}, "consensus-method"),
])
def test_a_broken_registry_is_refused_with_a_clear_error(tmp_path: Path, rid: str, change: dict[str, Any],
                                                        message: str) -> None:
    bundle = json.loads(REGISTRY_FILE.read_text("utf-8"))
    path = tmp_path / "reviewers.json"
    path.write_text(json.dumps(_break(bundle, rid, change)), "utf-8")
    with pytest.raises(InvalidInput, match=message) as caught:
        load_registry(path)
    assert "reviewers.json" in str(caught.value)


def test_a_registry_that_is_not_a_collection_bundle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "reviewers.json"
    for text in ("{not json", json.dumps({"resourceType": "Bundle", "type": "searchset"})):
        path.write_text(text, "utf-8")
        with pytest.raises(InvalidInput, match=r"reviewers\.json"):
            load_registry(path)

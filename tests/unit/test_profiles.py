"""Our profiles (issue 10, item 1): published with snapshots, rebased on demand, and enforced by profile_check."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_profiles, load_terminology
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.errors import BusinessRuleViolation
from fhir_bridge.fhir.profile_check import check, conform, describe
from fhir_bridge.fhir.profiles import Profiles, declare_profile
from fhir_bridge.fhir.resources import validate
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology
from tests.reference import PROFILES_DIR

INS = {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "295109912611193"}
CASES = f"{CANONICAL_BASE}/CodeSystem/case-codes"
CHAIN = f"{CANONICAL_BASE}/StructureDefinition/audit-chain"
EMITTED = {"ServiceRequest", "Task", "Bundle", "Composition", "DiagnosticReport", "AuditEvent"}


def builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("profiles_build", PROFILES_DIR / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def profiles() -> Profiles:
    return load_profiles()


@pytest.fixture(scope="module")
def terminology() -> Terminology:
    return load_terminology()


def request() -> dict[str, Any]:
    return second_opinion_request({"identifier": INS}, "REQ-1") | {"authoredOn": "2026-11-20T10:00:00Z"}


def task(status: str = "ready", outputs: tuple[str, ...] = ("case-bundle",)) -> dict[str, Any]:
    return {
        "resourceType": "Task", "status": status, "intent": "order",
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": "ServiceRequest/1"}, "for": {"identifier": INS},
        "authoredOn": "2026-11-20T10:00:00Z",
        "businessStatus": {"coding": [{"system": CASES, "code": "triaged-ready"}]},
        "output": [{"type": {"coding": [{"system": f"{CANONICAL_BASE}/CodeSystem/task-output", "code": code}]},
                    "valueReference": {"reference": f"Bundle/{n}"}} for n, code in enumerate(outputs)],
    }


def bundle(first: str = "Composition") -> dict[str, Any]:
    composition = {
        "resourceType": "Composition", "status": "final", "date": "2026-11-20T10:00:00Z", "title": "Dossier",
        "type": {"coding": [{"system": CASES, "code": "case-package"}]},
        "subject": {"reference": "urn:uuid:p"}, "author": [{"display": "fhir-bridge"}],
        "section": [{"title": "Pathologie", "entry": [{"reference": "urn:uuid:p"}],
                     "code": {"coding": [{"system": f"{CANONICAL_BASE}/CodeSystem/case-section",
                                          "code": "pathology"}]}}],
    }
    patient = {"resourceType": "Patient", "identifier": [INS]}
    entries = [("urn:uuid:c", composition), ("urn:uuid:p", patient)]
    if first != "Composition":
        entries.reverse()
    return {"resourceType": "Bundle", "type": "document", "timestamp": "2026-11-20T10:00:00Z",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:b"},
            "entry": [{"fullUrl": url, "resource": r} for url, r in entries]}


def audit_event(links: tuple[str, ...] = ("seq", "prev", "hash")) -> dict[str, Any]:
    who = {"identifier": {"value": "fhir-bridge"}}
    return {
        "resourceType": "AuditEvent", "recorded": "2026-11-20T10:00:00Z", "outcome": "0", "action": "U",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "subtype": [{"system": CASES, "code": "collecting"}],
        "agent": [{"requestor": True, "who": who}], "source": {"observer": who},
        "entity": [{"what": {"reference": "Task/1"}}],
        "extension": [{"url": CHAIN, "extension": [{"url": u, "valueString": "1"} for u in links]}],
    }


def rendered(report: dict[str, Any]) -> dict[str, Any]:
    """A final opinion as the bridge stores it: with its four renderings (sor-6)."""
    forms = [{"contentType": kind, "language": lang, "data": "PGgxPng8L2gxPg==", "size": 11,
              "hash": "Lve95gjOVATpfV8EL5X4nxwjKHE="}
             for lang in ("fr", "en") for kind in ("text/html", "application/pdf")]
    return report | {"presentedForm": forms}


def examples() -> list[dict[str, Any]]:
    report = rendered(reviewer_opinion("1", {"identifier": INS}) | {"issued": "2026-11-20T10:00:00Z"})
    return [request(), task(), bundle(), bundle()["entry"][0]["resource"], report, audit_event()]


def test_published_profiles_are_r4_constraints_named_by_their_id(profiles: Profiles) -> None:
    files = sorted(PROFILES_DIR.glob("*.json"))
    assert {p.stem for p in files} == {p["id"] for p in profiles.by_url.values()}
    for path in files:
        profile = json.loads(path.read_text(encoding="utf-8"))
        validate(profile)
        assert profile["url"] == f"{CANONICAL_BASE}/StructureDefinition/{path.stem}"
        assert profile["derivation"] == "constraint" and profile["fhirVersion"] == "4.0.1"
        assert profile["snapshot"]["element"][0]["path"] == profile["type"]
    assert set(profiles.by_type) == EMITTED


def test_committed_snapshots_are_what_the_build_makes() -> None:
    build = builder()
    for source in sorted((PROFILES_DIR / "differential").glob("*.json")):
        built = build.build_snapshot(json.loads(source.read_text(encoding="utf-8")))
        assert built == json.loads((PROFILES_DIR / source.name).read_text(encoding="utf-8")), \
            f"{source.name}: run profiles/build.py"


def test_a_snapshot_lists_the_base_elements_with_our_constraints_merged(profiles: Profiles) -> None:
    elements = {e["path"]: e for e in profiles.by_type["Task"]["snapshot"]["element"]}
    # base R4 elements we do not constrain are all there, from the model, in R4 order
    assert elements["Task.priority"]["min"] == 0 and elements["Task.restriction.period"]["type"] == [{"code": "Period"}]
    # ours: Task.for unrolled into Reference's children to require its identifier
    assert elements["Task.for.identifier"]["min"] == 1 and elements["Task.for.identifier"]["base"]["min"] == 0
    assert elements["Task.output.value[x]"]["type"] == [{"code": "Reference"}]
    paths = list(elements)
    assert paths.index("Task.status") < paths.index("Task.businessStatus") < paths.index("Task.output")
    composition = {e["path"]: e for e in profiles.by_type["Composition"]["snapshot"]["element"]}
    assert composition["Composition.section.section"]["contentReference"] == "#Composition.section"


def test_the_canonical_base_is_configurable(tmp_path: Path) -> None:
    moved = load_profiles(base="https://fhir.example.org/bridge")
    task_profile = moved.by_type["Task"]
    assert task_profile["url"] == "https://fhir.example.org/bridge/StructureDefinition/case-task"
    focus = next(e for e in task_profile["snapshot"]["element"] if e["path"] == "Task.focus")
    assert focus["type"][0]["targetProfile"] == [
        "https://fhir.example.org/bridge/StructureDefinition/second-opinion-request"]
    assert declare_profile(task(), moved)["meta"]["profile"] == [task_profile["url"]]


def test_declare_profile_claims_our_profile_once_and_keeps_the_rest(profiles: Profiles) -> None:
    resource = task() | {"meta": {"versionId": "2", "profile": ["http://example.org/other"]}}
    declared = declare_profile(declare_profile(resource, profiles), profiles)
    assert declared["meta"] == {"versionId": "2", "profile": ["http://example.org/other",
                                                              f"{CANONICAL_BASE}/StructureDefinition/case-task"]}
    assert "meta" not in task()  # a copy: the resource given is left alone
    assert declare_profile({"resourceType": "Patient"}, profiles) == {"resourceType": "Patient"}


def test_every_example_of_what_we_emit_conforms(profiles: Profiles, terminology: Terminology) -> None:
    for resource in examples():
        validate(resource)
        issues = check(resource, profiles.by_type[resource["resourceType"]], terminology, profiles)
        assert issues == [], describe(issues)


def broken(resource: dict[str, Any], change: Any) -> dict[str, Any]:
    copied = copy.deepcopy(resource)
    change(copied)
    return copied


@pytest.mark.parametrize(("resource", "expected"), [
    (broken(request(), lambda r: r["subject"].pop("identifier")), "ServiceRequest.subject.identifier: at least 1"),
    (broken(request(), lambda r: r.update(intent="plan")), "ServiceRequest.intent: must be the fixed value"),
    (broken(request(), lambda r: r["category"][0]["coding"][0].update(code="astrology")),
     "ServiceRequest.category: no code from the required value set"),
    (broken(request(), lambda r: (r.pop("reasonCode", None), r.pop("note", None))), "sor-1"),
    (broken(task(), lambda r: r["code"]["coding"][0].update(code="approve")), "Task.code: does not hold"),
    (task(outputs=("triage",)), "ctk-1"),
    (task(status="completed", outputs=("case-bundle",)), "ctk-2"),
    (broken(task(), lambda r: r.pop("focus")), "Task.focus: at least 1"),
    (bundle(first="Patient"), "cbd-1"),
    (broken(bundle(), lambda r: r.update(type="collection")), "Bundle.type: must be the fixed value"),
    (broken(bundle(), lambda r: r["entry"][0].update(request={"method": "POST", "url": "Composition"})),
     "Bundle.entry.request: at most 0"),
    (audit_event(links=("seq", "hash")), "ach-1"),
    (broken(audit_event(), lambda r: r.pop("extension")), "bae-1"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_what_breaks_a_profile_is_named_without_values(
    resource: dict[str, Any], expected: str, profiles: Profiles, terminology: Terminology
) -> None:
    with pytest.raises(BusinessRuleViolation) as raised:
        conform(resource, profiles, terminology)
    assert expected in raised.value.message
    assert INS["value"] not in raised.value.message and "astrology" not in raised.value.message


def test_a_composition_is_checked_against_its_own_profile(profiles: Profiles, terminology: Terminology) -> None:
    composition = broken(bundle()["entry"][0]["resource"],
                         lambda r: r["section"][0]["code"]["coding"][0].update(code="horoscope"))
    issues = check(composition, profiles.by_type["Composition"], terminology, profiles)
    assert [i.path for i in issues] == ["Composition.section.code"]


def test_a_warning_invariant_is_reported_not_refused(profiles: Profiles, terminology: Terminology) -> None:
    silent = reviewer_opinion("1", {"identifier": INS}) | {"issued": "2026-11-20T10:00:00Z", "status": "preliminary"}
    silent.pop("conclusion")
    warnings = conform(silent, profiles, terminology)
    assert [(w.severity, w.message.split(":")[0]) for w in warnings] == [("warning", "sor-3")]


def test_a_final_opinion_without_its_position_or_renderings_does_not_conform(profiles: Profiles,
                                                                              terminology: Terminology) -> None:
    final = rendered(reviewer_opinion("1", {"identifier": INS}) | {"issued": "2026-11-20T10:00:00Z"})
    assert conform(final, profiles, terminology) == []
    no_position = broken(final, lambda r: (r.pop("contained"), r.pop("result")))
    no_forms = broken(final, lambda r: r.pop("presentedForm"))
    foreign_item = broken(final, lambda r: r["contained"][0]["code"]["coding"][0].update(system="http://x.org"))
    for bad, key in ((no_position, "sor-5"), (no_forms, "sor-6"), (foreign_item, "sor-4")):
        with pytest.raises(BusinessRuleViolation, match=key):
            conform(bad, profiles, terminology)


def test_a_declared_profile_is_the_one_checked(profiles: Profiles, terminology: Terminology) -> None:
    declared = declare_profile(task(), profiles)
    assert conform(declared, profiles, terminology) == []
    foreign = task() | {"meta": {"profile": ["http://example.org/not-ours"]}}
    assert conform(foreign, profiles, terminology) == []  # falls back to our profile of the type


def test_the_capability_statement_names_our_profile_of_every_type_served(profiles: Profiles) -> None:
    from fhir_bridge.api.capability import capability_statement

    statement = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z", profiles)
    validate(statement)
    declared = {r["type"]: r.get("supportedProfile") for r in statement["rest"][0]["resource"]}
    assert declared == {t: [profiles.by_type[t]["url"]] for t in declared}
    moved = load_profiles(base="https://fhir.example.org/bridge")
    rebased = capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z", moved)
    assert rebased["rest"][0]["resource"][0]["supportedProfile"][0].startswith("https://fhir.example.org/bridge/")

"""mappings/ is data we publish: every FHIR file is valid R4 and named by its id (issue 10, item 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_terminology
from fhir_bridge.fhir.resources import validate
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from tests.reference import MAPPINGS_DIR

FHIR_TYPES = {"CodeSystem", "ValueSet", "ConceptMap"}
#: our own formats kept next to the FHIR files (each documents itself in its description)
NOT_FHIR = {"triage-rules.json"}


def mapping_files() -> list[Path]:
    return sorted(MAPPINGS_DIR.glob("*.json"))


def read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def our_code_systems() -> dict[str, set[str]]:
    """url → codes of every CodeSystem in mappings/ (hierarchies flattened)."""
    def codes(concepts: list[dict[str, Any]]) -> set[str]:
        return {c["code"] for c in concepts} | {x for c in concepts for x in codes(c.get("concept", []))}

    return {r["url"]: codes(r.get("concept", [])) for p in mapping_files()
            if (r := read(p)).get("resourceType") == "CodeSystem"}


def test_every_file_in_mappings_is_fhir_or_a_known_format_of_ours() -> None:
    for path in mapping_files():
        kind = read(path).get("resourceType")
        assert kind in FHIR_TYPES or path.name in NOT_FHIR, f"{path.name}: resourceType {kind!r}"
    assert {p.name for p in mapping_files()} >= {"document-type-to-case-section.json", "never-forward-labels.json"}


@pytest.mark.parametrize("path", [p for p in mapping_files() if p.name not in NOT_FHIR], ids=lambda p: p.stem)
def test_mapping_file_is_valid_r4_and_its_id_is_its_file_name(path: Path) -> None:
    resource = read(path)
    validate(resource)
    assert resource["id"] == path.stem
    assert resource["url"] == f"{CANONICAL_BASE}/{resource['resourceType']}/{path.stem}"
    assert resource["status"] in ("draft", "active") and resource.get("version")


def test_concept_maps_map_only_to_codes_our_code_systems_define() -> None:
    systems = our_code_systems()
    for path in mapping_files():
        resource = read(path)
        if resource.get("resourceType") != "ConceptMap":
            continue
        for group in resource["group"]:
            for system, codes in ((group.get("source"), [e["code"] for e in group["element"]]),
                                  (group.get("target"), [t["code"] for e in group["element"]
                                                         for t in e.get("target", [])])):
                if system in systems:
                    assert set(codes) <= systems[system], f"{path.name}: unknown codes in {system}"
            unmapped = group.get("unmapped") or {}
            if unmapped.get("mode") == "fixed" and group.get("target") in systems:
                assert unmapped["code"] in systems[group["target"]]


def test_value_sets_include_only_codes_our_code_systems_define() -> None:
    systems = our_code_systems()
    for path in mapping_files():
        resource = read(path)
        if resource.get("resourceType") != "ValueSet":
            continue
        for include in resource.get("compose", {}).get("include", []):
            if include.get("system") in systems:
                assert {c["code"] for c in include.get("concept", [])} <= systems[include["system"]], path.name


def test_the_terminology_loader_reads_every_file_by_id() -> None:
    terminology = load_terminology()
    assert set(terminology.resources) == {p.stem for p in mapping_files()}
    assert terminology.section_for([{"system": "http://loinc.org", "code": "60568-3"}]) == "pathology"


def test_code_systems_mirroring_code_say_the_same_codes() -> None:
    from fhir_bridge.case.selection import REASONS
    from fhir_bridge.workflow.taskbook import EDIT_STEP

    systems = our_code_systems()
    assert systems[f"{CANONICAL_BASE}/CodeSystem/left-out-reason"] == set(REASONS)
    states = {c["code"] for c in read(MAPPINGS_DIR / "case-states.json")["compose"]["include"][0]["concept"]}
    assert states <= systems[f"{CANONICAL_BASE}/CodeSystem/case-codes"]
    assert systems[f"{CANONICAL_BASE}/CodeSystem/audit-event"] == states | {EDIT_STEP, "delivery"}


def test_the_specialty_to_documents_concept_map_is_the_triage_rules_in_fhir_form() -> None:
    from fhir_bridge.fhir.terminology import REQUIRED_DOCUMENTS_MAP, required_documents_map

    rules = read(MAPPINGS_DIR / "triage-rules.json")
    published = read(MAPPINGS_DIR / f"{REQUIRED_DOCUMENTS_MAP}.json")
    assert published == required_documents_map(rules, published["version"]), \
        "triage-rules.json changed: rewrite the ConceptMap with fhir_bridge.fhir.terminology.required_documents_map"
    oncology = next(e for e in published["group"][0]["element"] if e["code"] == "oncology")
    pathology = [t for t in oncology["target"] if t["dependsOn"][0]["value"] == "tumor-board-opinion"
                 and {"property": f"{published['url']}#group", "value": "pathology"} in t["product"]]
    assert {t["code"] for t in pathology} == {"60568-3", "11526-1"}  # either pathology code satisfies the group

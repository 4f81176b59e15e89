"""Terminology as data: the ConceptMaps, ValueSets and CodeSystems in ``mappings/``.

Code lists change (the French JDV_J07 list is reissued every year), so nothing here hard-codes a code:
the files are read once at start-up by :mod:`fhir_bridge.adapters.reference_data` (the core opens no file, so
where they live is the deployment's choice) and handed here parsed, each checked to be a JSON resource whose
``id`` is its file name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir_bridge.errors import InvalidInput

CANONICAL_BASE = "https://fhir-bridge.dev/fhir"
CASE_CODES = f"{CANONICAL_BASE}/CodeSystem/case-codes"
CASE_SECTION = f"{CANONICAL_BASE}/CodeSystem/case-section"

Coding = tuple[str, str]  # (system, code)


@dataclass(frozen=True)
class Terminology:
    """What the core needs from ``mappings/``: sections by document type, labels never forwarded, displays."""

    resources: dict[str, dict[str, Any]]
    section_by_type: dict[Coding, str] = field(default_factory=dict)
    section_default: str = "other-documents"
    never_forward: frozenset[Coding] = frozenset()
    displays: dict[Coding, dict[str, str]] = field(default_factory=dict)

    def section_for(self, codings: Iterable[dict[str, Any]]) -> str:
        """The case section of a document, from the first of its type codings that the ConceptMap maps."""
        for coding in codings:
            key = (str(coding.get("system", "")), str(coding.get("code", "")))
            if key in self.section_by_type:
                return self.section_by_type[key]
        return self.section_default

    def is_never_forwarded(self, labels: Iterable[dict[str, Any]]) -> bool:
        """True when a securityLabel coding is in the never-forward ValueSet (MASQUE_PS)."""
        return any((str(c.get("system", "")), str(c.get("code", ""))) in self.never_forward for c in labels)

    def display(self, system: str, code: str, language: str = "en") -> str:
        names = self.displays.get((system, code), {})
        return names.get(language) or names.get("en") or code


def terminology_from(files: Iterable[tuple[str, Any]]) -> Terminology:
    """Index what the core uses from the parsed ``mappings/*.json`` files, given as (file name, JSON) in file
    name order; each must be a resource whose ``id`` is its file name (so a renamed copy is not silently read
    as another code list)."""
    resources: dict[str, dict[str, Any]] = {}
    for name, resource in files:
        stem = name.removesuffix(".json")
        if not isinstance(resource, dict) or resource.get("id") != stem:
            raise InvalidInput(f"mappings file {name}: its id must be its file name ({stem})")
        resources[stem] = resource

    section_by_type: dict[Coding, str] = {}
    default = "other-documents"
    concept_map = resources.get("document-type-to-case-section", {})
    for group in concept_map.get("group", []):
        for element in group.get("element", []):
            targets = element.get("target") or []
            if targets:
                section_by_type[(group["source"], element["code"])] = targets[0]["code"]
        default = (group.get("unmapped") or {}).get("code", default)

    never: set[Coding] = set()
    for include in resources.get("never-forward-labels", {}).get("compose", {}).get("include", []):
        for concept in include.get("concept", []):
            never.add((include["system"], concept["code"]))

    displays: dict[Coding, dict[str, str]] = {}
    for resource in resources.values():
        if resource.get("resourceType") != "CodeSystem":
            continue
        for concept in _concepts(resource.get("concept", [])):
            names = {"en": concept.get("display", concept["code"])}
            for designation in concept.get("designation", []):
                names[designation.get("language", "")[:2]] = designation["value"]
            displays[(resource["url"], concept["code"])] = names

    return Terminology(
        resources=resources,
        section_by_type=section_by_type,
        section_default=default,
        never_forward=frozenset(never),
        displays=displays,
    )


def _concepts(concepts: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every concept of a CodeSystem, nested ones too (codesystem.html#hierarchy: ``concept.concept``)."""
    for concept in concepts:
        yield concept
        yield from _concepts(concept.get("concept", []))


REQUIRED_DOCUMENTS_MAP = "specialty-to-required-documents"


def required_documents_map(rules: dict[str, Any], version: str = "0.1.0") -> dict[str, Any]:
    """The FHIR form of ``triage-rules.json``'s document requirements: a ConceptMap from each specialty (the
    ServiceRequest.category) to the JDV_J07 document types a case needs (R4 conceptmap.html).

    ``triage-rules.json`` stays the one source the triage reads (it also carries ages, severities, imaging and
    consistency parameters a ConceptMap can not say); this map is derived from it, published in ``mappings/``
    for other systems, and a test keeps the committed file equal to this function's answer. Each target is one
    document type, ``relatedto``; ``dependsOn`` names the case kind; ``product`` the document group (any of
    its types satisfies it) and the severity when it is missing.
    """
    base = f"{CANONICAL_BASE}/ConceptMap/{REQUIRED_DOCUMENTS_MAP}"
    groups = rules.get("documentGroups", {})
    by_target: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rule in rules.get("rules", []):
        for requirement in rule.get("documents", []):
            group = requirement["group"]
            age = requirement.get("maxAgeDays")
            for doc_type in groups[group]["types"]:
                targets = by_target.setdefault(doc_type["system"], {}).setdefault(rule["specialty"], [])
                for kind in rule["kinds"]:
                    targets.append({
                        "code": doc_type["code"],
                        "equivalence": "relatedto",
                        "comment": f"{groups[group]['label']['en']}: {requirement['severityIfMissing']} if missing"
                                   + (f", at most {age} days old" if age is not None else ""),
                        "dependsOn": [{"property": f"{base}#kind", "system": CASE_CODES, "value": kind}],
                        "product": [{"property": f"{base}#group", "value": group},
                                    {"property": f"{base}#severity-if-missing",
                                     "value": requirement["severityIfMissing"]}],
                    })
    return {
        "resourceType": "ConceptMap",
        "id": REQUIRED_DOCUMENTS_MAP,
        "url": base,
        "version": version,
        "name": "SpecialtyToRequiredDocuments",
        "title": "Specialty → documents a second-opinion case needs",
        "status": "active",
        "experimental": False,
        "description": "Derived from mappings/triage-rules.json (fhir_bridge.fhir.terminology.required_documents_map; "
                       "edit the rules, not this file): for each specialty and kind of case, the JDV_J07 document "
                       "types the triage looks for. Types of one group (product 'group') stand in for each other.",
        "sourceCanonical": f"{CANONICAL_BASE}/ValueSet/specialties",
        "targetCanonical": "https://mos.esante.gouv.fr/NOS/JDV_J07-XdsTypeCode-CISIS/FHIR/JDV-J07-XdsTypeCode-CISIS",
        "group": [
            {"source": f"{CANONICAL_BASE}/CodeSystem/specialty", "target": system,
             "element": [{"code": specialty, "target": targets} for specialty, targets in specialties.items()]}
            for system, specialties in by_target.items()
        ],
    }

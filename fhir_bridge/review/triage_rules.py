"""Triage rules as data: which documents and imaging a reviewer needs, per specialty and kind of case.

Read once at start-up from ``mappings/triage-rules.json`` (its ``description`` documents the format) and
from any extra rule file in the same format, by :mod:`fhir_bridge.adapters.reference_data` (the core opens no
file), and checked here, so that adding a specialty, a kind of case or an accepted
document type is an edit of data, never of code (STYLE.md rule 7; the JDV_J07 list of document types is
reissued every year, STANDARDS.md §3). Everything is checked here, with the file and rule named in the
error, so that a typo fails at start-up rather than letting an incomplete case through.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import Resource

Coding = tuple[str, str]
Severity = Literal["blocking", "warning", "information"]
SEVERITIES: frozenset[str] = frozenset(get_args(Severity))
RULES_TYPE = "fhir-bridge-triage-rules"

#: the findings whose severity the rules' ``consistency.severity`` must give
CONSISTENCY_CODES = frozenset({
    "patient-mismatch", "patient-identity", "duplicate-document", "superseded-version", "future-dated",
    "imaging-without-report", "plan-predates-pathology", "attachment-unreadable", "no-triage-rules",
})


@dataclass(frozen=True)
class DocumentGroup:
    """Document types that stand in for each other (e.g. pathology 60568-3 or 11526-1)."""

    name: str
    label_fr: str
    label_en: str
    types: tuple[Coding, ...]

    def matches(self, doc: Resource) -> bool:
        codings = (doc.get("type") or {}).get("coding") or []
        return any((c.get("system"), c.get("code")) in self.types for c in codings if isinstance(c, dict))

    def codes(self, word: str) -> str:
        return f" {word} ".join(code for _, code in self.types)


@dataclass(frozen=True)
class DocumentRequirement:
    """A group the case needs, how recent its newest document must be, and how bad its absence is."""

    group: DocumentGroup
    max_age_days: int | None
    if_missing: Severity
    if_outdated: Severity


@dataclass(frozen=True)
class ImagingExpectation:
    """Imaging the reviewer expects: a study of any of ``modalities`` (DICOM DCM codes), recent enough."""

    name: str
    label_fr: str
    label_en: str
    modalities: frozenset[str]
    max_age_days: int | None
    if_missing: Severity
    if_outdated: Severity


@dataclass(frozen=True)
class CaseRule:
    """What one specialty needs for one kind of case (second-opinion or tumor-board-opinion)."""

    specialty: str
    kind: str
    documents: tuple[DocumentRequirement, ...]
    imaging: tuple[ImagingExpectation, ...]


@dataclass(frozen=True)
class ConsistencyRules:
    """The parameters of the checks every case gets, whatever its specialty."""

    severity: Mapping[str, Severity]
    imaging_report: DocumentGroup
    report_tolerance: timedelta
    pathology: DocumentGroup
    not_before_pathology: tuple[DocumentGroup, ...]
    unreadable_reasons: frozenset[str]


@dataclass(frozen=True)
class TriageRules:
    """Every (specialty, kind) rule and the consistency parameters, read once at start-up."""

    rules: Mapping[tuple[str, str], CaseRule]
    consistency: ConsistencyRules

    def rule_for(self, specialty: str, kind: str) -> CaseRule | None:
        return self.rules.get((specialty, kind))


def triage_rules_from(files: Iterable[tuple[str, Any]]) -> TriageRules:
    """The rules of the parsed rule files, given as (file name, JSON): ``triage-rules.json`` first, then each
    extra file, later files adding groups and rules or replacing a (specialty, kind) rule, so a new specialty
    is a new file, not new code."""
    raw_groups: dict[str, Any] = {}
    consistency: dict[str, Any] = {}
    raw_rules: dict[tuple[str, str], tuple[str, Any]] = {}
    for name, parsed in files:
        doc = _checked(name, parsed)
        raw_groups.update(_object(doc.get("documentGroups", {}), f"{name}: documentGroups"))
        more = _object(doc.get("consistency", {}), f"{name}: consistency")
        severity = {**consistency.get("severity", {}), **_object(more.get("severity", {}), f"{name}: severity")}
        consistency.update(more, severity=severity)
        mine: set[tuple[str, str]] = set()
        for i, rule in enumerate(doc.get("rules") or []):
            where = f"{name}: rules[{i}]"
            if (not isinstance(rule, dict) or not isinstance(rule.get("specialty"), str)
                    or not isinstance(rule.get("kinds"), list) or not rule["kinds"]
                    or not all(isinstance(x, dict) for x in [*_list(rule, "documents"), *_list(rule, "imaging")])):
                raise InvalidInput(f"triage rules {where}: specialty, kinds (a list), and documents and imaging "
                                   "(lists of objects) are required")
            for kind in rule["kinds"]:
                key = (rule["specialty"], str(kind))
                if key in mine:
                    raise InvalidInput(f"triage rules {where}: {key[0]}/{key[1]} is given twice in this file")
                mine.add(key)
                raw_rules[key] = (where, rule)
    groups = {name: _group(name, raw) for name, raw in raw_groups.items()}
    rules = {key: _rule(key, where, raw, groups) for key, (where, raw) in raw_rules.items()}
    return TriageRules(rules=MappingProxyType(rules), consistency=_consistency(consistency, groups))


def _checked(name: str, doc: Any) -> dict[str, Any]:
    stem = name.removesuffix(".json")
    if not isinstance(doc, dict) or doc.get("resourceType") != RULES_TYPE or doc.get("id") != stem:
        raise InvalidInput(f"triage rules {name}: resourceType {RULES_TYPE!r} and id {stem!r} expected")
    return doc


def _list(raw: dict[str, Any], name: str) -> list[Any]:
    value = raw.get(name) or []
    return value if isinstance(value, list) else [None]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"triage rules {where}: a JSON object is expected")
    return value


def _labels(raw: Any, where: str) -> tuple[str, str]:
    label = raw.get("label") if isinstance(raw, dict) else None
    if not isinstance(label, dict) or not isinstance(label.get("fr"), str) or not isinstance(label.get("en"), str):
        raise InvalidInput(f"triage rules {where}: label.fr and label.en are required")
    return label["fr"], label["en"]


def _group(name: str, raw: Any) -> DocumentGroup:
    fr, en = _labels(raw, f"group {name}")
    types = raw.get("types")
    if not types or not all(isinstance(t, dict) and t.get("system") and t.get("code") for t in types):
        raise InvalidInput(f"triage rules: group {name} needs types, each with a system and a code")
    return DocumentGroup(name, fr, en, tuple((str(t["system"]), str(t["code"])) for t in types))


def _severity(value: Any, where: str) -> Severity:
    if value not in SEVERITIES:
        raise InvalidInput(f"triage rules {where}: severity must be one of {', '.join(sorted(SEVERITIES))}")
    return cast(Severity, value)


def _max_age(value: Any, where: str) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise InvalidInput(f"triage rules {where}: maxAgeDays must be null or a whole number of days")
    return value


def _group_named(name: Any, groups: Mapping[str, DocumentGroup], where: str) -> DocumentGroup:
    if name not in groups:
        raise InvalidInput(f"triage rules {where}: unknown document group {name!r}")
    return groups[name]


def _rule(key: tuple[str, str], where: str, raw: Any, groups: Mapping[str, DocumentGroup]) -> CaseRule:
    documents = tuple(
        DocumentRequirement(_group_named(d.get("group"), groups, where), _max_age(d.get("maxAgeDays"), where),
                            _severity(d.get("severityIfMissing"), where), _severity(d.get("severityIfOutdated"), where))
        for d in raw.get("documents") or [])
    imaging = []
    for e in raw.get("imaging") or []:
        fr, en = _labels(e, where)
        if not e.get("name") or not e.get("modalities"):
            raise InvalidInput(f"triage rules {where}: imaging needs a name and modalities")
        imaging.append(ImagingExpectation(str(e["name"]), fr, en, frozenset(map(str, e["modalities"])),
                                          _max_age(e.get("maxAgeDays"), where),
                                          _severity(e.get("severityIfMissing"), where),
                                          _severity(e.get("severityIfOutdated"), where)))
    return CaseRule(key[0], key[1], documents, tuple(imaging))


def _consistency(raw: dict[str, Any], groups: Mapping[str, DocumentGroup]) -> ConsistencyRules:
    severity = {code: _severity(raw["severity"].get(code), f"consistency.severity.{code}")
                for code in sorted(CONSISTENCY_CODES)}
    tolerance = raw.get("imagingReportToleranceDays", 0)
    if not isinstance(tolerance, int) or tolerance < 0:
        raise InvalidInput("triage rules: consistency.imagingReportToleranceDays must be a whole number of days")
    return ConsistencyRules(
        severity=MappingProxyType(severity),
        imaging_report=_group_named(raw.get("imagingReportGroup"), groups, "consistency.imagingReportGroup"),
        report_tolerance=timedelta(days=tolerance),
        pathology=_group_named(raw.get("pathologyGroup"), groups, "consistency.pathologyGroup"),
        not_before_pathology=tuple(_group_named(g, groups, "consistency.notBeforePathologyGroups")
                                   for g in raw.get("notBeforePathologyGroups") or []),
        unreadable_reasons=frozenset(map(str, raw.get("unreadableReasons") or [])),
    )

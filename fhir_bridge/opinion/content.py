"""What a second opinion says, in coded form: the Observations a DiagnosticReport carries in ``result``.

R4 DiagnosticReport has no element for "agrees with the diagnosis" or "the proposed plan is not recommended",
so the opinion's structured content travels as **contained Observations** referenced from ``result``
(diagnosticreport.html: ``result`` "Observations that are part of this diagnostic report"; contained, because
they have no life outside the report, references.html#contained), each coded from our CodeSystem
``opinion`` (``mappings/opinion.json``):

=========================== ===================================================== =======
``Observation.code``        value                                                 repeats
=========================== ===================================================== =======
diagnosis-agreement         valueCodeableConcept: confirmed | refined | changed   0..1
treatment-plan-assessment   valueCodeableConcept: agree | alternative-proposed |  0..1
                            not-recommended
alternative-treatment       valueString                                           0..*
recommended-test            valueCodeableConcept (text, optional codes)           0..*
risk-benefit                valueString                                           0..1
dissenting-opinion          (written by the bridge on a panel's final opinion)    0..*
=========================== ===================================================== =======

The conclusion stays where R4 puts it: ``conclusion`` (text) and ``conclusionCode`` (SNOMED CT or ICD-10/CIM-10,
ValueSet ``conclusion-code-systems``: system and code shape are checked, the code's existence cannot be without
a copy of those terminologies).

A final opinion (and a panel member's opinion) must take a position: both coded assessments and a conclusion
(422 otherwise). A reviewer's draft (``preliminary``, not on a panel) may be partial.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir_bridge.errors import BusinessRuleViolation
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology

OPINION = f"{CANONICAL_BASE}/CodeSystem/opinion"
CONSENSUS_METHOD = f"{CANONICAL_BASE}/StructureDefinition/consensus-method"
PANEL_OPINION = f"{CANONICAL_BASE}/StructureDefinition/panel-opinion"
SOURCE_OPINION = f"{CANONICAL_BASE}/StructureDefinition/source-opinion"

DIAGNOSIS, PLAN = "diagnosis-agreement", "treatment-plan-assessment"
ALTERNATIVE, TEST, RISK, DISSENT = "alternative-treatment", "recommended-test", "risk-benefit", "dissenting-opinion"
_SINGLE = (DIAGNOSIS, PLAN, RISK)
_CLIENT_ITEMS = frozenset({DIAGNOSIS, PLAN, ALTERNATIVE, TEST, RISK})
_MAX_TEXT = 20_000


@dataclass(frozen=True)
class Coding:
    system: str
    code: str
    display: str | None = None

    def as_fhir(self) -> Resource:
        coding: Resource = {"system": self.system, "code": self.code}
        if self.display:
            coding["display"] = self.display
        return coding


@dataclass(frozen=True)
class OpinionContent:
    """The structured part of one opinion (a reviewer's, or the panel's consensus)."""

    diagnosis: str | None = None
    treatment_plan: str | None = None
    alternatives: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    risk_benefit: str | None = None
    conclusion: str | None = None
    conclusion_codes: tuple[Coding, ...] = ()

    @property
    def position(self) -> tuple[str | None, str | None]:
        """What two opinions must share to agree: the coded diagnosis and treatment-plan answers."""
        return self.diagnosis, self.treatment_plan

    @property
    def takes_a_position(self) -> bool:
        return bool(self.diagnosis and self.treatment_plan and self.conclusion)


@dataclass(frozen=True)
class Dissent:
    """A panel member whose position differs from the consensus."""

    member: str  # PractitionerRole/<id>
    display: str
    content: OpinionContent
    source: str  # DiagnosticReport/<id>/_history/<v>: the member's own opinion


@dataclass(frozen=True)
class ConclusionSystems:
    """``mappings/conclusion-code-systems.json``: the systems allowed in conclusionCode and their code shapes."""

    patterns: dict[str, re.Pattern[str]] = field(default_factory=dict)

    @classmethod
    def from_terminology(cls, terminology: Terminology) -> ConclusionSystems:
        value_set = terminology.resources.get("conclusion-code-systems", {})
        patterns: dict[str, re.Pattern[str]] = {}
        for include in value_set.get("compose", {}).get("include", []):
            regexes = [f["value"] for f in include.get("filter", []) if f.get("op") == "regex"]
            patterns[include["system"]] = re.compile(regexes[0] if regexes else ".+")
        return cls(patterns)


def _answers(terminology: Terminology, value_set: str) -> frozenset[str]:
    include = terminology.resources.get(value_set, {}).get("compose", {}).get("include", [])
    return frozenset(c["code"] for inc in include if inc.get("system") == OPINION for c in inc.get("concept", []))


def _item_code(observation: Resource) -> str | None:
    for coding in (observation.get("code") or {}).get("coding", []) or []:
        if coding.get("system") == OPINION:
            return str(coding.get("code"))
    return None


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BusinessRuleViolation(f"{where} must be a non-empty text", expression=[where])
    if len(value) > _MAX_TEXT:
        raise BusinessRuleViolation(f"{where} is longer than {_MAX_TEXT} characters", expression=[where])
    return value.strip()


def _concept_text(concept: Any, where: str) -> str:
    if not isinstance(concept, dict):
        raise BusinessRuleViolation(f"{where} must be a CodeableConcept", expression=[where])
    text = concept.get("text") or next((c.get("display") for c in concept.get("coding", []) or []
                                        if c.get("display")), None)
    return _text(text, f"{where}.text")


def _answer(observation: Resource, allowed: frozenset[str], where: str) -> str:
    codings = (observation.get("valueCodeableConcept") or {}).get("coding", []) or []
    codes = [str(c.get("code")) for c in codings if c.get("system") == OPINION]
    if len(codes) != 1 or codes[0] not in allowed:
        raise BusinessRuleViolation(f"{where}.valueCodeableConcept must hold one code of {OPINION}: "
                                    + " | ".join(sorted(allowed)), expression=[f"{where}.valueCodeableConcept"])
    return codes[0]


def read_content(report: Resource, terminology: Terminology, *, systems: ConclusionSystems | None = None
                 ) -> OpinionContent:
    """The structured content of ``report``; BusinessRuleViolation (422) naming the element when it is wrong.

    Only the contained Observations referenced from ``result`` count; a ``dissenting-opinion`` item is the
    bridge's to write, and a result that is not one of our items is refused rather than silently dropped.
    """
    contained = {f"#{r.get('id')}": r for r in report.get("contained", []) or []
                 if isinstance(r, dict) and r.get("resourceType") == "Observation"}
    found: dict[str, list[tuple[str, Resource]]] = {}
    for n, ref in enumerate(report.get("result", []) or []):
        where = f"DiagnosticReport.result[{n}]"
        observation = contained.get(str((ref or {}).get("reference")))
        if observation is None:
            raise BusinessRuleViolation(f"{where} must reference a contained Observation (#id)", expression=[where])
        code = _item_code(observation)
        if code not in _CLIENT_ITEMS:
            raise BusinessRuleViolation(
                f"{where}: Observation.code must be one of {OPINION}: " + " | ".join(sorted(_CLIENT_ITEMS)),
                expression=[where])
        found.setdefault(code, []).append((f"{where}.resolve()", observation))
    for code in _SINGLE:
        if len(found.get(code, [])) > 1:
            raise BusinessRuleViolation(f"an opinion holds at most one {code} item", expression=["result"])

    def single(code: str) -> tuple[str, Resource] | None:
        items = found.get(code) or []
        return items[0] if items else None

    diagnosis = plan = risk = None
    if item := single(DIAGNOSIS):
        diagnosis = _answer(item[1], _answers(terminology, "diagnosis-agreements"), item[0])
    if item := single(PLAN):
        plan = _answer(item[1], _answers(terminology, "treatment-plan-assessments"), item[0])
    if item := single(RISK):
        risk = _text(item[1].get("valueString"), f"{item[0]}.valueString")
    alternatives = tuple(_text(o.get("valueString"), f"{w}.valueString") for w, o in found.get(ALTERNATIVE, []))
    tests = tuple(_concept_text(o.get("valueCodeableConcept"), f"{w}.valueCodeableConcept")
                  for w, o in found.get(TEST, []))
    conclusion = report.get("conclusion")
    if conclusion is not None:
        conclusion = _text(conclusion, "DiagnosticReport.conclusion")
    return OpinionContent(diagnosis=diagnosis, treatment_plan=plan, alternatives=alternatives, tests=tests,
                          risk_benefit=risk, conclusion=conclusion,
                          conclusion_codes=_conclusion_codes(report, systems or ConclusionSystems.from_terminology(
                              terminology)))


def _conclusion_codes(report: Resource, systems: ConclusionSystems) -> tuple[Coding, ...]:
    codes: list[Coding] = []
    for n, concept in enumerate(report.get("conclusionCode", []) or []):
        for m, coding in enumerate((concept or {}).get("coding", []) or []):
            where = f"DiagnosticReport.conclusionCode[{n}].coding[{m}]"
            system, code = coding.get("system"), coding.get("code")
            pattern = systems.patterns.get(str(system))
            if pattern is None:
                raise BusinessRuleViolation(
                    f"{where}.system must be one of " + ", ".join(sorted(systems.patterns)), expression=[where])
            if not isinstance(code, str) or not pattern.fullmatch(code):
                raise BusinessRuleViolation(f"{where}.code is not shaped like a code of {system}",
                                            expression=[f"{where}.code"])
            codes.append(Coding(str(system), code, coding.get("display")))
    return tuple(codes)


def require_position(content: OpinionContent, who: str) -> None:
    """A final opinion, and a panel member's opinion, must answer both questions and conclude."""
    missing = [name for name, value in ((DIAGNOSIS, content.diagnosis), (PLAN, content.treatment_plan),
                                        ("conclusion", content.conclusion)) if not value]
    if missing:
        raise BusinessRuleViolation(f"{who} must state " + ", ".join(missing)
                                    + f" (contained Observations coded {OPINION}, and DiagnosticReport.conclusion)",
                                    expression=["result" if missing[0] != "conclusion" else "conclusion"])


# -- writing -------------------------------------------------------------------------------------------------


def _observation(oid: str, code: str, terminology: Terminology, status: str, **value: Any) -> Resource:
    return {"resourceType": "Observation", "id": oid, "status": status,
            "code": {"coding": [{"system": OPINION, "code": code, "display": terminology.display(OPINION, code)}]},
            **value}


def answer_concept(code: str, terminology: Terminology) -> Resource:
    return {"coding": [{"system": OPINION, "code": code, "display": terminology.display(OPINION, code)}]}


def content_resources(content: OpinionContent, terminology: Terminology, *, status: str = "final"
                      ) -> tuple[list[Resource], list[Resource]]:
    """``content`` as (contained Observations, ``result`` references): what the bridge writes for a consensus."""
    contained: list[Resource] = []

    def add(code: str, **value: Any) -> None:
        contained.append(_observation(f"{code}-{len(contained) + 1}", code, terminology, status, **value))

    if content.diagnosis:
        add(DIAGNOSIS, valueCodeableConcept=answer_concept(content.diagnosis, terminology))
    if content.treatment_plan:
        add(PLAN, valueCodeableConcept=answer_concept(content.treatment_plan, terminology))
    for text in content.alternatives:
        add(ALTERNATIVE, valueString=text)
    for text in content.tests:
        add(TEST, valueCodeableConcept={"text": text})
    if content.risk_benefit:
        add(RISK, valueString=content.risk_benefit)
    return contained, [{"reference": f"#{o['id']}"} for o in contained]


def dissent_resource(dissent: Dissent, terminology: Terminology, oid: str) -> Resource:
    """A member's differing position, kept on the consensus with its author (performer) and its source."""
    components = [
        {"code": {"coding": [{"system": OPINION, "code": code, "display": terminology.display(OPINION, code)}]},
         "valueCodeableConcept": answer_concept(answer, terminology)}
        for code, answer in ((DIAGNOSIS, dissent.content.diagnosis), (PLAN, dissent.content.treatment_plan)) if answer
    ]
    observation = _observation(oid, DISSENT, terminology, "final",
                               performer=[{"reference": dissent.member, "display": dissent.display}],
                               extension=[{"url": SOURCE_OPINION, "valueReference": {"reference": dissent.source}}])
    if dissent.content.conclusion:
        observation["valueString"] = dissent.content.conclusion
    if components:
        observation["component"] = components
    return observation


def read_dissents(report: Resource) -> list[Dissent]:
    """The dissenting opinions a stored consensus carries (for rendering)."""
    dissents = []
    for observation in report.get("contained", []) or []:
        if observation.get("resourceType") != "Observation" or _item_code(observation) != DISSENT:
            continue
        performer = (observation.get("performer") or [{}])[0]
        answers = {}
        for component in observation.get("component", []) or []:
            code = _item_code(component)
            values = [c.get("code") for c in (component.get("valueCodeableConcept") or {}).get("coding", [])
                      if c.get("system") == OPINION]
            if code and values:
                answers[code] = str(values[0])
        source = next((e.get("valueReference", {}).get("reference") for e in observation.get("extension", []) or []
                       if e.get("url") == SOURCE_OPINION), "")
        dissents.append(Dissent(member=str(performer.get("reference", "")), display=str(performer.get("display", "")),
                                content=OpinionContent(diagnosis=answers.get(DIAGNOSIS),
                                                       treatment_plan=answers.get(PLAN),
                                                       conclusion=observation.get("valueString")),
                                source=str(source)))
    return dissents


def consensus_method(report: Resource) -> str | None:
    for extension in report.get("extension", []) or []:
        if extension.get("url") == CONSENSUS_METHOD:
            return str((extension.get("valueCoding") or {}).get("code") or "") or None
    return None


def unique(texts: Iterable[str]) -> tuple[str, ...]:
    """Texts in first-seen order, each once (case and spacing aside)."""
    seen: set[str] = set()
    out: list[str] = []
    for text in texts:
        key = " ".join(text.split()).casefold()
        if key not in seen:
            seen.add(key)
            out.append(text)
    return tuple(out)

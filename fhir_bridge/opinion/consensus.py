"""A panel's one final opinion (a virtual tumor board, an RCP): who signs it, who dissented, how it was reached.

Each member of the panel (``CareTeam`` in ``config/reviewers.json``) posts a ``preliminary`` DiagnosticReport
giving their position (:mod:`fhir_bridge.opinion.content`). The panel's final opinion is then issued once:

* by the **coordinator** (``panel-role#coordinator``), who posts the ``final`` report with the consensus they
  wrote: any panel, whatever its configured method, and the only way when the members disagree beyond what the
  rule allows;
* or by the bridge itself, at the member opinion that meets the panel's configured rule (extension
  ``consensus-method`` on the CareTeam): ``unanimous`` — every member answered and all give the same coded
  position; ``majority`` — every member answered and more than half give the same position.

Two opinions agree when they give the same answers on the diagnosis and on the treatment plan; the free text
may differ. The final report (IHE IMR pattern, STANDARDS.md §4-5) carries:

* ``resultsInterpreter``: every member who gave an opinion, in panel order, and the coordinator;
* ``performer``: the organisations those members give opinions for (R4: Organization is a performer);
* the consensus content (coordinator's, or for an automatic consensus the agreeing members' items merged,
  the text of the coordinator if they agree, else of the first agreeing member in panel order);
* one contained ``dissenting-opinion`` Observation per member whose position differs, with its author in
  ``performer`` and their own report version in the ``source-opinion`` extension: a dissent is never lost;
* extensions ``consensus-method`` (how it was reached) and ``panel-opinion`` (each member report version).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import Terminology
from fhir_bridge.opinion.content import (
    ALTERNATIVE,
    CONSENSUS_METHOD,
    DISSENT,
    OPINION,
    PANEL_OPINION,
    TEST,
    Dissent,
    OpinionContent,
    dissent_resource,
)
from fhir_bridge.review.reviewers import Panel, ReviewerRegistry

AUTOMATIC = frozenset({"unanimous", "majority"})


@dataclass(frozen=True)
class MemberOpinion:
    """A panel member's current (preliminary) opinion on the case."""

    member: str  # PractitionerRole id
    report: Resource
    content: OpinionContent

    @property
    def reference(self) -> str:
        return f"DiagnosticReport/{self.report['id']}/_history/{self.report['meta']['versionId']}"


@dataclass(frozen=True)
class Automatic:
    """A consensus the bridge may issue: its method, whose text it takes, who agreed and who did not."""

    method: str
    author: MemberOpinion
    agreeing: list[MemberOpinion]


def automatic_consensus(panel: Panel, opinions: Sequence[MemberOpinion]) -> Automatic | None:
    """The consensus the panel's rule allows now, or None (a member has not answered, or they disagree)."""
    if panel.consensus not in AUTOMATIC:
        return None
    by_member = {o.member: o for o in opinions}
    if any(member not in by_member for member in panel.members):
        return None
    ordered = [by_member[m] for m in panel.members]
    groups: dict[tuple[str | None, str | None], list[MemberOpinion]] = {}
    for opinion in ordered:
        groups.setdefault(opinion.content.position, []).append(opinion)
    largest = max(groups.values(), key=len)
    if (panel.consensus == "unanimous" and len(groups) != 1) or 2 * len(largest) <= len(ordered):
        return None
    author = next((o for o in largest if o.member == panel.coordinator), largest[0])
    return Automatic(method=panel.consensus, author=author, agreeing=largest)


def merged_report(automatic: Automatic) -> Resource:
    """The body of an automatic consensus: the author's report, with the alternative treatments and recommended
    tests the other agreeing members added (each once), every item Observation ``final``."""
    base = automatic.author.report
    report: Resource = {k: copy.deepcopy(v) for k, v in base.items()
                        if k in ("category", "code", "subject", "basedOn", "conclusion", "conclusionCode")}
    report.update(resourceType="DiagnosticReport", status="final")
    contained = [{**copy.deepcopy(o), "status": "final"} for o in _items(base)]
    seen = {_item_key(o) for o in contained}
    for other in automatic.agreeing:
        for observation in _items(other.report):
            if _code(observation) in (ALTERNATIVE, TEST) and _item_key(observation) not in seen:
                seen.add(_item_key(observation))
                contained.append({**copy.deepcopy(observation), "status": "final",
                                  "id": f"{observation.get('id')}-{other.member}"})
    report["contained"] = contained
    report["result"] = [{"reference": f"#{o['id']}"} for o in contained]
    return report


def panel_final(report: Resource, *, panel: Panel, registry: ReviewerRegistry, opinions: Sequence[MemberOpinion],
                position: OpinionContent, method: str, terminology: Terminology) -> Resource:
    """``report`` (the consensus content) completed as the panel's final opinion; see the module docstring.

    Elements the bridge owns are rewritten: ``resultsInterpreter``, ``performer``, the dissent Observations
    and the two extensions, so a coordinator's amendment that sends back what it read is completed afresh.
    """
    final = copy.deepcopy(report)
    by_member = {o.member: o for o in opinions}
    signers = [m for m in panel.members if m in by_member or m == panel.coordinator]
    final["resultsInterpreter"] = [interpreter(m, registry) for m in signers]
    final["performer"] = organisations(signers, registry)
    kept = [r for r in final.get("contained", []) or [] if _code(r) != DISSENT]
    kept_refs = [r for r in final.get("result", []) or []
                 if str(r.get("reference")) in {f"#{o.get('id')}" for o in kept}]
    dissents = [dissent_resource(Dissent(member=f"PractitionerRole/{o.member}", display=_display(o.member, registry),
                                         content=o.content, source=o.reference), terminology, f"dissent-{n}")
                for n, o in enumerate((by_member[m] for m in panel.members if m in by_member
                                       and by_member[m].content.position != position.position), start=1)]
    final["contained"] = kept + dissents
    final["result"] = kept_refs + [{"reference": f"#{d['id']}"} for d in dissents]
    others = [e for e in final.get("extension", []) or [] if e.get("url") not in (CONSENSUS_METHOD, PANEL_OPINION)]
    final["extension"] = [
        *others,
        {"url": CONSENSUS_METHOD, "valueCoding": {"system": OPINION, "code": method,
                                                  "display": terminology.display(OPINION, method)}},
        *({"url": PANEL_OPINION, "valueReference": {"reference": by_member[m].reference}}
          for m in panel.members if m in by_member),
    ]
    if not final["contained"]:
        final.pop("contained")
    if not final["result"]:
        final.pop("result")
    return final


def attribute(report: Resource, reviewer: str, registry: ReviewerRegistry) -> Resource:
    """One reviewer's opinion signed by them: ``resultsInterpreter`` their PractitionerRole, ``performer`` its
    Organization (both set by the bridge from the caller's token, never taken from the body)."""
    attributed = dict(report)
    attributed["resultsInterpreter"] = [interpreter(reviewer, registry)]
    performer = organisations([reviewer], registry)
    if performer:
        attributed["performer"] = performer
    else:
        attributed.pop("performer", None)
    return attributed


def interpreter(reviewer: str, registry: ReviewerRegistry) -> Resource:
    return {"reference": f"PractitionerRole/{reviewer}", "display": _display(reviewer, registry)}


def organisations(reviewers: Sequence[str], registry: ReviewerRegistry) -> list[Resource]:
    out: list[Resource] = []
    for reviewer in reviewers:
        known = registry.reviewers.get(reviewer)
        org = registry.organisations.get(known.organization or "") if known else None
        if org is not None and all(o["reference"] != org.reference for o in out):
            out.append({"reference": org.reference, "display": org.display})
    return out


def _display(reviewer: str, registry: ReviewerRegistry) -> str:
    known = registry.reviewers.get(reviewer)
    return known.display if known else reviewer


def _code(observation: Resource) -> str | None:
    for coding in (observation.get("code") or {}).get("coding", []) or []:
        if coding.get("system") == OPINION:
            return str(coding.get("code"))
    return None


def _items(report: Resource) -> list[Resource]:
    referenced = {str(r.get("reference")) for r in report.get("result", []) or []}
    return [r for r in report.get("contained", []) or []
            if r.get("resourceType") == "Observation" and f"#{r.get('id')}" in referenced and _code(r) != DISSENT]


def _item_key(observation: Resource) -> tuple[str | None, str]:
    value = observation.get("valueString") or (observation.get("valueCodeableConcept") or {}).get("text") or ""
    return _code(observation), " ".join(str(value).split()).casefold()

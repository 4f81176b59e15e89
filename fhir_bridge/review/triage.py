"""Pre-review triage: find what is missing or inconsistent in a case before a human expert sees it.

A reviewer who receives an incomplete case loses time and may give an opinion on stale data, so every case
bundle (:mod:`fhir_bridge.case.packaging`) is checked here first. Two kinds of checks:

* **completeness**, from the rules of the case's specialty and kind (``mappings/triage-rules.json``, whose
  ``description`` documents the format): each required group of document types (JDV_J07, STANDARDS.md §3;
  any type of a group will do, so an older code such as pathology 11526-1 still counts) present and recent
  enough, and the expected imaging (DICOM modality codes, STANDARDS.md §4) present and recent enough;
* **consistency**, for every case: one Patient carrying the case's INS and every ``subject`` pointing at it
  (FR Core; the billing number NSS shares the INS-NIR system but not its identifier type, STANDARDS.md §2);
  no duplicate (same masterIdentifier or same attachment SHA-1); superseded versions reported; nothing dated
  in the future; every imaging study has an imaging report dated with or after it; the newest treatment
  plan or RCP report is not older than the newest pathology report; attachments that could not be read.

Findings are plain data (severity, code of ``mappings/triage-findings.json``, French and English text, the
resource concerned by its source URL): the workflow puts them on the Task and, through
:func:`findings_outcome`, in an OperationOutcome the requester reads. A blocking finding keeps the case
waiting for documents. Binary ``data`` values may be streamed objects, so this module never reads Binaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, cast

from fhir_bridge.case.deadlines import is_date_only, parse_fhir_datetime
from fhir_bridge.case.selection import Problem, document_label
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.review.triage_rules import (
    CONSISTENCY_CODES,
    ConsistencyRules,
    DocumentRequirement,
    ImagingExpectation,
    Severity,
    TriageRules,
    triage_rules_from,
)

__all__ = ["CONSISTENCY_CODES", "ISSUE_TYPES", "Finding", "TriageRules", "findings_outcome", "missing_summary",
           "triage_case", "triage_rules_from"]

Coding = tuple[str, str]
TRIAGE_FINDINGS = f"{CANONICAL_BASE}/CodeSystem/triage-findings"
_TRANSLATION = "http://hl7.org/fhir/StructureDefinition/translation"  # R4 extension-translation.html
_ORDER = {"blocking": 0, "warning": 1, "information": 2}
#: how a missing document is qualified, by the severity its rule gives its absence
_NEED = {"blocking": ("requis", "Required"), "warning": ("attendu", "Expected"), "information": ("utile", "Useful")}
_OUTCOME_SEVERITY = {"blocking": "error", "warning": "warning", "information": "information"}
#: a source clock a few minutes ahead of ours is not a future-dated document
_CLOCK_SKEW = timedelta(minutes=5)
#: a date without time is "today" somewhere on Earth until 14 h after UTC midnight (UTC+14)
_DATE_LINE = timedelta(hours=14)

#: R4 OperationOutcome issue type per finding code (the issue-type property of mappings/triage-findings.json)
ISSUE_TYPES: Mapping[str, str] = MappingProxyType({
    "missing-document": "incomplete", "outdated-document": "incomplete", "required-document-unreadable": "incomplete",
    "missing-imaging": "incomplete", "outdated-imaging": "incomplete", "attachment-unreadable": "incomplete",
    "patient-mismatch": "business-rule", "patient-identity": "business-rule", "duplicate-document": "business-rule",
    "superseded-version": "informational", "future-dated": "business-rule", "imaging-without-report": "business-rule",
    "plan-predates-pathology": "business-rule", "no-triage-rules": "business-rule",
})


@dataclass(frozen=True)
class Finding:
    """One triage finding; ``resource`` is the source URL of the resource concerned, ``missing`` the rule
    name (document group or imaging expectation) of what the case lacks."""

    severity: Severity
    code: str
    text_fr: str
    text_en: str
    resource: str | None = None
    missing: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"severity": self.severity, "code": self.code, "text": {"fr": self.text_fr, "en": self.text_en}}
        return out | {k: v for k, v in (("resource", self.resource), ("missing", self.missing)) if v}


# -- the checks ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """A DocumentReference or ImagingStudy entry, with the date that says how old its content is."""

    resource: Resource
    where: str
    when: datetime | None


def _where(entry: Resource) -> str:
    return str((entry["resource"].get("meta") or {}).get("source") or entry.get("fullUrl") or "")


def _day(moment: datetime | None) -> str:
    return moment.date().isoformat() if moment else "?"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _parse(value: Any) -> datetime | None:
    return parse_fhir_datetime(value) if isinstance(value, str) else None


def triage_case(bundle: Resource, *, specialty: str, kind: str, patient_identifier: PatientIdentifier,
                problems: Sequence[Problem], rules: TriageRules, now: datetime,
                left_out: Sequence[Resource] = ()) -> list[Finding]:
    """Every finding on a case bundle, blocking ones first.

    ``problems`` are the items collection left out (:mod:`fhir_bridge.case.selection`); ``left_out`` may give the
    source DocumentReferences behind them, so that an unreadable attachment of a required type is reported
    as that requirement unmet (blocking when the requirement is) instead of as a mere warning.
    """
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]

    def of_type(resource_type: str) -> list[Resource]:
        return [e for e in entries if e["resource"].get("resourceType") == resource_type]

    # a document's age is the time of the act it reports (PDSm requires context.period.start), else its date
    docs = [_Item(e["resource"], _where(e), _parse(((e["resource"].get("context") or {}).get("period") or {})
                                                   .get("start")) or _parse(e["resource"].get("date")))
            for e in of_type("DocumentReference")]
    studies = [_Item(e["resource"], _where(e), _parse(e["resource"].get("started"))) for e in of_type("ImagingStudy")]
    sev = rules.consistency.severity
    findings = _check_patient(entries, of_type("Patient"), patient_identifier, sev)

    unreadable = [p for p in problems if p.reason in rules.consistency.unreadable_reasons]
    unread_docs = {id(p): doc for p in unreadable for doc in left_out if _is_problem_of(p, doc)}
    reported: set[int] = set()
    rule = rules.rule_for(specialty, kind)
    if rule is None:
        findings.append(Finding(sev["no-triage-rules"], "no-triage-rules",
                                f"Aucune règle de tri pour {specialty} / {kind} : complétude non vérifiée.",
                                f"No triage rules for {specialty} / {kind}: completeness not checked."))
    else:
        for req in rule.documents:
            findings.extend(_check_requirement(req, docs, unreadable, unread_docs, reported, now))
        for expected in rule.imaging:
            findings.extend(_check_imaging(expected, studies, now))
    for p in unreadable:
        if id(p) not in reported:
            findings.append(Finding(sev["attachment-unreadable"], "attachment-unreadable",
                                    f"Contenu illisible, document écarté du dossier ({p.reason}).",
                                    f"Content could not be read, document left out of the case ({p.reason}).",
                                    resource=_problem_where(p)))
    for p in problems:
        if p.reason == "superseded":
            findings.append(Finding(sev["superseded-version"], "superseded-version",
                                    "Version remplacée par une plus récente : seule la version en vigueur est "
                                    "au dossier.",
                                    "Superseded by a newer version: only the current version is in the case.",
                                    resource=_problem_where(p)))
    findings += _check_duplicates(docs, sev["duplicate-document"])
    findings += _check_future(docs, studies, now, sev["future-dated"])
    findings += _check_imaging_reports(docs, studies, rules.consistency)
    findings += _check_plans(docs, rules.consistency)
    return sorted(findings, key=lambda f: _ORDER[f.severity])


def _check_patient(entries: list[Resource], patients: list[Resource], identifier: PatientIdentifier,
                   sev: Mapping[str, Severity]) -> list[Finding]:
    if len(patients) != 1:
        return [Finding(sev["patient-mismatch"], "patient-mismatch",
                        f"Le dossier contient {len(patients)} patients au lieu d'un seul.",
                        f"The case holds {len(patients)} Patient resources instead of exactly one.")]
    findings = []
    patient_url = patients[0].get("fullUrl")
    ids = [i for i in patients[0]["resource"].get("identifier") or [] if isinstance(i, dict)]
    if not identifier.is_ins or not any(identifier.matches(i) and not _is_billing_number(i) for i in ids):
        findings.append(Finding(sev["patient-identity"], "patient-identity",
                                "Le patient du dossier ne porte pas l'INS de la demande.",
                                "The case's Patient does not carry the INS of the request.",
                                resource=_where(patients[0])))
    for entry in entries:
        resource = entry["resource"]
        if "subject" not in resource and resource.get("resourceType") not in ("DocumentReference", "ImagingStudy"):
            continue
        subject = resource.get("subject")
        reference = subject.get("reference") if isinstance(subject, dict) else None
        logical = subject.get("identifier") if isinstance(subject, dict) else None
        if reference == patient_url or (reference is None and isinstance(logical, dict)
                                         and identifier.matches(logical)):
            continue
        findings.append(Finding(sev["patient-mismatch"], "patient-mismatch",
                                f"{resource.get('resourceType')} sans lien avec le patient du dossier (subject).",
                                f"{resource.get('resourceType')} whose subject is not the case's patient.",
                                resource=_where(entry)))
    return findings


def _is_billing_number(identifier: Resource) -> bool:
    """The NSS (type NH) shares the INS-NIR system: only the identifier type tells them apart (STANDARDS.md §2)."""
    return any(c.get("code") == "NH" for c in (identifier.get("type") or {}).get("coding") or [] if isinstance(c, dict))


def _is_problem_of(problem: Problem, doc: Resource) -> bool:
    if problem.master_identifier is not None and problem.master_identifier == document_label(doc):
        return True
    url = (problem.source_url or "").split("/_history/")[0]
    return bool(url) and isinstance(doc.get("id"), str) and url.endswith(f"/DocumentReference/{doc['id']}")


def _problem_where(problem: Problem) -> str | None:
    return problem.source_url or problem.master_identifier


def _check_requirement(req: DocumentRequirement, docs: list[_Item], unreadable: list[Problem],
                       unread_docs: Mapping[int, Resource], reported: set[int], now: datetime) -> Iterable[Finding]:
    group = req.group
    present = [d for d in docs if group.matches(d.resource)]
    if not present:
        unread = [p for p in unreadable if id(p) in unread_docs and group.matches(unread_docs[id(p)])]
        fr, en = _NEED[req.if_missing]
        for p in unread:
            reported.add(id(p))
            yield Finding(req.if_missing, "required-document-unreadable",
                          f"Document {fr} illisible : {group.label_fr} — il existe à la source mais son contenu "
                          f"n'a pas pu être lu ({p.reason}).",
                          f"{en} document unreadable: {group.label_en} — it exists at the source but its "
                          f"content could not be read ({p.reason}).", resource=_problem_where(p), missing=group.name)
        if not unread:
            yield Finding(req.if_missing, "missing-document",
                          f"Document {fr} absent : {group.label_fr} ({group.codes('ou')}).",
                          f"{en} document missing: {group.label_en} ({group.codes('or')}).", missing=group.name)
        return
    if req.max_age_days is None:
        return
    limit = now - timedelta(days=req.max_age_days)
    if not any(d.when is not None and d.when >= limit for d in present):
        latest = max(present, key=lambda d: d.when or datetime.min.replace(tzinfo=now.tzinfo))
        yield Finding(req.if_outdated, "outdated-document",
                      f"Document trop ancien : {group.label_fr}, le plus récent date du {_day(latest.when)} ; "
                      f"il en faut un de moins de {req.max_age_days} jours.",
                      f"Document too old: {group.label_en}, the latest is dated {_day(latest.when)}; "
                      f"one less than {req.max_age_days} days old is needed.",
                      resource=latest.where, missing=group.name)


def _modalities(study: Resource) -> set[str]:
    codings = [*(study.get("modality") or []), *((s or {}).get("modality") for s in study.get("series") or [])]
    return {str(c["code"]) for c in codings if isinstance(c, dict) and c.get("code")}


def _check_imaging(expected: ImagingExpectation, studies: list[_Item], now: datetime) -> Iterable[Finding]:
    present = [s for s in studies if _modalities(s.resource) & expected.modalities]
    age = f" de moins de {expected.max_age_days} jours" if expected.max_age_days is not None else ""
    age_en = f" less than {expected.max_age_days} days old" if expected.max_age_days is not None else ""
    if not present:
        yield Finding(expected.if_missing, "missing-imaging",
                      f"Imagerie attendue absente : {expected.label_fr}{age}.",
                      f"Expected imaging missing: {expected.label_en}{age_en}.", missing=expected.name)
    elif expected.max_age_days is not None:
        limit = now - timedelta(days=expected.max_age_days)
        if not any(s.when is not None and s.when >= limit for s in present):
            latest = max(present, key=lambda s: s.when or datetime.min.replace(tzinfo=now.tzinfo))
            yield Finding(expected.if_outdated, "outdated-imaging",
                          f"Imagerie trop ancienne : {expected.label_fr}, le dernier examen date du "
                          f"{_day(latest.when)} ; il en faut un{age}.",
                          f"Imaging too old: {expected.label_en}, the latest study is dated {_day(latest.when)}; "
                          f"one{age_en} is needed.", resource=latest.where, missing=expected.name)


def _check_duplicates(docs: list[_Item], severity: Severity) -> Iterable[Finding]:
    masters: dict[Coding, str] = {}
    hashes: dict[str, str] = {}
    for d in docs:
        master = d.resource.get("masterIdentifier") or {}
        key = (str(master.get("system", "")), str(master["value"])) if master.get("value") else None
        digest = (((d.resource.get("content") or [{}])[0] or {}).get("attachment") or {}).get("hash")
        if key is not None and key in masters:
            fr, en = f"même masterIdentifier que {masters[key]}", f"same masterIdentifier as {masters[key]}"
        elif isinstance(digest, str) and digest in hashes:
            fr, en = f"même contenu (SHA-1) que {hashes[digest]}", f"same content (SHA-1) as {hashes[digest]}"
        else:
            masters.update({key: d.where} if key is not None else {})
            hashes.update({digest: d.where} if isinstance(digest, str) else {})
            continue
        yield Finding(severity, "duplicate-document", f"Document en double : {fr}.", f"Duplicate document: {en}.",
                      resource=d.where)


def _is_future(value: Any, now: datetime) -> bool:
    moment = _parse(value)
    if moment is None:
        return False
    if is_date_only(value):
        return moment.date() > (now + _DATE_LINE).date()
    return moment > now + _CLOCK_SKEW


def _check_future(docs: list[_Item], studies: list[_Item], now: datetime, severity: Severity) -> Iterable[Finding]:
    for item in [*docs, *studies]:
        r = item.resource
        dates = [r.get("date"), ((r.get("context") or {}).get("period") or {}).get("start"), r.get("started")]
        future = [v for v in dates if _is_future(v, now)]
        if future:
            yield Finding(severity, "future-dated", f"{r['resourceType']} daté dans le futur ({future[0]}).",
                          f"{r['resourceType']} dated in the future ({future[0]}).", resource=item.where)


def _check_imaging_reports(docs: list[_Item], studies: list[_Item], rules: ConsistencyRules) -> Iterable[Finding]:
    reports = [d for d in docs if rules.imaging_report.matches(d.resource)]
    for study in studies:
        started = study.when
        if started is None:
            covered = bool(reports)
        else:
            covered = any(r.when is not None and r.when >= started - rules.report_tolerance for r in reports)
        if not covered:
            yield Finding(rules.severity["imaging-without-report"], "imaging-without-report",
                          f"Examen d'imagerie du {_day(started)} sans {rules.imaging_report.label_fr} daté du même "
                          "jour ou après.",
                          f"Imaging study of {_day(started)} without any {rules.imaging_report.label_en} dated on or "
                          "after it.", resource=study.where)


def _check_plans(docs: list[_Item], rules: ConsistencyRules) -> Iterable[Finding]:
    pathology = [d.when for d in docs if d.when is not None and rules.pathology.matches(d.resource)]
    if not pathology:
        return
    latest = max(pathology)
    for group in rules.not_before_pathology:
        plans = [d for d in docs if d.when is not None and group.matches(d.resource)]
        newest = max(plans, key=lambda d: cast(datetime, d.when), default=None)
        # compared by day: a plan written the same day as the pathology report may well have used it
        if newest is not None and newest.when is not None and newest.when.date() < latest.date():
            yield Finding(rules.severity["plan-predates-pathology"], "plan-predates-pathology",
                          f"{_upper_first(group.label_fr)} (le plus récent, du {_day(newest.when)}) antérieur au "
                          f"dernier résultat ({rules.pathology.label_fr}, du {_day(latest)}) : il a pu être établi "
                          "sans en tenir compte.",
                          f"{_upper_first(group.label_en)} (the latest, of {_day(newest.when)}) predates the latest "
                          f"{rules.pathology.label_en} ({_day(latest)}): it may not take it into account.",
                          resource=newest.where)


# -- what the requester reads -------------------------------------------------------------------------------


def findings_outcome(findings: Iterable[Finding]) -> Resource:
    """The findings as an R4 OperationOutcome (operationoutcome.html): one issue each, the finding code in
    ``details.coding``, English in ``details.text`` with its French translation (R4 translation extension),
    and French plus the resource concerned in ``diagnostics`` for readers that ignore extensions."""
    issues = []
    for f in findings:
        issue_type = "informational" if f.severity == "information" else ISSUE_TYPES.get(f.code, "business-rule")
        issues.append({
            "severity": _OUTCOME_SEVERITY[f.severity],
            "code": issue_type,
            "details": {"coding": [{"system": TRIAGE_FINDINGS, "code": f.code}], "text": f.text_en,
                        "_text": {"extension": [_translation("fr", f.text_fr)]}},
            "diagnostics": f.text_fr + (f" [{f.resource}]" if f.resource else ""),
        })
    if not issues:
        issues = [{"severity": "information", "code": "informational",
                   "details": {"text": "Triage found nothing to report.",
                               "_text": {"extension": [_translation("fr", "Le tri n'a rien relevé.")]}},
                   "diagnostics": "Le tri n'a rien relevé."}]
    return {"resourceType": "OperationOutcome", "issue": issues}


def _translation(lang: str, content: str) -> Resource:
    return {"url": _TRANSLATION, "extension": [{"url": "lang", "valueCode": lang},
                                               {"url": "content", "valueString": content}]}


def missing_summary(findings: Iterable[Finding]) -> str:
    """One line, French then English, of what the case lacks (blocking first): the text of the
    ``waiting-for-documents`` state, so the requester knows exactly what to add at the source."""
    gaps = sorted((f for f in findings if f.missing), key=lambda f: _ORDER[f.severity])
    if not gaps:
        return "Rien ne manque / Nothing is missing"
    return f"À compléter : {' '.join(f.text_fr for f in gaps)} / To complete: {' '.join(f.text_en for f in gaps)}"

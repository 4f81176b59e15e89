"""``DiagnosticReport.presentedForm``: the opinion as a clinician and a patient read it, in French and English.

IHE IMR (STANDARDS.md §4) asks for an HTML rendering and allows a PDF, each with ``size`` and ``hash``; R4
Attachment: ``hash`` is the base64 SHA-1 of the bytes (datatypes.html#Attachment). The bridge renders four
attachments for every final-type version (final, amended, corrected, appended): HTML and PDF, in French
(``language`` fr, first: the national record and French clinicians read it) and English. They are rendered from
the coded content and the request, never taken from the client: what a client sends in ``presentedForm`` is
replaced, so a read-modify-write of a report always gets renderings that match its new content.

The renderings carry the INS the report names, not the patient's name: the report itself holds no more.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence

from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE, Terminology
from fhir_bridge.opinion.content import OPINION, Dissent, OpinionContent, consensus_method, read_dissents
from fhir_bridge.opinion.report import FINAL_TYPES
from fhir_bridge.rendering.layout import format_instant, labels_for
from fhir_bridge.rendering.view import LANGUAGES, DissentView, ReportLabels, ReportView
from fhir_bridge.review.reviewers import ReviewerRegistry

Renderer = Callable[[ReportView], bytes]
RENDERED_STATUSES = FINAL_TYPES
SPECIALTY = f"{CANONICAL_BASE}/CodeSystem/specialty"


def report_view(report: Resource, request: Resource, *, content: OpinionContent, language: str,
                registry: ReviewerRegistry, terminology: Terminology, report_labels: ReportLabels,
                panel: str | None = None, replaces: Resource | None = None) -> ReportView:
    """``report`` (with its ``id`` and the version it will be stored as in ``meta.versionId``) for readers of
    ``language``; ``replaces``: the version an amendment replaces. Labels: ``config/report-labels.json`` (R4's
    diagnostic-report-status has no French designations), given as data and carried by the view for the
    renderers."""
    labels = labels_for(report_labels, language)

    def label(code: str | None) -> str | None:
        return terminology.display(OPINION, code, language) if code else None

    identifier = (report.get("subject") or {}).get("identifier") or {}
    specialty = next((c.get("code") for cat in request.get("category", []) or [] for c in cat.get("coding", [])
                      if c.get("system") == SPECIALTY), None)
    method = consensus_method(report)
    return ReportView(
        language=language,
        report_id=str(report.get("id")),
        version=str((report.get("meta") or {}).get("versionId") or "1"),
        status=str(report.get("status")),
        status_label=labels.get(f"status_{report.get('status')}", str(report.get("status"))),
        issued=str(report.get("issued") or ""),
        patient=f"{labels.get('id_' + str(identifier.get('system')), 'ID')} {identifier.get('value', '')}".strip(),
        specialty=terminology.display(SPECIALTY, specialty, language) if specialty else None,
        panel=panel,
        consensus_method=label(method),
        clinical_question=_question(request),
        proposed_plan=_plan(request),
        requester=(request.get("requester") or {}).get("display"),
        requested_on=request.get("authoredOn"),
        interpreters=tuple(_person(r, registry, terminology, language) for r in report.get("resultsInterpreter", [])),
        organisations=tuple(str(p.get("display") or p.get("reference")) for p in report.get("performer", []) or []
                            if str(p.get("reference", "")).startswith("Organization/")),
        diagnosis=label(content.diagnosis),
        treatment_plan=label(content.treatment_plan),
        alternatives=content.alternatives,
        tests=content.tests,
        risk_benefit=content.risk_benefit,
        conclusion=content.conclusion,
        conclusion_codes=tuple(f"{c.code} ({labels.get('code_' + c.system, c.system)})"
                               + (f" — {c.display}" if c.display else "") for c in content.conclusion_codes),
        dissents=tuple(_dissent(d, registry, terminology, language) for d in read_dissents(report)),
        replaces=labels["replaced_version"].format(
            version=replaces["meta"]["versionId"], issued=format_instant(str(replaces.get("issued", "")), language,
                                                                    report_labels),
        ) if replaces else None,
        labels=report_labels,
    )


def presented_forms(views: Sequence[ReportView], html: Renderer, pdf: Renderer, *, created: str) -> list[Resource]:
    """HTML then PDF for each view (French first), each with size and SHA-1 hash of its bytes."""
    forms = []
    for view in views:
        for content_type, render, suffix in (("text/html", html, "html"), ("application/pdf", pdf, "pdf")):
            data = render(view)
            forms.append({
                "contentType": content_type,
                "language": view.language,
                "data": base64.b64encode(data).decode("ascii"),
                "size": len(data),
                "hash": base64.b64encode(hashlib.sha1(data).digest()).decode("ascii"),  # noqa: S324 - R4 asks SHA-1
                "title": f"second-opinion-{view.report_id}-v{view.version}-{view.language}.{suffix}",
                "creation": created,
            })
    return forms


def form_bytes(report: Resource, content_type: str, language: str = "fr") -> bytes | None:
    """The bytes of one rendering of a stored report (None when it has none)."""
    for form in report.get("presentedForm", []) or []:
        if form.get("contentType") == content_type and form.get("language") == language and form.get("data"):
            return base64.b64decode(form["data"])
    return None


def _question(request: Resource) -> str | None:
    texts = [str(c.get("text")) for c in request.get("reasonCode", []) or [] if c.get("text")]
    notes = [str(n.get("text")) for n in request.get("note", []) or [] if n.get("text")]
    return "\n".join(texts) or (notes[0] if notes and not texts else None)


def _plan(request: Resource) -> str | None:
    notes = [str(n.get("text")) for n in request.get("note", []) or [] if n.get("text")]
    if not request.get("reasonCode"):
        notes = notes[1:]
    return "\n".join(notes) or None


def _person(reference: Resource, registry: ReviewerRegistry, terminology: Terminology, language: str) -> str:
    ident = str(reference.get("reference", "")).rpartition("/")[2]
    reviewer = registry.reviewers.get(ident)
    name = str(reference.get("display") or (reviewer.display if reviewer else ident))
    discipline = next(iter(sorted(reviewer.disciplines)), None) if reviewer else None
    if discipline:
        return f"{name} — {terminology.display(f'{CANONICAL_BASE}/CodeSystem/discipline', discipline, language)}"
    return name


def _dissent(dissent: Dissent, registry: ReviewerRegistry, terminology: Terminology, language: str) -> DissentView:
    return DissentView(
        member=_person({"reference": dissent.member, "display": dissent.display}, registry, terminology, language),
        diagnosis=terminology.display(OPINION, dissent.content.diagnosis, language) if dissent.content.diagnosis
        else None,
        treatment_plan=terminology.display(OPINION, dissent.content.treatment_plan, language)
        if dissent.content.treatment_plan else None,
        conclusion=dissent.content.conclusion,
    )


__all__ = ["LANGUAGES", "RENDERED_STATUSES", "form_bytes", "presented_forms", "report_view"]

"""The opinion as a reader sees it, in one language: what the HTML and PDF renderings are made from.

Every string here is already in the target language (code displays from the CodeSystem designations in
``mappings/``) and already chosen, so the renderers only lay it out. It holds no patient name: the rendered
report identifies the patient by the identifier the opinion names (the INS), as the DiagnosticReport does.
The headings and labels the renderers need travel with the view (:attr:`ReportView.labels`, from
``config/report-labels.json`` as the settings name it): a rendering stays a pure function of its view, and no
renderer reads a file of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

LANGUAGES = ("fr", "en")
#: language → label key → text (``config/report-labels.json``, checked by
#: :func:`fhir_bridge.rendering.layout.report_labels_from`)
ReportLabels = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class DissentView:
    member: str  # "Dr Luc Bernard — Radiologist"
    diagnosis: str | None  # the member's answer, labelled
    treatment_plan: str | None
    conclusion: str | None


@dataclass(frozen=True)
class ReportView:
    """One language's view of a final (or amended, corrected, appended) opinion."""

    language: str  # "fr" or "en"
    report_id: str
    version: str
    status: str  # the DiagnosticReport.status code
    status_label: str
    issued: str  # FHIR instant
    patient: str  # "INS-NIR 165113523882658" (the opinion's subject identifier, labelled)
    specialty: str | None = None
    panel: str | None = None  # the CareTeam's name when a panel gave the opinion
    consensus_method: str | None = None  # labelled
    clinical_question: str | None = None
    proposed_plan: str | None = None
    requester: str | None = None
    requested_on: str | None = None
    interpreters: tuple[str, ...] = ()  # "Dr Claire Martin — Medical oncologist"
    organisations: tuple[str, ...] = ()
    diagnosis: str | None = None  # labelled answers
    treatment_plan: str | None = None
    alternatives: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    risk_benefit: str | None = None
    conclusion: str | None = None
    conclusion_codes: tuple[str, ...] = ()  # "C34.1 (CIM-10) — Tumeur maligne du lobe supérieur"
    dissents: tuple[DissentView, ...] = ()
    replaces: str | None = None  # for an amendment: "version 1 issued 2026-12-01T10:00:00Z"
    #: every language's labels (the renderer picks ``language``'s, and refuses a language it has none for);
    #: left out of equality and repr: the same for every view of a process
    labels: ReportLabels = field(kw_only=True, compare=False, repr=False)

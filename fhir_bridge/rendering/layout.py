"""What a rendering of a second opinion shows, and in which order: decided once, for both formats.

The HTML (:mod:`fhir_bridge.rendering.html`) and the PDF (:mod:`fhir_bridge.rendering.pdf`) renderings both
draw the :class:`Layout` of :func:`report_layout`, so they always carry the same sections, and empty parts of the
opinion are left out of both. Headings and labels are data (``config/report-labels.json``, ``fr`` and ``en``
with the same keys, read by :mod:`fhir_bridge.adapters.reference_data` and checked by
:func:`report_labels_from`), carried by the view, so no reader-facing wording lives in this code and no file is
read here. The status colours are shared too: a final opinion reads calm, a changed one draws the eye.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any

from fhir_bridge.rendering.view import LANGUAGES, ReportLabels, ReportView

ACCENT = "#1f4e8c"
#: banner colours by DiagnosticReport.status: a final opinion reads calm, a changed one draws the eye
_CHANGED = ("#8a4b00", "#fff4e0")
STATUS_COLOURS = {"final": ("#1e6b34", "#eaf5ed"), "amended": _CHANGED, "corrected": _CHANGED, "appended": _CHANGED}
OTHER_STATUS = ("#444444", "#f2f2f2")


@dataclass(frozen=True)
class Field:
    """One labelled value: a text (``text``) or a list (``items``); ``prominent`` for the conclusion."""

    label: str
    text: str | None = None
    items: tuple[str, ...] = ()
    prominent: bool = False


@dataclass(frozen=True)
class Section:
    heading: str
    fields: tuple[Field, ...] = ()
    subsections: tuple[Section, ...] = ()  # one per dissenting member


@dataclass(frozen=True)
class Layout:
    """What both renderings show, already in the view's language, empty parts removed."""

    language: str
    title: str
    status: str
    status_label: str
    banner: tuple[Field, ...]  # issued, version, report id
    notice: str | None  # "this version amends ..."
    sections: tuple[Section, ...]
    footer: str
    running_footer: str  # on every PDF page, so a detached page still names its patient and report
    page: str  # "Page {page} of {pages}"


def report_labels_from(raw: Any, file: str = "report-labels.json") -> ReportLabels:
    """The parsed labels file (``file`` names it in errors), checked once at start-up: every language must
    have the same keys, all strings (a missing translation must fail at start-up, not show up as a blank
    heading in a patient's record)."""
    if not isinstance(raw, dict) or set(raw) != set(LANGUAGES):
        raise ValueError(f"{file}: expected exactly the languages {LANGUAGES}")
    keys = set(raw[LANGUAGES[0]])
    for language in LANGUAGES:
        table = raw[language]
        if not isinstance(table, dict) or set(table) != keys or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"{file}: '{language}' must have the same string labels as '{LANGUAGES[0]}'")
    return MappingProxyType({lang: MappingProxyType(dict(raw[lang])) for lang in LANGUAGES})


def labels_for(labels: ReportLabels, language: str) -> Mapping[str, str]:
    """``language``'s labels; ValueError for a language the labels do not have."""
    if language not in labels:
        raise ValueError(f"no report labels for language {language!r}")
    return labels[language]


def format_instant(value: str, language: str, labels: ReportLabels) -> str:
    """A FHIR instant/dateTime shown readably in UTC ("06/12/2026 14:05 UTC" in fr, "2026-12-06 14:05 UTC" in
    en, the formats being labels); a full date as a date; anything else (partial dates, values without a zone)
    as given."""
    formats = labels_for(labels, language)
    try:
        if len(value) == 10:
            return date.fromisoformat(value).strftime(formats["date_format"])
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        return value
    return moment.astimezone(UTC).strftime(formats["datetime_format"])


def _field(label: str, value: str | None, *, prominent: bool = False) -> tuple[Field, ...]:
    return (Field(label, text=value, prominent=prominent),) if value and value.strip() else ()


def _items(label: str, values: tuple[str, ...]) -> tuple[Field, ...]:
    kept = tuple(v for v in values if v.strip())
    return (Field(label, items=kept),) if kept else ()


def report_layout(view: ReportView) -> Layout:
    """The report's content in reading order, shared by the HTML and the PDF rendering."""
    lab = labels_for(view.labels, view.language)
    request = (
        *_field(lab["patient"], view.patient),
        *_field(lab["specialty"], view.specialty),
        *_field(lab["clinical_question"], view.clinical_question),
        *_field(lab["proposed_plan"], view.proposed_plan),
        *_field(lab["requester"], view.requester),
        *_field(lab["requested_on"], view.requested_on and format_instant(view.requested_on, view.language,
                                                                       view.labels)),
    )
    opinion = (
        *_field(lab["diagnosis"], view.diagnosis),
        *_field(lab["treatment_plan"], view.treatment_plan),
        *_items(lab["alternatives"], view.alternatives),
        *_items(lab["tests"], view.tests),
        *_field(lab["risk_benefit"], view.risk_benefit),
        *_field(lab["conclusion"], view.conclusion, prominent=True),
        *_items(lab["conclusion_codes"], view.conclusion_codes),
    )
    authors = (
        *_field(lab["panel"], view.panel),
        *_field(lab["consensus_method"], view.consensus_method),
        *_items(lab["interpreters"], view.interpreters),
        *_items(lab["organisations"], view.organisations),
    )
    dissents = tuple(
        Section(
            d.member,
            (
                *_field(lab["diagnosis"], d.diagnosis),
                *_field(lab["treatment_plan"], d.treatment_plan),
                *_field(lab["conclusion"], d.conclusion),
            ),
        )
        for d in view.dissents
    )
    sections = (
        Section(lab["section_request"], request),
        Section(lab["section_opinion"], opinion),
        Section(lab["section_authors"], authors),
        Section(lab["section_dissents"], subsections=dissents),
    )
    ids = {"report_id": view.report_id, "version": view.version, "patient": view.patient}
    return Layout(
        language=view.language,
        title=lab["title_panel"] if view.panel else lab["title"],
        status=view.status,
        status_label=view.status_label,
        banner=(
            *_field(lab["issued"], format_instant(view.issued, view.language, view.labels)),
            *_field(lab["version"], view.version),
            *_field(lab["report_id"], view.report_id),
        ),
        notice=lab["replaces"].format(replaces=view.replaces) if view.replaces else None,
        sections=tuple(s for s in sections if s.fields or s.subsections),
        footer=lab["footer"].format(**ids),
        running_footer=lab["running_footer"].format(**ids),
        page=lab["page"],
    )

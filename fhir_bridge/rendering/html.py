"""The HTML rendering of a second opinion (one of the ``DiagnosticReport.presentedForm`` attachments).

A clinician opens it in a medical record viewer, a patient may get it by secure email: so the document is a
single self-contained UTF-8 HTML5 file with no script, no image, no link and no external resource, styled by
``style`` attributes only (strict email clients drop ``<style>`` blocks and remote CSS). Every value from the
view is HTML-escaped, so a conclusion reading ``<script>`` shows as text; line breaks a physician typed are kept
as ``<br>``.

What is shown and in which order is decided once, in :func:`report_layout`, which the PDF rendering
(:mod:`fhir_bridge.rendering.pdf`) shares: both formats always carry the same sections, and empty parts of the
opinion are left out of both. Headings and labels are data (``config/report-labels.json``, ``fr`` and ``en``
with the same keys, read by :mod:`fhir_bridge.adapters.reference_data` and checked by
:func:`report_labels_from`), carried by the view, so no reader-facing wording lives in this code and no file is
read here. The output is a pure function of the view:
the same view gives the same bytes, which lets the attachment's hash and size be stable across retries.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any

from fhir_bridge.rendering.view import LANGUAGES, ReportLabels, ReportView

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


# --- HTML -------------------------------------------------------------------------------------------------

_ACCENT = "#1f4e8c"
#: banner colours by DiagnosticReport.status: a final opinion reads calm, a changed one draws the eye
_CHANGED = ("#8a4b00", "#fff4e0")
STATUS_COLOURS = {"final": ("#1e6b34", "#eaf5ed"), "amended": _CHANGED, "corrected": _CHANGED, "appended": _CHANGED}
OTHER_STATUS = ("#444444", "#f2f2f2")

_S = {
    "body": "margin:0;padding:24px 16px;background:#ffffff;color:#1a1a1a;"
    "font-family:Arial,Helvetica,sans-serif;font-size:15px;line-height:1.5",
    "main": "max-width:760px;margin:0 auto",
    "h1": f"font-size:24px;line-height:1.25;margin:0 0 14px;color:{_ACCENT}",
    "h2": f"font-size:18px;margin:28px 0 10px;padding-bottom:4px;border-bottom:2px solid {_ACCENT};color:{_ACCENT}",
    "h3": "font-size:16px;margin:0 0 6px;color:#8a4b00",
    "dl": "margin:0",
    "dt": "font-weight:bold;margin:12px 0 2px;color:#333333",
    "dd": "margin:0 0 0 0",
    "ul": "margin:0;padding-left:22px",
    "conclusion": f"margin:16px 0;padding:12px 16px;border-left:5px solid {_ACCENT};background:#eef3fb",
    "conclusion_label": f"font-weight:bold;margin:0 0 4px;color:{_ACCENT}",
    "conclusion_text": "font-size:17px;margin:0",
    "dissent": "margin:14px 0;padding:4px 0 4px 14px;border-left:3px solid #8a4b00",
    "notice": "margin:8px 0 0;font-weight:bold",
    "footer": "margin-top:32px;padding-top:8px;border-top:1px solid #cccccc;font-size:12px;color:#555555",
}


def _text(value: str) -> str:
    """Escaped, control characters shown as U+FFFD (as a browser would), typed line breaks kept."""
    return "<br>".join(html.escape(_CONTROL.sub("\ufffd", line), quote=True) for line in value.splitlines())


def _html_field(field: Field) -> str:
    if field.prominent:
        return (
            f'<div style="{_S["conclusion"]}"><p style="{_S["conclusion_label"]}">{_text(field.label)}</p>'
            f'<p style="{_S["conclusion_text"]}">{_text(field.text or "")}</p></div>'
        )
    if field.items:
        lis = "".join(f"<li>{_text(item)}</li>" for item in field.items)
        value = f'<ul style="{_S["ul"]}">{lis}</ul>'
    else:
        value = _text(field.text or "")
    label = f'<dt style="{_S["dt"]}">{_text(field.label)}</dt>'
    return f'<dl style="{_S["dl"]}">{label}<dd style="{_S["dd"]}">{value}</dd></dl>'


def _html_section(section: Section) -> str:
    parts = [f'<section><h2 style="{_S["h2"]}">{_text(section.heading)}</h2>']
    parts += [_html_field(f) for f in section.fields]
    for sub in section.subsections:
        fields = "".join(_html_field(f) for f in sub.fields)
        parts.append(
            f'<article style="{_S["dissent"]}"><h3 style="{_S["h3"]}">{_text(sub.heading)}</h3>{fields}</article>'
        )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(view: ReportView) -> bytes:
    """The report as a complete UTF-8 HTML5 document; the full text is kept, whatever its script."""
    layout = report_layout(view)
    colour, background = STATUS_COLOURS.get(layout.status, OTHER_STATUS)
    banner_style = f"margin:0 0 8px;padding:10px 14px;border:1px solid {colour};background:{background};color:#1a1a1a"
    details = " · ".join(f"{_text(f.label)} {_text(f.text or '')}" for f in layout.banner)
    notice = f'<p style="{_S["notice"]}">{_text(layout.notice)}</p>' if layout.notice else ""
    body = "\n".join(_html_section(s) for s in layout.sections)
    document = f"""<!DOCTYPE html>
<html lang="{html.escape(layout.language)}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_text(layout.title)} — {_text(view.report_id)}</title>
</head>
<body style="{_S["body"]}">
<main style="{_S["main"]}">
<h1 style="{_S["h1"]}">{_text(layout.title)}</h1>
<div style="{banner_style}"><strong style="color:{colour};font-size:17px">{_text(layout.status_label)}</strong>
<div>{details}</div>{notice}</div>
{body}
<footer style="{_S["footer"]}"><p style="margin:0">{_text(layout.footer)}</p></footer>
</main>
</body>
</html>
"""
    return document.encode("utf-8", "replace")

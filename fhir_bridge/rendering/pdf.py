"""The PDF rendering of a second opinion (one of the ``DiagnosticReport.presentedForm`` attachments).

Same content and order as the HTML (:func:`fhir_bridge.rendering.layout.report_layout`), laid out on A4 with
reportlab's platypus so that long texts wrap and flow onto further pages. Every page carries a running footer
with the patient identifier, the report id and version, and "page n of N": a printed page that comes loose
from the others still says whose report it is.

Why these choices:

* Fonts: the Bitstream Vera TTFs shipped inside reportlab, registered as one family and embedded (subset).
  The 14 standard PDF fonts only know Latin-1-ish encodings (no ``œ``, ``€``, ``’`` ... in every viewer), and
  a system font would make the bytes depend on the machine. Vera covers French typography (é è à ç œ Œ « » ’
  — € …) and ships with the dependency, so it is always there.
* Missing glyphs: a character Vera has no glyph for (CJK, emoji, most Greek ...) would print as an empty box
  or nothing at all, which in a medical text is worse than an obvious gap. Each such character is first tried
  in its compatibility form (NFKC, e.g. a narrow no-break space becomes a space, "ﬁ" becomes "fi") and else is
  replaced by a visible ``?``; invisible format characters (zero-width joiners, variation selectors) are
  dropped. The HTML rendering keeps the full text, so nothing is lost from the record.
* Determinism: the document is built with ``invariant=1`` so no creation timestamp nor random document id is
  written; the same view gives the same bytes (a stable hash for the attachment, byte-equal retries).
* Markup: reportlab's Paragraph reads a mini-markup, so every value is escaped (``<``, ``>``, ``&``) before
  it becomes a Paragraph; a conclusion reading ``<b>`` prints as text.
* Concurrency: builds are serialised by a lock: the registered fonts are process-wide objects holding
  per-document subset state, and reportlab does not promise thread safety (a build takes ~15 ms).
"""

from __future__ import annotations

import functools
import io
import threading
import unicodedata
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import reportlab  # type: ignore[import-untyped]
from reportlab.lib import colors  # type: ignore[import-untyped]
from reportlab.lib.pagesizes import A4  # type: ignore[import-untyped]
from reportlab.lib.styles import ParagraphStyle  # type: ignore[import-untyped]
from reportlab.lib.units import mm  # type: ignore[import-untyped]
from reportlab.pdfbase import pdfmetrics  # type: ignore[import-untyped]
from reportlab.pdfbase.ttfonts import TTFont  # type: ignore[import-untyped]
from reportlab.pdfgen.canvas import Canvas  # type: ignore[import-untyped]
from reportlab.platypus import CondPageBreak, Paragraph, SimpleDocTemplate, Spacer  # type: ignore[import-untyped]

from fhir_bridge.rendering.layout import ACCENT, OTHER_STATUS, STATUS_COLOURS, Field, Layout, Section, report_layout
from fhir_bridge.rendering.view import ReportView

SUBSTITUTE = "?"
FONT = "FhirBridgeVera"
_FONT_FILES = {
    FONT: "Vera.ttf",
    f"{FONT}-Bold": "VeraBd.ttf",
    f"{FONT}-Italic": "VeraIt.ttf",
    f"{FONT}-BoldItalic": "VeraBI.ttf",
}
_MARGIN = 18 * mm
_ACCENT = colors.HexColor(ACCENT)
_AMBER = colors.HexColor("#8a4b00")
_GREY = colors.HexColor("#444444")
_KEEP = 90  # points: about a heading, a label and two lines
_BUILD_LOCK = threading.Lock()


@functools.cache
def _coverage() -> frozenset[int]:
    """Register the Vera family once; the code points every face of it has a glyph for."""
    directory = Path(reportlab.__file__).resolve().parent / "fonts"
    covered: set[int] | None = None
    for name, file in _FONT_FILES.items():
        font = TTFont(name, str(directory / file))
        pdfmetrics.registerFont(font)
        has = {code for code, glyph in font.face.charToGlyph.items() if glyph}
        covered = has if covered is None else covered & has
    pdfmetrics.registerFontFamily(
        FONT, normal=FONT, bold=f"{FONT}-Bold", italic=f"{FONT}-Italic", boldItalic=f"{FONT}-BoldItalic"
    )
    return frozenset(covered or ())


def printable(text: str) -> str:
    """``text`` with every character the fonts cannot draw replaced by ``?`` (see the module docstring)."""
    covered = _coverage()
    out: list[str] = []
    for char in unicodedata.normalize("NFC", text):
        if ord(char) in covered or char == "\n":
            out.append(char)
        elif char == "\t":
            out.append(" ")
        elif unicodedata.category(char) == "Cf" or 0xFE00 <= ord(char) <= 0xFE0F or 0xE0100 <= ord(char) <= 0xE01EF:
            continue
        else:
            compat = unicodedata.normalize("NFKC", char)
            out.append(compat if compat != char and all(ord(c) in covered for c in compat) else SUBSTITUTE)
    return "".join(out)


def _markup(text: str) -> str:
    """Paragraph mini-markup for a plain value: drawable, escaped, line breaks kept."""
    return "<br/>".join(escape(line) for line in printable(text).splitlines())


@functools.cache
def _styles() -> dict[str, Any]:
    """Paragraph styles; a ``-in`` variant of the field styles indents a dissenting member's answers."""
    _coverage()
    bold = f"{FONT}-Bold"
    base = ParagraphStyle("fb-body", fontName=FONT, fontSize=10.5, leading=14.5, textColor=colors.HexColor("#1a1a1a"))

    def style(name: str, **kw: Any) -> Any:
        return ParagraphStyle(f"fb-{name}", parent=base, **kw)

    styles = {
        "body": base,
        "title": style("title", fontName=bold, fontSize=17, leading=21, textColor=_ACCENT, spaceAfter=8),
        "h2": style("h2", fontName=bold, fontSize=13, leading=17, textColor=_ACCENT, spaceBefore=14, spaceAfter=2),
        "h3": style("h3", fontName=bold, fontSize=11.5, leading=15, textColor=_AMBER, spaceBefore=8, leftIndent=8),
        "label": style("label", fontName=bold, fontSize=9.5, leading=13, textColor=_GREY, spaceBefore=6),
        "item": style("item", leftIndent=14, bulletIndent=4, bulletFontName=FONT),
        "conclusion_label": style(
            "conclusion_label", fontName=bold, fontSize=11, leading=14, textColor=_ACCENT, spaceBefore=10, spaceAfter=6
        ),
        "conclusion": style(
            "conclusion",
            fontSize=12,
            leading=17,
            backColor=colors.HexColor("#eef3fb"),
            borderColor=_ACCENT,
            borderWidth=0.8,
            borderPadding=7,
            spaceAfter=8,
            leftIndent=7,
            rightIndent=7,
        ),
        "notice": style("notice", fontName=bold, textColor=_AMBER, spaceBefore=4),
        "footer": style("footer", fontSize=8.5, leading=11, textColor=_GREY, spaceBefore=18),
    }
    for name in ("label", "item", "body", "conclusion_label", "conclusion"):
        parent = styles[name]
        styles[f"{name}-in"] = ParagraphStyle(f"{parent.name}-in", parent=parent, leftIndent=parent.leftIndent + 8)
    return styles


def _field_flowables(field: Field, styles: dict[str, Any], suffix: str = "") -> list[Any]:
    label = "conclusion_label" if field.prominent else "label"
    flow = [Paragraph(_markup(field.label), styles[label + suffix])]
    if field.items:
        flow += [Paragraph(_markup(item), styles["item" + suffix], bulletText="•") for item in field.items]
    else:
        flow.append(
            Paragraph(_markup(field.text or ""), styles[("conclusion" if field.prominent else "body") + suffix])
        )
    return flow


def _section_flowables(section: Section, styles: dict[str, Any]) -> list[Any]:
    groups = [_field_flowables(field, styles) for field in section.fields]
    for sub in section.subsections:
        first, *rest = [_field_flowables(field, styles, "-in") for field in sub.fields] or [[]]
        groups += [[Paragraph(_markup(sub.heading), styles["h3"]), *first], *rest]
    groups[0].insert(0, Paragraph(_markup(section.heading), styles["h2"]))
    # A heading or label stays with the start of what follows: a new page when less than _KEEP is left. (Not
    # keepWithNext/KeepTogether: they move a whole long conclusion to the next page, leaving a blank page end.)
    return [flowable for group in groups for flowable in (CondPageBreak(_KEEP), *group)]


def _story(layout: Layout) -> list[Any]:
    styles = _styles()
    colour, background = STATUS_COLOURS.get(layout.status, OTHER_STATUS)
    banner = ParagraphStyle(
        "fb-banner",
        parent=styles["body"],
        backColor=colors.HexColor(background),
        borderColor=colors.HexColor(colour),
        borderWidth=0.8,
        borderPadding=6,
        leftIndent=6,
        rightIndent=6,
        spaceBefore=4,
        spaceAfter=10,
    )
    details = " · ".join(f"{_markup(f.label)} {_markup(f.text or '')}" for f in layout.banner)
    head = f'<font color="{colour}" size="12"><b>{_markup(layout.status_label)}</b></font><br/>{details}'
    story: list[Any] = [Paragraph(_markup(layout.title), styles["title"]), Spacer(0, 2), Paragraph(head, banner)]
    if layout.notice:
        story.append(Paragraph(_markup(layout.notice), styles["notice"]))
    for section in layout.sections:
        story += _section_flowables(section, styles)
    story.append(Paragraph(_markup(layout.footer), styles["footer"]))
    return story


class _NumberedCanvas(Canvas):  # type: ignore[misc]
    """Holds pages back until the end, so each can say "page n of N" in its running footer."""

    def __init__(self, *args: Any, running_footer: str, page: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running_footer = running_footer
        self._page_template = page
        self._pages: list[dict[str, Any]] = []

    def showPage(self) -> None:
        self._pages.append(dict(self.__dict__))
        self._startPage()

    def save(self) -> None:
        total = len(self._pages)
        for number, state in enumerate(self._pages, start=1):
            self.__dict__.update(state)
            self._draw_footer(number, total)
            super().showPage()
        super().save()

    def _draw_footer(self, number: int, total: int) -> None:
        width, _ = A4
        right = printable(self._page_template.format(page=number, pages=total))
        left = self._running_footer
        size = functools.partial(self.stringWidth, fontName=FONT, fontSize=8)
        self.saveState()
        self.setFont(FONT, 8)
        self.setFillColor(colors.HexColor("#555555"))
        room = width - 2 * _MARGIN - size(right) - 12
        if size(left) > room:
            while left and size(left + "…") > room:
                left = left[:-1]
            left += "…"
        self.drawString(_MARGIN, 10 * mm, left)
        self.drawRightString(width - _MARGIN, 10 * mm, right)
        self.setStrokeColor(colors.HexColor("#cccccc"))
        self.line(_MARGIN, 14 * mm, width - _MARGIN, 14 * mm)
        self.restoreState()


def render_pdf(view: ReportView) -> bytes:
    """The report as an A4 PDF. Characters the embedded Vera fonts cannot draw are shown as ``?``."""
    layout = report_layout(view)
    author = view.panel or "; ".join(view.interpreters)
    buffer = io.BytesIO()
    with _BUILD_LOCK:
        story = _story(layout)
        doc = SimpleDocTemplate(
            buffer,
            pagesize=A4,
            leftMargin=_MARGIN,
            rightMargin=_MARGIN,
            topMargin=_MARGIN,
            bottomMargin=22 * mm,
            title=layout.title,
            author=author,
            subject=layout.footer,
            creator="fhir-bridge",
            keywords="",
            invariant=1,
            lang=layout.language,
        )
        maker = functools.partial(_NumberedCanvas, running_footer=printable(layout.running_footer), page=layout.page)
        doc.build(story, canvasmaker=maker)
    return buffer.getvalue()

"""The HTML rendering of a second opinion (one of the ``DiagnosticReport.presentedForm`` attachments).

A clinician opens it in a medical record viewer, a patient may get it by secure email: so the document is a
single self-contained UTF-8 HTML5 file with no script, no image, no link and no external resource, styled by
``style`` attributes only (strict email clients drop ``<style>`` blocks and remote CSS). Every value from the
view is HTML-escaped, so a conclusion reading ``<script>`` shows as text; line breaks a physician typed are kept
as ``<br>``.

What is shown and in which order is :func:`fhir_bridge.rendering.layout.report_layout`'s, which the PDF
rendering shares. The output is a pure function of the view:
the same view gives the same bytes, which lets the attachment's hash and size be stable across retries.
"""

from __future__ import annotations

import html
import re

from fhir_bridge.rendering.layout import ACCENT, OTHER_STATUS, STATUS_COLOURS, Field, Section, report_layout
from fhir_bridge.rendering.view import ReportView

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_S = {
    "body": "margin:0;padding:24px 16px;background:#ffffff;color:#1a1a1a;"
    "font-family:Arial,Helvetica,sans-serif;font-size:15px;line-height:1.5",
    "main": "max-width:760px;margin:0 auto",
    "h1": f"font-size:24px;line-height:1.25;margin:0 0 14px;color:{ACCENT}",
    "h2": f"font-size:18px;margin:28px 0 10px;padding-bottom:4px;border-bottom:2px solid {ACCENT};color:{ACCENT}",
    "h3": "font-size:16px;margin:0 0 6px;color:#8a4b00",
    "dl": "margin:0",
    "dt": "font-weight:bold;margin:12px 0 2px;color:#333333",
    "dd": "margin:0 0 0 0",
    "ul": "margin:0;padding-left:22px",
    "conclusion": f"margin:16px 0;padding:12px 16px;border-left:5px solid {ACCENT};background:#eef3fb",
    "conclusion_label": f"font-weight:bold;margin:0 0 4px;color:{ACCENT}",
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

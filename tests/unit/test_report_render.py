"""The HTML and PDF renderings of a second opinion (fhir_bridge.rendering.html, fhir_bridge.rendering.pdf)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from pypdf import PdfReader

from fhir_bridge.adapters.reference_data import load_labels
from fhir_bridge.rendering.html import render_html
from fhir_bridge.rendering.layout import format_instant as format_instant_with
from fhir_bridge.rendering.pdf import SUBSTITUTE, printable, render_pdf
from fhir_bridge.rendering.view import DissentView, ReportView
from tests.reference import LABELS_FILE

LABELS = load_labels()
format_instant = functools.partial(format_instant_with, labels=LABELS)  # the labels carry the date formats
CONCLUSION_FR = "Chimio-immunothérapie néoadjuvante puis réévaluation à 3 mois ; chirurgie d’emblée non recommandée."

FR = ReportView(
    language="fr",
    report_id="dr-7f3a",
    version="2",
    status="amended",
    status_label="Modifié",
    issued="2026-12-06T15:05:00+01:00",
    patient="INS-NIR 165113523882658",
    specialty="Oncologie thoracique",
    panel="RCP thoracique — CHU de Lyon",
    consensus_method="Consensus",
    clinical_question="Faut-il opérer d’emblée ?\nPatient de 72 ans, BPCO.",
    proposed_plan="Lobectomie supérieure droite",
    requester="Dr Anne Petit — Pneumologue",
    requested_on="2026-12-01T09:00:00Z",
    interpreters=("Dr Claire Martin — Oncologue médicale",),
    organisations=("CHU de Lyon",),
    diagnosis="Accord complet",
    treatment_plan="Plan à modifier",
    alternatives=("Radiothérapie stéréotaxique",),
    tests=("TEP-TDM", "EBUS"),
    risk_benefit="Bénéfice attendu supérieur au risque « opératoire ».",
    conclusion=CONCLUSION_FR,
    conclusion_codes=("C34.1 (CIM-10) — Tumeur maligne du lobe supérieur",),
    dissents=(
        DissentView("Dr Luc Bernard — Radiologue", "Désaccord partiel", "Plan acceptable", "Chirurgie d’emblée"),
    ),
    replaces="version 1 émise le 01/12/2026 10:00 UTC",
    labels=LABELS,
)
EN = dataclasses.replace(
    FR,
    language="en",
    status="final",
    status_label="Final",
    specialty="Thoracic oncology",
    diagnosis="Full agreement",
    conclusion="Neoadjuvant chemo-immunotherapy, then reassessment at 3 months.",
    dissents=(DissentView("Dr Luc Bernard — Radiologist", "Partial disagreement", None, "Upfront surgery"),),
    replaces=None,
)
MINIMAL = ReportView(
    language="fr",
    report_id="dr-1",
    version="1",
    status="final",
    status_label="Définitif",
    issued="2026-12-06T14:05:00Z",
    patient="INS-NIR 1",
    labels=LABELS,
)


def pdf_text(pdf: bytes) -> str:
    """All pages' text, whitespace collapsed (lines wrap wherever the layout decides)."""
    return " ".join(" ".join(page.extract_text().split()) for page in PdfReader(io.BytesIO(pdf)).pages)


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(document: bytes) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(document.decode("utf-8"))
    return parser.tags


@pytest.fixture(scope="module")
def fr_pdf() -> bytes:
    return render_pdf(FR)


def test_french_and_english_render_with_their_own_headings(fr_pdf: bytes) -> None:
    fr, en = render_html(FR).decode(), render_html(EN).decode()
    assert '<html lang="fr">' in fr and '<meta charset="utf-8">' in fr
    assert '<html lang="en">' in en
    for heading in (
        "Avis de RCP (réunion de concertation pluridisciplinaire)",
        "Patient et demande",
        "Avis divergents",
    ):
        assert heading in fr and heading not in en
    for heading in ("Multidisciplinary panel opinion", "Patient and request", "Dissenting opinions"):
        assert heading in en and heading not in fr
    assert "Avis divergents" in pdf_text(fr_pdf)
    assert "Dissenting opinions" in pdf_text(render_pdf(EN))


def test_labels_file_has_the_same_keys_in_french_and_english() -> None:
    labels = json.loads(LABELS_FILE.read_text(encoding="utf-8"))
    assert set(labels) == {"fr", "en"} and set(labels["fr"]) == set(labels["en"])


def test_a_single_reviewer_opinion_has_the_second_opinion_title() -> None:
    assert "<h1" in (html := render_html(MINIMAL).decode()) and "Avis médical de second recours</h1>" in html
    assert "Medical second opinion" in render_html(dataclasses.replace(MINIMAL, language="en")).decode()


def test_issued_instant_is_shown_readably_in_utc_per_language() -> None:
    assert "06/12/2026 14:05 UTC" in render_html(FR).decode()
    assert "2026-12-06 14:05 UTC" in render_html(EN).decode()
    assert format_instant("2026-12-01", "fr") == "01/12/2026"
    assert format_instant("2026-12", "en") == "2026-12"  # a partial date is shown as given


def test_an_amendment_says_which_version_it_replaces(fr_pdf: bytes) -> None:
    notice = "Cette version modifie et remplace la version précédente (version 1 émise le 01/12/2026 10:00 UTC)."
    assert notice in render_html(FR).decode()
    assert notice in pdf_text(fr_pdf)
    assert "amends" not in render_html(EN).decode()


def test_html_escapes_hostile_text_and_has_no_script_nor_external_resource() -> None:
    hostile = dataclasses.replace(
        FR,
        conclusion="<script>alert(1)</script> & \"quoted\" 'single'",
        dissents=(DissentView('<img src="http://evil.example/x.png">', None, None, "<a href=http://evil>x</a>"),),
    )
    document = render_html(hostile).decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quoted&quot; &#x27;single&#x27;" in document
    assert "<script" not in document.lower()
    tags = tags_of(render_html(hostile))
    allowed = "html head meta title body main h1 h2 h3 div strong p section dl dt dd ul li br article footer"
    assert {tag for tag, _ in tags} <= set(allowed.split())
    assert not [attrs for _, attrs in tags if {"src", "href"} & set(attrs)]


def test_html_keeps_typed_line_breaks() -> None:
    assert "Faut-il opérer d’emblée ?<br>Patient de 72 ans, BPCO." in render_html(FR).decode()


def test_pdf_shows_the_conclusion_with_accents_and_the_dissenting_member(fr_pdf: bytes) -> None:
    assert fr_pdf.startswith(b"%PDF-")
    text = pdf_text(fr_pdf)
    assert CONCLUSION_FR in text
    assert "Dr Luc Bernard — Radiologue" in text
    assert "Document généré par fhir-bridge à partir du DiagnosticReport dr-7f3a version 2." in text


def test_pdf_metadata_has_title_and_language_and_no_invented_author(fr_pdf: bytes) -> None:
    reader = PdfReader(io.BytesIO(fr_pdf))
    assert reader.metadata is not None
    assert reader.metadata.title == "Avis de RCP (réunion de concertation pluridisciplinaire)"
    assert reader.metadata.author == "RCP thoracique — CHU de Lyon"
    assert str(reader.root_object["/Lang"]) == "fr"


def test_pdf_first_page_is_a_non_blank_a4_image(fr_pdf: bytes, tmp_path: Path) -> None:
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    (source := tmp_path / "report.pdf").write_bytes(fr_pdf)
    subprocess.run(
        [pdftoppm, "-png", "-r", "40", "-f", "1", "-l", "1", "-singlefile", str(source), str(tmp_path / "page")],
        check=True,
        timeout=30,
    )
    with Image.open(tmp_path / "page.png") as page:
        width, height = page.size
        grey = page.convert("L")
        dark = sum(grey.histogram()[:160])
    assert abs(height / width - 297 / 210) < 0.01
    assert dark > 0.01 * width * height  # text, rules and boxes: not a blank page


def test_same_view_gives_the_same_bytes(fr_pdf: bytes) -> None:
    assert render_html(FR) == render_html(FR)
    render_pdf(EN)  # another document in between must leave nothing behind
    assert render_pdf(FR) == fr_pdf


def test_a_long_conclusion_flows_onto_further_pages() -> None:
    paragraph = "Surveillance clinique et radiologique rapprochée, à réévaluer en RCP. " * 8
    long_text = "\n".join([paragraph] * 15) + "\nFIN DE LA CONCLUSION"
    assert len(long_text) > 8000
    pdf = render_pdf(dataclasses.replace(FR, conclusion=long_text))
    pages = PdfReader(io.BytesIO(pdf)).pages
    assert len(pages) >= 3
    assert "FIN DE LA CONCLUSION" not in pages[0].extract_text()
    assert "FIN DE LA CONCLUSION" in pdf_text(pdf)
    assert "Page 1 sur " in pages[0].extract_text()


def test_unsupported_glyphs_show_as_a_substitute_in_the_pdf_and_in_full_in_the_html() -> None:
    view = dataclasses.replace(FR, conclusion="Voir 漢字 🙂 et β-HCG.")
    text = pdf_text(render_pdf(view))
    assert f"Voir {SUBSTITUTE * 2} {SUBSTITUTE} et {SUBSTITUTE}-HCG." in text
    assert "漢" not in text
    assert "Voir 漢字 🙂 et β-HCG." in render_html(view).decode()


def test_printable_keeps_what_vera_can_draw() -> None:
    assert printable("é è à ç œ Œ « » ’ — € …") == "é è à ç œ Œ « » ’ — € …"
    assert printable("e\u0301") == "é"  # decomposed accent, composed
    assert printable("27\u202f%") == "27 %"  # narrow no-break space, by its compatibility form
    assert printable("👍\ufe0f a\u200db") == "? ab"  # variation selector and zero-width joiner are invisible


def test_paragraph_markup_in_values_is_printed_as_text() -> None:
    view = dataclasses.replace(FR, conclusion='<b>gras</b> & <font size="40">x</font> <br/>')
    assert '<b>gras</b> & <font size="40">x</font> <br/>' in pdf_text(render_pdf(view))


def test_empty_optional_parts_are_left_out() -> None:
    document = render_html(MINIMAL).decode()
    for absent in ("Avis divergents", "Auteurs de l’avis", "Conclusion", "Spécialité", "<ul", "<article", "modifie"):
        assert absent not in document
    assert "Patient et demande" in document and "INS-NIR 1" in document
    text = pdf_text(render_pdf(MINIMAL))
    assert "Avis divergents" not in text and "Conclusion" not in text and "INS-NIR 1" in text


def test_an_unknown_language_is_refused() -> None:
    with pytest.raises(ValueError, match="language"):
        render_html(dataclasses.replace(FR, language="de"))


def test_a_typical_report_renders_quickly(fr_pdf: bytes) -> None:
    start = time.perf_counter()
    for _ in range(5):
        render_html(FR)
        render_pdf(FR)
    assert (time.perf_counter() - start) / 5 < 0.5  # ~15 ms measured; generous for a loaded CI machine

"""The sandbox's attachment bytes: valid PDFs, CDA R2 documents, French text, big streamed PDFs."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from datetime import UTC, date, datetime

import pytest
from lxml import etree
from pypdf import PdfReader

from fhir_bridge.sandbox.content import (
    BigContent,
    Rendering,
    cda_document,
    damaged,
    pdf_document,
    rechunk,
    text_document,
)

DOC = Rendering(
    title="Compte rendu de RCP (sein) — 3 (bis)",
    lines=("Réunion du 12/03/2025 : dossier de Hélène Lefèvre.", "Proposition : chimiothérapie \\ néoadjuvante."),
    created=datetime(2025, 3, 12, 14, 30, tzinfo=UTC),
    uid="2.25.123456789",
    type_code="34794-8",
    type_display="CR de réunion de concertation pluridisciplinaire",
    confidentiality="N",
    patient_given="Hélène",
    patient_family="Lefèvre",
    patient_gender="female",
    patient_birth_date=date(1961, 4, 2),
    patient_local_id="pat-0001",
    author_given="Amélie",
    author_family="Rousseau",
    author_id="899900000001",
    organization="Institut de cancérologie Marie-Thérèse Aubrac",
)
_SAFE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


def test_pdf_is_a_valid_pdf_showing_french_text() -> None:
    data = pdf_document(DOC)
    assert data.startswith(b"%PDF-1.4\n") and data.rstrip().endswith(b"%%EOF")
    reader = PdfReader(io.BytesIO(data), strict=True)  # strict: wrong xref offsets would fail here
    text = reader.pages[0].extract_text()
    assert "Hélène Lefèvre" in text and "chimiothérapie \\ néoadjuvante" in text
    assert reader.metadata is not None and reader.metadata.title == DOC.title


def test_pdf_xref_offsets_point_at_their_objects() -> None:
    data = pdf_document(DOC)
    xref_at = data.rindex(b"\nxref\n") + 1
    xref = data[xref_at:]
    offsets = [int(line[:10]) for line in xref.split(b"\n")[3:9]]
    for number, offset in enumerate(offsets, start=1):
        assert data[offset:].startswith(b"%d 0 obj" % number)
    assert int(data.split(b"startxref\n")[1].split(b"\n")[0]) == xref_at


def test_cda_is_an_hl7_v3_clinical_document_with_a_text_body() -> None:
    root = etree.fromstring(cda_document(DOC), _SAFE_PARSER)
    ns = {"v3": "urn:hl7-org:v3"}
    assert root.tag == "{urn:hl7-org:v3}ClinicalDocument"
    assert [e.get("code") for e in root.findall("v3:code", ns)] == ["34794-8"]
    assert [e.get("root") for e in root.findall("v3:id", ns)] == [DOC.uid]
    given = root.find(".//v3:recordTarget//v3:given", ns)
    assert given is not None and given.text == "Hélène"
    body = root.find(".//v3:nonXMLBody/v3:text", ns)
    assert body is not None and body.get("mediaType") == "text/plain" and body.get("representation") == "B64"
    assert "néoadjuvante" in base64.b64decode(body.text or "").decode("utf-8")


def test_text_is_french_utf8() -> None:
    text = text_document(DOC).decode("utf-8")
    assert text.startswith(DOC.title) and "Réunion du 12/03/2025" in text and "Dr Amélie Rousseau" in text


@pytest.mark.parametrize("size", [4096, 9_998, 9_999, 10_000, 10_001, 99_999, 100_000, 1_000_000, 1_234_567])
def test_big_pdf_is_exactly_the_size_asked_and_parses(size: int) -> None:
    big = BigContent(doc=DOC, seed=42, size=size)
    data = b"".join(big.chunks(7_777))
    assert len(data) == size
    assert data.startswith(b"%PDF-1.4") and data.endswith(b"%%EOF\n")
    if size in (4096, 100_000):
        reader = PdfReader(io.BytesIO(data), strict=True)
        assert "Hélène" in reader.pages[0].extract_text()


def test_big_pdf_is_deterministic_and_seed_dependent() -> None:
    a = BigContent(doc=DOC, seed=1, size=300_000)
    assert a.digest() == BigContent(doc=DOC, seed=1, size=300_000).digest()
    assert a.digest() != replace(a, seed=2).digest()


def test_damage_keeps_the_length_or_cuts_the_transfer() -> None:
    data = bytes(range(256)) * 40
    altered = b"".join(damaged(rechunk(data, 1000), len(data), corrupt=True, truncate_to=None))
    assert len(altered) == len(data) and altered != data
    cut = b"".join(damaged(rechunk(data, 1000), len(data), corrupt=False, truncate_to=3333))
    assert cut == data[:3333]

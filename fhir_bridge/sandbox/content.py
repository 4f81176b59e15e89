"""The bytes behind the sandbox's attachments: small valid PDFs, French plain text, CDA R2 documents, and big
PDFs that are streamed and never held whole in memory.

Everything here is a pure function of its inputs, so the same world seed gives the same bytes and hashes.
No attachment ever carries the NIR: the CDA header identifies the patient by the sandbox's local id only,
because an attachment is forwarded to reviewers and the INS travels in the FHIR metadata (STANDARDS.md §2).

* PDF: a hand-written PDF 1.4 (one page, Helvetica in WinAnsiEncoding so French accents show, an Info
  dictionary, a cross-reference table with exact byte offsets) — no PDF library needed to write it.
* CDA: a CDA R2 ``ClinicalDocument`` (``urn:hl7-org:v3``) with a non-XML body, the IHE XDS-SD form that the
  French CI-SIS calls "CDA N1" (format code ``urn:ihe:iti:xds-sd:text:2008``).
* Big documents: a valid PDF whose last object is one stream of ``n`` bytes of a deterministic pattern;
  its prefix and suffix are computed so the whole file is exactly the size asked for.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from functools import cached_property
from itertools import chain

from lxml import etree

PDF = "application/pdf"
TEXT = "text/plain"
CDA = "application/xml"
CONTENT_TYPES = {"pdf": PDF, "text": TEXT, "cda": CDA}

_BLOCK = 64 * 1024
_HL7 = "urn:hl7-org:v3"
_LOINC_OID = "2.16.840.1.113883.6.1"
_IDNAT_PS_OID = "1.2.250.1.71.4.2.1"  # national health-professional identifier (RPPS/ADELI based)
#: assigning authority of the sandbox's local patient ids: a UUID-derived OID (arc 2.25), no registration needed
SANDBOX_PATIENT_ID_ROOT = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://fhir-bridge.dev/sandbox/patient').int}"


@dataclass(frozen=True, slots=True)
class Rendering:
    """What a document says and who it is about: the input of every content generator."""

    title: str
    lines: tuple[str, ...]
    created: datetime
    uid: str  # the document's unique id (an OID); CDA ClinicalDocument/id and the PDF file identifier
    type_code: str
    type_display: str
    confidentiality: str
    patient_given: str
    patient_family: str
    patient_gender: str
    patient_birth_date: date
    patient_local_id: str
    author_given: str
    author_family: str
    author_id: str
    organization: str


def render(kind: str, doc: Rendering) -> bytes:
    """The bytes of a small document of ``kind`` (``pdf``, ``text`` or ``cda``)."""
    if kind == "pdf":
        return pdf_document(doc)
    if kind == "text":
        return text_document(doc)
    if kind == "cda":
        return cda_document(doc)
    raise ValueError(f"unknown content kind {kind!r}")


def sha1_b64(data: bytes) -> str:
    """FHIR ``Attachment.hash``: the base64 of the SHA-1 digest (R4 datatypes.html#Attachment)."""
    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode("ascii")


# -- plain text ---------------------------------------------------------------------------------------


def _signed_lines(doc: Rendering) -> list[str]:
    return [
        doc.title,
        "",
        *doc.lines,
        "",
        f"Dr {doc.author_given} {doc.author_family} — {doc.organization}",
        f"Document établi le {doc.created:%d/%m/%Y à %H:%M}.",
    ]


def text_document(doc: Rendering) -> bytes:
    """A French plain-text report, UTF-8, lines ending in LF."""
    return ("\n".join(_signed_lines(doc)) + "\n").encode("utf-8")


# -- PDF ----------------------------------------------------------------------------------------------


def _pdf_literal(text: str) -> bytes:
    """A PDF literal string in WinAnsiEncoding (cp1252 covers French), with ``\\ ( )`` escaped."""
    raw = text.encode("cp1252", errors="replace")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _pdf_text_string(text: str) -> bytes:
    """A PDF text string for the Info dictionary: UTF-16BE with its byte-order mark, as a hex string."""
    return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode("ascii") + b">"


def _wrap(line: str, width: int = 95) -> list[str]:
    words, out, current = line.split(" "), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return out


def _page_objects(doc: Rendering) -> list[bytes]:
    """Objects 1-6 of every sandbox PDF: catalog, pages, page, content stream, font, info."""
    lines = [wrapped for line in _signed_lines(doc) for wrapped in _wrap(line)]
    ops = [b"BT", b"/F1 11 Tf", b"14 TL", b"50 790 Td"]
    for line in lines:
        ops.append(_pdf_literal(line) + b" Tj T*")
    ops.append(b"ET")
    stream = b"\n".join(ops)
    when = doc.created.strftime("D:%Y%m%d%H%M%SZ").encode("ascii")
    return [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 5 0 R >> >> "
        b"/Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
        b"<< /Title " + _pdf_text_string(doc.title) + b" /Producer (fhir-bridge sandbox) /CreationDate ("
        + when + b") >>",
    ]


_PDF_HEADER = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n"


def _pdf_body(objects: list[bytes]) -> tuple[bytes, list[int]]:
    out, offsets = bytearray(_PDF_HEADER), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    return bytes(out), offsets


def _pdf_trailer(offsets: list[int], xref_at: int, file_id: bytes) -> bytes:
    """Cross-reference table (entries exactly 20 bytes, PDF 1.4 §3.4.3) and trailer."""
    entries = [b"0000000000 65535 f \n"] + [b"%010d 00000 n \n" % off for off in offsets]
    ident = file_id.hex().upper().encode("ascii")
    return (
        b"xref\n0 %d\n" % (len(offsets) + 1)
        + b"".join(entries)
        + b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R /ID [<%s> <%s>] >>\n" % (len(offsets) + 1, ident, ident)
        + b"startxref\n%d\n%%%%EOF\n" % xref_at
    )


def _file_id(doc: Rendering) -> bytes:
    return hashlib.md5(doc.uid.encode("ascii"), usedforsecurity=False).digest()


def pdf_document(doc: Rendering) -> bytes:
    """A small, valid one-page PDF 1.4 showing the report's lines."""
    body, offsets = _pdf_body(_page_objects(doc))
    return body + _pdf_trailer(offsets, len(body), _file_id(doc))


# -- CDA ----------------------------------------------------------------------------------------------


def _hl7(tag: str) -> str:
    return f"{{{_HL7}}}{tag}"


def _sub(parent: etree._Element, tag: str, **attrs: str) -> etree._Element:
    return etree.SubElement(parent, _hl7(tag), attrs)


def _name(parent: etree._Element, given: str, family: str) -> None:
    name = _sub(parent, "name")
    _sub(name, "given").text = given
    _sub(name, "family").text = family


def cda_document(doc: Rendering) -> bytes:
    """A CDA R2 ClinicalDocument with a base64 plain-text non-XML body (IHE XDS-SD, CI-SIS "CDA N1")."""
    when = doc.created.strftime("%Y%m%d%H%M%S+0000")
    # lxml-stubs type nsmap as str keys only; None is how lxml spells the default namespace
    root = etree.Element(_hl7("ClinicalDocument"), nsmap={None: _HL7})  # type: ignore[dict-item]
    _sub(root, "realmCode", code="FR")
    _sub(root, "typeId", root="2.16.840.1.113883.1.3", extension="POCD_HD000040")
    _sub(root, "templateId", root="1.3.6.1.4.1.19376.1.2.20")  # IHE XDS-SD
    _sub(root, "id", root=doc.uid)
    _sub(root, "code", code=doc.type_code, codeSystem=_LOINC_OID, codeSystemName="LOINC", displayName=doc.type_display)
    _sub(root, "title").text = doc.title
    _sub(root, "effectiveTime", value=when)
    _sub(root, "confidentialityCode", code=doc.confidentiality, codeSystem="2.16.840.1.113883.5.25")
    _sub(root, "languageCode", code="fr-FR")
    role = _sub(_sub(root, "recordTarget"), "patientRole")
    _sub(role, "id", root=SANDBOX_PATIENT_ID_ROOT, extension=doc.patient_local_id)  # local id, never the NIR
    patient = _sub(role, "patient")
    _name(patient, doc.patient_given, doc.patient_family)
    gender = {"female": "F", "male": "M"}.get(doc.patient_gender, "UN")
    _sub(patient, "administrativeGenderCode", code=gender, codeSystem="2.16.840.1.113883.5.1")
    _sub(patient, "birthTime", value=doc.patient_birth_date.strftime("%Y%m%d"))
    author = _sub(root, "author")
    _sub(author, "time", value=when)
    assigned = _sub(author, "assignedAuthor")
    _sub(assigned, "id", root=_IDNAT_PS_OID, extension=doc.author_id)
    _name(_sub(assigned, "assignedPerson"), doc.author_given, doc.author_family)
    _sub(_sub(assigned, "representedOrganization"), "name").text = doc.organization
    custodian = _sub(_sub(_sub(root, "custodian"), "assignedCustodian"), "representedCustodianOrganization")
    _sub(custodian, "name").text = doc.organization
    body = _sub(_sub(root, "component"), "nonXMLBody")
    text = _sub(body, "text", mediaType=TEXT, representation="B64")
    text.text = base64.b64encode(text_document(doc)).decode("ascii")
    return bytes(etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True))


# -- big streamed PDFs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BigContent:
    """A big PDF generated on the fly: objects 1-6 as in a small PDF, then object 7, one stream of
    pattern bytes, padded so the file is exactly ``size`` bytes. Only a 64 KiB block is ever in memory."""

    doc: Rendering
    seed: int
    size: int

    @cached_property
    def _layout(self) -> tuple[bytes, int, bytes]:
        body, offsets = _pdf_body(_page_objects(self.doc))
        offsets.append(len(body))

        def head(length: int) -> bytes:  # /Length on a fixed width: the prefix length does not depend on it
            return body + b"7 0 obj\n<< /Length %-20d >>\nstream\n" % length

        end = b"\nendstream\nendobj\n"
        # The xref offset x must satisfy x + len(trailer(x)) == size; the trailer's length only depends on
        # how many digits x has. At a power of ten no x fits: one newline after %%EOF then closes the gap.
        for extra in (0, 1):
            for digits in range(1, 17):
                xref_at = self.size - extra - len(self._trailer(offsets, 10 ** (digits - 1)))
                if len(str(xref_at)) != digits:
                    continue
                length = xref_at - len(head(0)) - len(end)
                if length < 0:
                    break
                return head(length), length, end + self._trailer(offsets, xref_at) + b"\n" * extra
        raise ValueError(f"a big document cannot be {self.size} bytes (too small for its PDF frame)")

    def _trailer(self, offsets: list[int], xref_at: int) -> bytes:
        return _pdf_trailer(offsets, xref_at, _file_id(self.doc))

    def chunks(self, chunk: int = _BLOCK) -> Iterator[bytes]:
        """The file in ``chunk``-sized pieces (the last one shorter)."""
        prefix, length, suffix = self._layout
        return _rechunk(chain((prefix,), _pattern(self.seed, length), (suffix,)), chunk)

    def digest(self) -> str:
        """Base64 SHA-1 of the file, computed by streaming it once."""
        sha1 = hashlib.sha1(usedforsecurity=False)
        for piece in self.chunks(1 << 20):
            sha1.update(piece)
        return base64.b64encode(sha1.digest()).decode("ascii")


def _pattern(seed: int, length: int) -> Iterator[bytes]:
    """``length`` bytes: a seeded 64 KiB random block, each repetition stamped with its index (so no two
    blocks are equal and a reordering would change the hash)."""
    tail = random.Random(seed).randbytes(_BLOCK)[8:]
    full, rest = divmod(length, _BLOCK)
    for k in range(full):
        yield k.to_bytes(8, "big") + tail
    if rest:
        yield (full.to_bytes(8, "big") + tail)[:rest]


def _rechunk(parts: Iterable[bytes], chunk: int) -> Iterator[bytes]:
    if chunk <= 0:
        raise ValueError("chunk size must be positive")
    buf = bytearray()
    for part in parts:
        if not buf and len(part) == chunk:
            yield part
            continue
        buf += part
        while len(buf) >= chunk:
            yield bytes(buf[:chunk])
            del buf[:chunk]
    if buf:
        yield bytes(buf)


def rechunk(data: bytes, chunk: int) -> Iterator[bytes]:
    """``data`` cut in ``chunk``-sized pieces."""
    for start in range(0, len(data), chunk):
        yield data[start : start + chunk]


def damaged(chunks: Iterable[bytes], size: int, *, corrupt: bool, truncate_to: int | None) -> Iterator[bytes]:
    """The served form of a faulty attachment.

    ``corrupt``: the same number of bytes, with a run of 16 bytes in the middle altered, so only the hash
    check can tell. ``truncate_to``: the transfer stops early, so the size check fails too.
    """
    lo = size // 2
    hi = min(size, lo + 16)
    offset = 0
    for piece in chunks:
        end = offset + len(piece)
        if truncate_to is not None and end > truncate_to:
            piece = piece[: max(0, truncate_to - offset)]
            end = offset + len(piece)
        if corrupt and offset < hi and end > lo:
            mutable = bytearray(piece)
            for pos in range(max(lo, offset), min(hi, end)):
                mutable[pos - offset] ^= 0x5A
            piece = bytes(mutable)
        if piece:
            yield piece
        offset = end
        if truncate_to is not None and offset >= truncate_to:
            return

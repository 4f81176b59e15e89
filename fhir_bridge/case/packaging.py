"""A case → a FHIR R4 ``document`` Bundle, written as canonical JSON that streams large attachments.

Shape (FHIR R4 bundle.html "document", invariants bdl-9/10/11, composition.html):

* ``identifier`` (system ``urn:ietf:rfc:3986``, a ``urn:uuid:`` value) and ``timestamp``;
* a ``Composition`` first, its sections listing the documents by case section (``mappings/``
  document-type-to-case-section) and the imaging studies;
* the Patient, each kept DocumentReference followed by a ``Binary`` holding its bytes, which the
  reference's ``attachment.url`` points to, each ImagingStudy and its Endpoints;
* every entry has a ``urn:uuid:`` fullUrl; references between entries are rewritten to those, references
  to anything else become absolute URLs at the source so they stay meaningful outside it;
* every copied resource keeps its source identifiers (``masterIdentifier``, ``identifier``) and carries its
  versioned source URL in ``meta.source`` (R4 resource.html#Meta), so each item is traceable to its origin.

Binaries are not read into memory: their ``data`` is a :class:`FileBase64` the JSON writer streams from disk,
so a 2 GB case is packaged in bounded memory. The file is written in R4 canonical form (keys sorted, no
whitespace; json.html §2.6.2.6) because those are the bytes a later step hashes and signs.

Stored, served and signed by the bridge (as opposed to ``fhir-bridge pull``): :mod:`fhir_bridge.case.signature`
keeps the bundle as a small skeleton naming each document's blob, and signs it (``Bundle.signature``, a detached
ES384 JWS with an unencoded payload, RFC 7797, hashed while the bytes stream) over this canonical form.
"""

from __future__ import annotations

import base64
import copy
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource, iterencode
from fhir_bridge.fhir.terminology import CASE_CODES, CASE_SECTION, Terminology

_CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
_CONFIDENTIALITY_RANK = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}
_B64_CHUNK = 3 * 256 * 1024  # a multiple of 3: chunks encode without padding in the middle


class FileBase64:
    """A Binary's ``data`` read from a file and base64-encoded chunk by chunk while the JSON is written."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def iter_chunks(self) -> Iterator[str]:
        for chunk in self.iter_base64():
            yield chunk.decode("ascii")

    def iter_base64(self) -> Iterator[bytes]:
        """The base64 text as ASCII bytes, for writers that can take bytes (no str round trip)."""
        with self.path.open("rb") as handle:
            while chunk := handle.read(_B64_CHUNK):
                yield base64.b64encode(chunk)

    def __repr__(self) -> str:
        return f"FileBase64({self.path.name})"


@dataclass(frozen=True, slots=True)
class PackagedDocument:
    """A kept DocumentReference and where its verified bytes are on disk."""

    resource: Resource
    path: Path
    content_type: str
    size: int
    sha1_b64: str


@dataclass(frozen=True, slots=True)
class CaseContent:
    """Everything a case bundle is made of, as the source gave it (already screened)."""

    patient: Resource
    documents: list[PackagedDocument]
    studies: list[Resource]
    endpoints: dict[str, Resource]  # absolute source reference → Endpoint


def _uuid_url(rng: Callable[[], uuid.UUID]) -> str:
    return f"urn:uuid:{rng()}"


def build_case_bundle(
    content: CaseContent,
    *,
    terminology: Terminology,
    absolute: Callable[[str], str],
    now: datetime,
    new_uuid: Callable[[], uuid.UUID] = uuid.uuid4,
    title: str = "Dossier de demande de second avis",
) -> Resource:
    """Assemble the document Bundle (with :class:`FileBase64` placeholders for the Binary data)."""
    timestamp = instant(now)
    by_source: dict[str, str] = {}  # absolute source URL → urn:uuid fullUrl

    patient_url = absolute(f"Patient/{content.patient['id']}")
    by_source[patient_url] = _uuid_url(new_uuid)
    doc_urls = []
    for doc in content.documents:
        source_url = absolute(f"DocumentReference/{doc.resource['id']}")
        by_source[source_url] = _uuid_url(new_uuid)
        doc_urls.append(source_url)
    study_urls = []
    for study in content.studies:
        source_url = absolute(f"ImagingStudy/{study['id']}")
        by_source[source_url] = _uuid_url(new_uuid)
        study_urls.append(source_url)
    for endpoint_url in content.endpoints:
        by_source[endpoint_url] = _uuid_url(new_uuid)
    author_url = _uuid_url(new_uuid)

    def copy_of(resource: Resource, source_url: str) -> Resource:
        out: Resource = _rewrite_references(copy.deepcopy(resource), absolute, by_source)
        out.pop("id", None)
        version = (resource.get("meta") or {}).get("versionId")
        meta: Resource = {"source": f"{source_url}/_history/{version}" if version else source_url}
        if (resource.get("meta") or {}).get("security"):
            meta["security"] = resource["meta"]["security"]
        out["meta"] = meta
        return out

    entries: list[Resource] = [{"fullUrl": by_source[patient_url], "resource": copy_of(content.patient, patient_url)}]
    sections: dict[str, list[Resource]] = {}
    confidentiality = "N"
    for doc, source_url in zip(content.documents, doc_urls, strict=True):
        binary_url = _uuid_url(new_uuid)
        copied = copy_of(doc.resource, source_url)
        attachment = copied["content"][0]["attachment"]
        attachment["url"] = binary_url
        attachment["size"] = doc.size
        attachment["hash"] = doc.sha1_b64
        attachment.setdefault("contentType", doc.content_type)
        entries.append({"fullUrl": by_source[source_url], "resource": copied})
        entries.append({
            "fullUrl": binary_url,
            "resource": {"resourceType": "Binary", "contentType": doc.content_type, "data": FileBase64(doc.path)},
        })
        section = terminology.section_for((doc.resource.get("type") or {}).get("coding") or [])
        sections.setdefault(section, []).append({"reference": by_source[source_url]})
        confidentiality = max(confidentiality, _confidentiality_of(doc.resource), key=_rank)
    for study, source_url in zip(content.studies, study_urls, strict=True):
        entries.append({"fullUrl": by_source[source_url], "resource": copy_of(study, source_url)})
        sections.setdefault("imaging", []).append({"reference": by_source[source_url]})
    for endpoint_url, endpoint in content.endpoints.items():
        entries.append({"fullUrl": by_source[endpoint_url], "resource": copy_of(endpoint, endpoint_url)})
    entries.append({"fullUrl": author_url, "resource": _bridge_device()})

    order = [c["code"] for c in terminology.resources["case-section"]["concept"]]
    composition: Resource = {
        "resourceType": "Composition",
        "status": "final",
        "type": {"coding": [{"system": CASE_CODES, "code": "case-package",
                             "display": terminology.display(CASE_CODES, "case-package")}]},
        "subject": {"reference": by_source[patient_url]},
        "date": timestamp,
        "author": [{"reference": author_url}],
        "title": title,
        "confidentiality": confidentiality,
        "section": [
            {
                "title": terminology.display(CASE_SECTION, code, "fr"),
                "code": {"coding": [{"system": CASE_SECTION, "code": code,
                                     "display": terminology.display(CASE_SECTION, code)}]},
                "entry": sections[code],
            }
            for code in order
            if sections.get(code)
        ],
    }
    if not composition["section"]:
        composition["section"] = [{
            "title": "Aucun document",
            "code": {"coding": [{"system": CASE_SECTION, "code": "other-documents"}]},
            "emptyReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason",
                                        "code": "unavailable"}]},
        }]
    bundle_id = _uuid_url(new_uuid)
    return {
        "resourceType": "Bundle",
        "identifier": {"system": "urn:ietf:rfc:3986", "value": bundle_id},
        "type": "document",
        "timestamp": timestamp,
        "entry": [{"fullUrl": _uuid_url(new_uuid), "resource": composition}, *entries],
    }


def _rank(code: str) -> int:
    return _CONFIDENTIALITY_RANK.get(code, 3)


def _confidentiality_of(doc: Resource) -> str:
    for concept in doc.get("securityLabel", []) or []:
        for coding in (concept or {}).get("coding", []) or []:
            if coding.get("system") == _CONFIDENTIALITY and coding.get("code") in _CONFIDENTIALITY_RANK:
                return str(coding["code"])
    return "N"


def _bridge_device() -> Resource:
    from fhir_bridge import __version__

    return {
        "resourceType": "Device",
        "deviceName": [{"name": "fhir-bridge", "type": "user-friendly-name"}],
        "version": [{"value": __version__}],
    }


def _rewrite_references(obj: Any, absolute: Callable[[str], str], by_source: dict[str, str]) -> Any:
    """Point references at bundle entries when they are in the bundle, else at the source, absolutely."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "reference" and isinstance(value, str) and not value.startswith(("#", "urn:")):
                target = absolute(value)
                obj[key] = by_source.get(target.split("/_history/")[0], target)
            else:
                _rewrite_references(value, absolute, by_source)
    elif isinstance(obj, list):
        for item in obj:
            _rewrite_references(item, absolute, by_source)
    return obj


def write_bundle(bundle: Resource, path: Path) -> int:
    """Write the bundle as canonical JSON, streaming Binary data; atomic (temp file then rename). Returns bytes.

    Binary data goes from its file to the output as base64 bytes, never through ``str``: on a 300 MB case the
    decode/join/encode round trip of a text-mode writer was about half the packaging time (BENCHMARKS.md,
    part 1 profile). The rest of the JSON comes from :func:`iterencode` in 1 MiB writes.
    """
    files: list[FileBase64] = []
    slotted = _slot_files(bundle, files)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as out:
        buffer: list[str] = []
        size = 0
        for chunk in iterencode(slotted, canonical=True):
            if chunk.startswith(_SLOT):
                out.write("".join(buffer).encode("utf-8"))
                buffer, size = [], 0
                for piece in files[int(chunk[1:-1])].iter_base64():
                    out.write(piece)
                continue
            buffer.append(chunk)
            size += len(chunk)
            if size >= 1 << 20:
                out.write("".join(buffer).encode("utf-8"))
                buffer, size = [], 0
        out.write("".join(buffer).encode("utf-8"))
    os.replace(tmp, path)
    return path.stat().st_size


# No chunk :func:`iterencode` makes from a real value starts with NUL (strings are quoted, control characters
# escaped), so a chunk that does is one of our slots: "\0<index>\0" standing for ``files[index]``.
_SLOT = "\0"


class _FileSlot:
    def __init__(self, index: int) -> None:
        self.index = index

    def iter_chunks(self) -> Iterator[str]:
        yield f"{_SLOT}{self.index}{_SLOT}"


def _slot_files(obj: Any, files: list[FileBase64]) -> Any:
    """A copy of ``obj`` (containers only; leaves are shared) with each :class:`FileBase64` replaced by a
    slot numbered in ``files``."""
    if isinstance(obj, FileBase64):
        files.append(obj)
        return _FileSlot(len(files) - 1)
    if isinstance(obj, dict):
        return {key: _slot_files(value, files) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_slot_files(value, files) for value in obj]
    return obj

"""Which of the source's documents and studies may go into a case, and why the others may not.

Applied to what the source answered, because a source can be wrong or lie (STANDARDS.md §1, §3):

* only ``status = current`` DocumentReferences go on (MHD ITI-67: superseded and entered-in-error versions
  are history, not the record); a current document that ``relatesTo.code = replaces`` another names a
  superseded version, which is reported even though the source (rightly) did not return it;
* a document labelled ``MASQUE_PS`` (or any label of the never-forward ValueSet in ``mappings/``) is never
  forwarded to a reviewer;
* MHD requires exactly one ``content`` with an ``attachment.url`` and forbids inline ``attachment.data``;
* anything whose subject is not the case's Patient is dropped (a source answering another patient's data
  must never leak it into this case);
* a second copy of a document (same ``masterIdentifier``) is dropped.

After retrieval, size/hash failures are added by the caller (reasons ``size-mismatch``, ``hash-mismatch``,
``retrieve-failed``, ``too-large``, ``bad-hash``). Problems name the document by its masterIdentifier or
its source URL, never by patient data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import Terminology

#: reason codes written to problems.json (documented in the README)
REASONS = {
    "superseded": "a newer version replaces this document",
    "entered-in-error": "the source marked this document entered-in-error",
    "not-current": "the document is not current",
    "masked": "masked from health professionals (MASQUE_PS): never forwarded",
    "wrong-patient": "the resource belongs to another patient",
    "no-content": "the document has no content attachment to retrieve",
    "invalid-document": "the document breaks the MHD rules for DocumentReference",
    "duplicate": "another copy of this document is already in the case",
    "size-mismatch": "the bytes retrieved do not have the size the document declares",
    "hash-mismatch": "the bytes retrieved do not match the document's SHA-1 hash",
    "bad-hash": "the document's attachment.hash is not a base64 SHA-1",
    "too-large": "the attachment is larger than the configured limit",
    "retrieve-failed": "the document's content could not be retrieved",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One left-out or failed item, as written to ``problems.json``."""

    reason: str
    text: str
    resource_type: str = "DocumentReference"
    master_identifier: str | None = None
    source_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason, "resourceType": self.resource_type, "text": self.text}
        if self.master_identifier is not None:
            out["masterIdentifier"] = self.master_identifier
        if self.source_url is not None:
            out["sourceUrl"] = self.source_url
        return out


@dataclass
class Screened:
    kept: list[Resource] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class PatientMatcher:
    """Decides whether a ``subject`` reference designates the case's Patient.

    Accepts the Patient's literal reference in any form the source may write it (relative, absolute,
    versioned) and a logical reference by the case's identifier.
    """

    def __init__(self, patient: Resource, identifier: PatientIdentifier, absolute: Callable[[str], str]) -> None:
        self._absolute = absolute
        self._patient_url = absolute(f"Patient/{patient['id']}")
        self._identifier = identifier

    def __call__(self, subject: Any) -> bool:
        if not isinstance(subject, dict):
            return False
        reference = subject.get("reference")
        if isinstance(reference, str) and reference:
            url = self._absolute(reference).split("/_history/")[0]
            return url == self._patient_url
        logical = subject.get("identifier")
        return isinstance(logical, dict) and self._identifier.matches(logical)


def document_label(doc: Resource) -> str | None:
    master = doc.get("masterIdentifier")
    if isinstance(master, dict) and master.get("value"):
        return str(master["value"])
    return None


def screen_documents(
    docs: Iterable[Resource], is_patient: PatientMatcher, terminology: Terminology, absolute: Callable[[str], str]
) -> Screened:
    """Split the source's DocumentReferences into the ones to retrieve and the left-out ones."""
    result = Screened()
    docs = list(docs)
    seen_masters: set[str] = set()
    present = {absolute(f"DocumentReference/{d['id']}") for d in docs if isinstance(d.get("id"), str)}
    replaced: dict[str, str | None] = {}

    for doc in docs:
        url = absolute(f"DocumentReference/{doc['id']}") if isinstance(doc.get("id"), str) else None

        def left_out(reason: str, detail: str = "", doc: Resource = doc, url: str | None = url) -> None:
            text = REASONS[reason] + (f" ({detail})" if detail else "")
            result.problems.append(Problem(reason, text, master_identifier=document_label(doc), source_url=url))

        if not is_patient(doc.get("subject")):
            left_out("wrong-patient")
            continue
        status = doc.get("status")
        if status != "current":
            left_out(status if status in ("superseded", "entered-in-error") else "not-current")
            continue
        if doc.get("docStatus") == "entered-in-error":
            left_out("entered-in-error")
            continue
        if terminology.is_never_forwarded(flatten_labels(doc)):
            left_out("masked")
            continue
        contents = doc.get("content") or []
        if len(contents) != 1:
            left_out("no-content" if not contents else "invalid-document", "MHD requires exactly one content")
            continue
        attachment = (contents[0] or {}).get("attachment") or {}
        if attachment.get("data") is not None:
            left_out("invalid-document", "MHD forbids inline attachment.data")
            continue
        if not attachment.get("url"):
            left_out("no-content", "no attachment.url")
            continue
        master = document_label(doc)
        if master is not None:
            if master in seen_masters:
                left_out("duplicate", "same masterIdentifier")
                continue
            seen_masters.add(master)
        for relation in doc.get("relatesTo", []) or []:
            target = ((relation or {}).get("target") or {}).get("reference")
            if relation.get("code") == "replaces" and isinstance(target, str):
                replaced[absolute(target).split("/_history/")[0]] = master
        result.kept.append(doc)

    # A replaced document still answered as current is the source contradicting itself: the newer wins.
    kept = []
    for doc in result.kept:
        url = absolute(f"DocumentReference/{doc['id']}") if isinstance(doc.get("id"), str) else None
        if url is not None and url in replaced:
            result.problems.append(Problem("superseded", REASONS["superseded"], master_identifier=document_label(doc),
                                           source_url=url))
        else:
            kept.append(doc)
    result.kept = kept
    for url, newer in sorted(replaced.items()):
        if url not in present:
            detail = f" (replaced by {newer})" if newer else ""
            result.problems.append(Problem("superseded", REASONS["superseded"] + detail, source_url=url))
    return result


def flatten_labels(doc: Resource) -> list[dict[str, Any]]:
    """Every security coding of a document: ``securityLabel`` (CodeableConcepts in R4) and ``meta.security``."""
    codings: list[dict[str, Any]] = []
    for concept in doc.get("securityLabel", []) or []:
        if isinstance(concept, dict):
            codings.extend(c for c in concept.get("coding", []) or [] if isinstance(c, dict))
    meta = doc.get("meta") or {}
    codings.extend(c for c in meta.get("security", []) or [] if isinstance(c, dict))
    return codings


def screen_studies(studies: Iterable[Resource], is_patient: PatientMatcher,
                   absolute: Callable[[str], str]) -> Screened:
    """Keep the ImagingStudies of this patient; report the others as wrong-patient."""
    result = Screened()
    for study in studies:
        if is_patient(study.get("subject")):
            result.kept.append(study)
        else:
            url = absolute(f"ImagingStudy/{study['id']}") if isinstance(study.get("id"), str) else None
            result.problems.append(Problem("wrong-patient", REASONS["wrong-patient"], resource_type="ImagingStudy",
                                           source_url=url))
    return result

"""Collect one patient's case from the source: the use case behind ``fhir-bridge pull`` and the pull job.

Order of work (MHD ITI-67/68, STANDARDS.md §1): resolve the Patient by identifier; search documents and
imaging studies concurrently; screen them (:mod:`fhir_bridge.case.selection`); retrieve the kept documents'
bytes concurrently (the source adapter bounds the concurrency) into ``attachments_dir``, verifying size and
hash; report every left-out item. A failure of the whole source (searches) raises; a failure of one
attachment only leaves that document out, with its reason.
"""

from __future__ import annotations

import asyncio
import mimetypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_bridge.case.packaging import CaseContent, PackagedDocument
from fhir_bridge.case.selection import (
    REASONS,
    PatientMatcher,
    Problem,
    document_label,
    screen_documents,
    screen_studies,
)
from fhir_bridge.case.watermarks import newest_update
from fhir_bridge.errors import AttachmentError
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.terminology import Terminology
from fhir_bridge.ports import SourcePort, SyncStatePort

Progress = Callable[[str, int, int], None]

_EXTENSIONS = {"application/pdf": ".pdf", "text/plain": ".txt", "application/xml": ".xml", "text/xml": ".xml",
               "application/hl7-cda+xml": ".xml", "application/dicom": ".dcm"}


def _noop(stage: str, done: int, total: int) -> None:
    return None


@dataclass
class CollectedCase:
    content: CaseContent
    problems: list[Problem] = field(default_factory=list)
    documents_found: int = 0
    #: documents screened in whose bytes could not be used (triage needs their type to say what is missing)
    unreadable: list[dict[str, Any]] = field(default_factory=list)
    #: the newest meta.lastUpdated the searches answered, kept or not (the sync watermark, issue 8)
    newest_update: str | None = None


async def collect_case(
    source: SourcePort,
    identifier: PatientIdentifier,
    attachments_dir: Path,
    terminology: Terminology,
    *,
    progress: Progress = _noop,
) -> CollectedCase:
    """Pull and screen everything the case needs; see the module docstring for the rules."""
    progress("patient", 0, 1)
    patient = await source.find_patient(identifier)
    progress("patient", 1, 1)
    progress("search", 0, 2)
    docs, (studies, endpoints) = await asyncio.gather(
        source.find_document_references(patient["id"]), source.find_imaging_studies(patient["id"])
    )
    progress("search", 2, 2)
    matcher = PatientMatcher(patient, identifier, source.absolute)
    screened_docs = screen_documents(docs, matcher, terminology, source.absolute)
    screened_studies = screen_studies(studies, matcher, source.absolute)
    problems = [*screened_docs.problems, *screened_studies.problems]

    attachments_dir.mkdir(parents=True, exist_ok=True)
    total = len(screened_docs.kept)
    done = 0
    progress("retrieve", 0, total)

    async def fetch(index: int, doc: dict[str, object]) -> PackagedDocument | Problem:
        nonlocal done
        attachment = doc["content"][0]["attachment"]  # type: ignore[index]
        content_type = str(attachment.get("contentType") or "application/octet-stream")
        dest = attachments_dir / f"doc-{index:04d}{guess_extension(content_type)}"
        size = attachment.get("size")
        try:
            got = await source.retrieve(
                str(attachment["url"]), dest,
                expected_size=int(size) if size is not None else None,
                expected_sha1_b64=attachment.get("hash"),
            )
        except AttachmentError as exc:
            return Problem(exc.reason, exc.message or REASONS.get(exc.reason, exc.reason),
                           master_identifier=document_label(doc),
                           source_url=source.absolute(f"DocumentReference/{doc['id']}"))
        finally:
            done += 1
            progress("retrieve", done, total)
        return PackagedDocument(resource=doc, path=got.path, content_type=content_type,
                                size=got.size, sha1_b64=got.sha1_b64)

    results = await asyncio.gather(*(fetch(i, d) for i, d in enumerate(screened_docs.kept, start=1)))
    packaged = [r for r in results if isinstance(r, PackagedDocument)]
    problems.extend(r for r in results if isinstance(r, Problem))
    unreadable = [doc for doc, r in zip(screened_docs.kept, results, strict=True) if isinstance(r, Problem)]
    used = {r.path for r in packaged}
    for stray in attachments_dir.glob("doc-*"):  # nothing refused, or left from an earlier pull, stays
        if stray not in used:
            stray.unlink()
    content = CaseContent(patient=patient, documents=packaged, studies=screened_studies.kept, endpoints=endpoints)
    return CollectedCase(content=content, problems=problems, documents_found=len(docs), unreadable=unreadable,
                         newest_update=newest_update([*docs, *studies]))


def guess_extension(content_type: str) -> str:
    return _EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ".bin"


async def record_pull(marks: SyncStatePort, patient: PatientIdentifier, collected: CollectedCase) -> None:
    """After a pull, its sync mark (:mod:`fhir_bridge.workflow.sync`): the Patient id, and the newest
    lastUpdated of everything the pull's searches answered (kept or left out: a masked document is still
    something the pull has seen)."""
    await marks.advance(patient, patient_id=str(collected.content.patient.get("id") or "") or None,
                        watermark=collected.newest_update)

"""The sandbox's deterministic synthetic world: :func:`build_world`, document bytes, and the expectations
tests check a consumer against (:func:`world_summary`).

The same seed always gives the same ids, NIRs, contents and hashes. What every world holds, per patient
(STANDARDS.md §1-§4 say why each case matters to a consumer):

* a valid test INS (system ``urn:oid:1.2.250.1.213.1.4.10``, NIR key = 97 − (first 13 digits mod 97));
* 8-12 current documents of the specialty's usual types, exactly one of them masked (``MASQUE_PS``);
* one or two superseded versions of one document, the current version ``relatesTo.replaces`` them;
* an ``entered-in-error`` document for every other patient;
* with imaging (patient 0 and every oncology, neurology and cardiology patient by default) 1-3
  ImagingStudies, each with its imaging report;
* for "corrupt" patients (patient 0 by default) one attachment served with altered bytes of the same length,
  and for patient 0 another one whose transfer is cut short — both only when the server's switch is on;
* dates counted back from ``today`` (a fixed day by default, so a seed alone gives the same world): every
  complete case triages clean at ``today`` with ``mappings/triage-rules.json`` for its specialty (all
  expected documents and imaging present and recent, no plan older than the pathology report, every study
  reported, nothing in the future), the damaged attachments and masked document aside;
* for "incomplete" patients no document of the specialty's essential types (the pathology report, else the
  first blocking group of the rules), so triage blocks the case; ``world_summary`` lists what they lack.

``big_docs`` adds that many current documents to patient 0 whose sizes sum to ``big_total_bytes``; their bytes
are generated in chunks when served and never held whole in memory (the memory benchmark relies on it).
``archive_studies`` adds that many older ImagingStudies to patient 0 (the pull benchmark's 20 studies).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator
from datetime import date, timedelta
from typing import Any

from fhir_bridge.sandbox.content import BigContent, Rendering, damaged, rechunk
from fhir_bridge.sandbox.model import (
    CURRENT,
    DEFAULT_TODAY,
    ENTERED_IN_ERROR,
    SUPERSEDED,
    SandboxDocument,
    SandboxEndpoint,
    SandboxInstance,
    SandboxOrganization,
    SandboxPatient,
    SandboxPractitioner,
    SandboxSeries,
    SandboxStudy,
    World,
)
from fhir_bridge.sandbox.population import PACS, PatientBuilder, organizations, practitioners, tables

__all__ = [
    "SandboxDocument",
    "SandboxEndpoint",
    "SandboxInstance",
    "SandboxOrganization",
    "SandboxPatient",
    "SandboxPractitioner",
    "SandboxSeries",
    "SandboxStudy",
    "World",
    "build_world",
    "content_bytes",
    "iter_content",
    "served_size",
    "world_summary",
]

MIN_BIG_DOC = 4096
_DIGESTS: dict[BigContent, str] = {}


def build_world(
    seed: int = 1,
    patients: int = 5,
    *,
    big_docs: int = 0,
    big_total_bytes: int = 0,
    corrupt_patients: Collection[int] = (0,),
    imaging_patients: Collection[int] | None = None,
    today: date | None = None,
    incomplete: Collection[int] = (),
    archive_studies: int = 0,
) -> World:
    """Build the world for ``seed``, dated from ``today`` (None: :data:`DEFAULT_TODAY`).

    ``corrupt_patients``: indexes of the patients with a corrupted attachment. ``imaging_patients``: indexes
    with ImagingStudies; None means patient 0 plus every oncology, neurology and cardiology patient.
    ``incomplete``: indexes of the patients whose case lacks its essential documents.
    """
    if patients < 1:
        raise ValueError("the sandbox needs at least one patient (patient 0 is the oncology case)")
    if any(not 0 <= index < patients for index in incomplete):
        raise ValueError(f"incomplete patients are indexes from 0 to {patients - 1}")
    today = DEFAULT_TODAY if today is None else today
    if big_docs < 0 or (big_docs and big_total_bytes < big_docs * MIN_BIG_DOC):
        raise ValueError(f"big_total_bytes must give each big document at least {MIN_BIG_DOC} bytes")
    people = []
    taken: set[str] = set()
    for index in range(patients):
        imaging = None if imaging_patients is None else index in imaging_patients
        if index == 0 and imaging_patients is None:
            imaging = True
        builder = PatientBuilder(seed, index, corrupt=index in corrupt_patients, imaging=imaging, today=today,
                                 incomplete=index in incomplete)
        people.append(builder.build(taken))
        taken.add(people[-1].nir)
        if index == 0 and archive_studies:
            people[0].studies.extend(builder.archive_studies(archive_studies))
    if big_docs:
        people[0].documents.extend(_big_documents(seed, people[0], big_docs, big_total_bytes))
        people[0].documents.sort(key=lambda d: (d.date, d.id))
    return World(seed=seed, patients=people, organizations=organizations(), practitioners=practitioners(),
                 endpoints=[PACS], today=today)


def _big_documents(seed: int, patient: SandboxPatient, count: int, total: int) -> list[SandboxDocument]:
    """Mixed sizes summing exactly to ``total``; each hash computed by streaming once, then cached.

    They are dated before the patient's other documents, so they never make the current workup look stale
    or inconsistent (a big pathology report newer than the treatment plan would), and they skip the types
    an incomplete case lacks.
    """
    rng = random.Random(f"fhir-bridge-sandbox:{seed}:big")
    weights = [rng.uniform(0.25, 1.75) for _ in range(count)]
    spare = total - count * MIN_BIG_DOC
    sizes = [MIN_BIG_DOC + int(spare * w / sum(weights)) for w in weights]
    sizes[-1] += total - sum(sizes)
    template = patient.documents[-1]
    oldest = min(d.date for d in patient.documents)
    types = [c for c in tables()["big_document_types"] if c not in patient.missing]
    author = next(a for a in practitioners() if a.id == template.author_id)
    organization = next(o for o in organizations() if o.id == template.organization_id)
    docs = []
    for n, size in enumerate(sizes):
        code = types[n % len(types)]
        info = tables()["document_types"][code]
        when = oldest - timedelta(days=1 + n % 3650)
        uid = f"2.25.{rng.getrandbits(120)}"
        title = f"{info['title']} — dossier volumineux {n + 1}/{count}"
        rendering = Rendering(
            title=title, lines=(f"Document volumineux de {size} octets, contenu de test.",), created=when, uid=uid,
            type_code=code, type_display=info["display"], confidentiality="N", patient_given=patient.given,
            patient_family=patient.family, patient_gender=patient.gender, patient_birth_date=patient.birth_date,
            patient_local_id=patient.id, author_given=author.given, author_family=author.family,
            author_id=author.idnat, organization=organization.name,
        )
        big = BigContent(doc=rendering, seed=rng.getrandbits(64), size=size)
        if big not in _DIGESTS:
            _DIGESTS[big] = big.digest()
        docs.append(SandboxDocument(
            id=f"doc-big-{rng.getrandbits(40):010x}", patient_id=patient.id, master_identifier=f"urn:oid:{uid}",
            type_code=code, type_display=info["display"], class_code=info["class"],
            class_display=tables()["classes"][info["class"]], format_code="urn:ihe:iti:xds:2017:mimeTypeSufficient",
            format_display="mimeType Sufficient", content_type="application/pdf", title=title, date=when,
            last_updated=when + timedelta(hours=1), size=size, sha1_b64=_DIGESTS[big],
            organization_id=template.organization_id, author_id=template.author_id, big=big,
        ))
    return docs


# -- content ------------------------------------------------------------------------------------------


def iter_content(doc: SandboxDocument, chunk: int = 65536, *, faults: bool = False) -> Iterator[bytes]:
    """The attachment's bytes in ``chunk``-sized pieces.

    ``faults=False`` (default) gives the document as declared (its ``size`` and ``sha1_b64`` hold);
    ``faults=True`` gives what the server sends when corruption is switched on: altered bytes for a
    ``corrupt`` document, a cut-short transfer for a ``truncated`` one.
    """
    pieces = doc.big.chunks(chunk) if doc.big is not None else rechunk(doc.data or b"", chunk)
    if faults and doc.has_fault:
        return damaged(pieces, doc.size, corrupt=doc.corrupt, truncate_to=_truncated_size(doc) if doc.truncated
                       else None)
    return pieces


def content_bytes(doc: SandboxDocument, *, faults: bool = False) -> bytes:
    """The whole attachment in memory: for small documents only (see :func:`iter_content`)."""
    if doc.big is not None:
        raise ValueError("a big document is only ever streamed: use iter_content")
    return b"".join(iter_content(doc, faults=faults))


def served_size(doc: SandboxDocument, *, faults: bool) -> int:
    """How many bytes the server sends (the HTTP Content-Length)."""
    return _truncated_size(doc) if faults and doc.truncated else doc.size


def _truncated_size(doc: SandboxDocument) -> int:
    return doc.size - max(1, doc.size // 4)


# -- expectations -------------------------------------------------------------------------------------


def world_summary(world: World, *, faults: bool) -> dict[str, Any]:
    """What a correct consumer should find, per patient, as JSON (served at ``/_sandbox/world``).

    ``intact`` is what a reviewer may receive: current, not masked, and (when ``faults``) not damaged.
    ``incomplete`` patients lack every document of the ``missing`` type codes, so triage blocks their case.
    """
    patients = []
    for p in world.patients:
        docs = p.documents

        def ids(keep: Any, docs: list[SandboxDocument] = docs) -> list[str]:
            return [d.id for d in docs if keep(d)]

        patients.append({
            "id": p.id,
            "identifier": {"system": p.identifier_system, "value": p.nir},
            "name": {"given": p.given, "family": p.family},
            "specialty": p.specialty,
            "condition": p.condition,
            "incomplete": bool(p.missing),
            "missing": list(p.missing),
            "documents": {
                "all": ids(lambda d: True),
                "current": ids(lambda d: d.status == CURRENT),
                "current_unmasked": ids(lambda d: d.status == CURRENT and not d.masked),
                "intact": ids(lambda d: d.status == CURRENT and not d.masked and not (faults and d.has_fault)),
                "masked": ids(lambda d: d.masked),
                "superseded": ids(lambda d: d.status == SUPERSEDED),
                "entered_in_error": ids(lambda d: d.status == ENTERED_IN_ERROR),
                "corrupt": ids(lambda d: faults and d.corrupt),
                "truncated": ids(lambda d: faults and d.truncated),
                "big": ids(lambda d: d.big is not None),
                "replaces": {d.id: d.replaces for d in docs if d.replaces},
                "sha1": {d.id: d.sha1_b64 for d in docs},
                "size": {d.id: d.size for d in docs},
            },
            "studies": [s.id for s in p.studies],
            "study_uids": {s.id: s.uid for s in p.studies},
            "endpoints": sorted({s.endpoint_id for s in p.studies}),
        })
    return {"seed": world.seed, "today": world.today.isoformat(), "faults": faults, "patients": patients}

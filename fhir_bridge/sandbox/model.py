"""The synthetic national record as plain dataclasses: patients, their documents and imaging studies.

No FastAPI and no FHIR JSON here: :mod:`fhir_bridge.sandbox.render` turns these into resources, and
:mod:`fhir_bridge.sandbox.world` builds them from a seed. Documents are mutable on purpose: an ITI-65
write-back supersedes an existing document (MHD ITI-65 §2:3.65.4.1.3.1 "replace").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from fhir_bridge.fhir.identity import INS_NIR_TEST
from fhir_bridge.sandbox.content import BigContent

CURRENT, SUPERSEDED, ENTERED_IN_ERROR = "current", "superseded", "entered-in-error"
#: the day a world is dated from when none is given: fixed, so that a seed alone gives the same world
DEFAULT_TODAY = date(2026, 11, 1)
DOCUMENT_STATUSES = frozenset({CURRENT, SUPERSEDED, ENTERED_IN_ERROR})


@dataclass(frozen=True, slots=True)
class SandboxOrganization:
    id: str
    name: str
    facility_code: str  # TRE_R02-SecteurActivite
    facility_display: str


@dataclass(frozen=True, slots=True)
class SandboxPractitioner:
    id: str
    given: str
    family: str
    idnat: str  # national health-professional id (system urn:oid:1.2.250.1.71.4.2.1), synthetic
    specialty: str


@dataclass(frozen=True, slots=True)
class SandboxEndpoint:
    """A DICOMweb WADO-RS service; ``path`` is appended to the server's base URL when rendered."""

    id: str
    name: str
    organization_id: str
    path: str = "/dicomweb"


@dataclass(frozen=True, slots=True)
class SandboxInstance:
    uid: str
    sop_class: str
    number: int


@dataclass(frozen=True, slots=True)
class SandboxSeries:
    uid: str
    number: int
    modality: str
    description: str
    instances: tuple[SandboxInstance, ...]


@dataclass(frozen=True, slots=True)
class SandboxStudy:
    id: str
    uid: str  # Study Instance UID, bare; rendered as urn:oid:<uid> under system urn:dicom:uid
    patient_id: str
    started: datetime
    description: str
    series: tuple[SandboxSeries, ...]
    endpoint_id: str
    organization_id: str
    last_updated: datetime

    @property
    def modalities(self) -> list[str]:
        return sorted({s.modality for s in self.series})


@dataclass(slots=True)
class SandboxDocument:
    """One DocumentReference and its attachment.

    ``size`` and ``sha1_b64`` always describe the correct content. ``corrupt`` (altered bytes, same length)
    and ``truncated`` (the transfer stops early) only show when the server's corruption switch is on.
    Exactly one of ``data`` (small content, kept in memory), ``big`` (streamed) is set.
    """

    id: str
    patient_id: str
    master_identifier: str
    type_code: str
    type_display: str
    class_code: str
    class_display: str
    format_code: str
    format_display: str
    content_type: str
    title: str
    date: datetime
    last_updated: datetime
    size: int
    sha1_b64: str
    organization_id: str
    author_id: str | None = None
    status: str = CURRENT
    masked: bool = False
    corrupt: bool = False
    truncated: bool = False
    confidentiality: str = "N"
    replaces: str | None = None
    study_id: str | None = None
    data: bytes | None = None
    big: BigContent | None = None
    #: the DocumentReference as an ITI-65 client sent it (references already rewritten), for written docs
    submitted: dict[str, Any] | None = None
    version: int = 1

    @property
    def has_fault(self) -> bool:
        return self.corrupt or self.truncated


@dataclass(slots=True)
class SandboxPatient:
    id: str
    nir: str
    given: str
    family: str
    gender: str
    birth_date: date
    birthplace: str  # INSEE commune code, as in the NIR
    specialty: str
    condition: str
    documents: list[SandboxDocument] = field(default_factory=list)
    studies: list[SandboxStudy] = field(default_factory=list)
    #: document type codes this (deliberately incomplete) case lacks entirely; empty for a complete case
    missing: tuple[str, ...] = ()

    @property
    def identifier_system(self) -> str:
        return INS_NIR_TEST

    @property
    def identifier_token(self) -> str:
        """``SYSTEM|VALUE`` as a FHIR token search writes it."""
        return f"{INS_NIR_TEST}|{self.nir}"


@dataclass
class World:
    """Everything the sandbox serves, with lookups by id."""

    seed: int
    patients: list[SandboxPatient]
    organizations: list[SandboxOrganization]
    practitioners: list[SandboxPractitioner]
    endpoints: list[SandboxEndpoint]
    #: the day the world is dated from: every date is before it, the current workup shortly before
    today: date = DEFAULT_TODAY
    #: SubmissionSet Lists received through ITI-65, by id
    submission_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    _patients: dict[str, SandboxPatient] = field(init=False, repr=False)
    _documents: dict[str, SandboxDocument] = field(init=False, repr=False)
    _studies: dict[str, SandboxStudy] = field(init=False, repr=False)
    _by_nir: dict[str, SandboxPatient] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._patients = {p.id: p for p in self.patients}
        self._by_nir = {}
        for p in self.patients:
            self._by_nir.setdefault(p.nir, p)  # the first, as a linear search would find
        self._documents = {d.id: d for p in self.patients for d in p.documents}
        self._studies = {s.id: s for p in self.patients for s in p.studies}
        counted = len(self.patients) + sum(len(p.documents) + len(p.studies) for p in self.patients)
        if len(self._patients) + len(self._documents) + len(self._studies) != counted:
            raise ValueError("duplicate ids in the sandbox world")

    def patient(self, patient_id: str) -> SandboxPatient | None:
        return self._patients.get(patient_id)

    def find_patient(self, system: str | None, value: str) -> SandboxPatient | None:
        """The patient whose INS (test system) is ``value``; ``system`` None matches any system (FHIR token)."""
        if system is not None and system != INS_NIR_TEST:
            return None
        return self._by_nir.get(value.replace(" ", "").upper())

    def document(self, document_id: str) -> SandboxDocument | None:
        return self._documents.get(document_id)

    def documents(self) -> Iterator[SandboxDocument]:
        for patient in self.patients:
            yield from patient.documents

    def has_master_identifier(self, value: str) -> bool:
        return any(d.master_identifier == value for d in self.documents())

    def study(self, study_id: str) -> SandboxStudy | None:
        return self._studies.get(study_id)

    def endpoint(self, endpoint_id: str) -> SandboxEndpoint | None:
        return next((e for e in self.endpoints if e.id == endpoint_id), None)

    def organization(self, organization_id: str) -> SandboxOrganization | None:
        return next((o for o in self.organizations if o.id == organization_id), None)

    def practitioner(self, practitioner_id: str) -> SandboxPractitioner | None:
        return next((p for p in self.practitioners if p.id == practitioner_id), None)

    def add_documents(self, documents: list[SandboxDocument], supersede: dict[str, datetime]) -> None:
        """Store written documents and mark replaced ones superseded, all at once (ITI-65 is atomic).

        The caller has validated everything; nothing here can fail half-way.
        """
        for document in documents:
            self._patients[document.patient_id].documents.append(document)
            self._documents[document.id] = document
        for old_id, when in supersede.items():
            old = self._documents[old_id]
            old.status = SUPERSEDED
            old.last_updated = when
            old.version += 1

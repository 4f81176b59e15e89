"""Seeded generation of the sandbox's patients, documents and imaging studies.

Each patient draws from its own ``random.Random`` (seeded with the world seed and the patient's index), so
patient 3 is the same whether the world has 4 or 400 patients, and the big documents (their own stream)
never shift the ids of the ordinary ones. Seed tables (names, document types with their JDV_J07 displays,
modalities, how many days before "today" each type is dated) are data, in ``data/world.json``.

Dates count back from the world's ``today`` (midnight UTC), never reaching it: a complete case holds every
document group its specialty's triage rules expect (``required``), each recent enough, the pathology report
older than the RCP and the treatment plan, and each imaging study reported a day later. The masked and the
damaged documents are always extra ones, so that what is left for a reviewer is still complete. An
incomplete case lacks every document of its specialty's ``essential`` types.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from fhir_bridge.fhir.identity import nir_key
from fhir_bridge.sandbox.content import CONTENT_TYPES, Rendering, render, sha1_b64
from fhir_bridge.sandbox.model import (
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
)

SPECIALTY_ROTATION = ("oncology", "neurology", "cardiology", "rare-disease")
IMAGING_SPECIALTIES = frozenset({"oncology", "neurology", "cardiology"})
IMAGING_REPORT = "18748-4"
_FORMATS = {  # IHE format codes (MHD: http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode)
    "pdf": ("urn:ihe:iti:xds:2017:mimeTypeSufficient", "mimeType Sufficient"),
    "text": ("urn:ihe:iti:xds:2017:mimeTypeSufficient", "mimeType Sufficient"),
    "cda": ("urn:ihe:iti:xds-sd:text:2008", "Scanned Documents (text)"),
}


@cache
def tables() -> dict[str, Any]:
    """The seed tables, read once from ``data/world.json``."""
    path = Path(__file__).parent / "data" / "world.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _hex_id(rng: random.Random, prefix: str, bits: int = 48) -> str:
    return f"{prefix}-{rng.getrandbits(bits):0{bits // 4}x}"


def _oid(rng: random.Random) -> str:
    """A UUID-derived OID (ISO/IEC 9834-8 arc 2.25): unique without a registered root."""
    return f"2.25.{uuid.UUID(int=rng.getrandbits(128), version=4).int}"


def _when(rng: random.Random, anchor: datetime, ago: Sequence[int]) -> datetime:
    """A working hour on a day between ``ago[0]`` and ``ago[1]`` days (both included) before ``anchor``."""
    day = anchor - timedelta(days=rng.randint(ago[0], ago[1]))
    return day.replace(hour=rng.randint(8, 18), minute=rng.choice((0, 15, 30, 45)), second=0, microsecond=0)


def organizations() -> list[SandboxOrganization]:
    facility = tables()["facility_types"]
    return [
        SandboxOrganization(id=f"org-{o['key']}", name=o["name"], facility_code=o["facility"],
                            facility_display=facility[o["facility"]])
        for o in tables()["organizations"]
    ]


def practitioners() -> list[SandboxPractitioner]:
    return [
        SandboxPractitioner(id=f"pra-{n:02d}", given=p["given"], family=p["family"],
                            idnat=f"8{99900000000 + n}", specialty=p["specialty"])
        for n, p in enumerate(tables()["practitioners"], start=1)
    ]


PACS = SandboxEndpoint(id="ep-pacs", name="PACS — Centre d'imagerie médicale des Églantiers",
                       organization_id="org-imagerie")


def make_nir(rng: random.Random, gender: str, birth: date, birthplace: str,
             taken: Collection[str] = ()) -> str:
    """A valid NIR: sex, year, month, birthplace (INSEE commune), order, key = 97 − (n mod 97); never one of
    ``taken`` (two people never share an INS: in a large world the random order number would collide)."""
    while True:
        first13 = f"{1 if gender == 'male' else 2}{birth:%y%m}{birthplace}{rng.randint(1, 999):03d}"
        nir = f"{first13}{nir_key(first13):02d}"
        if nir not in taken:
            return nir


@dataclass
class _Plan:
    """A document before its bytes exist."""

    type_code: str
    date: datetime
    kind: str
    study: SandboxStudy | None = None
    status: str = "current"
    note: str | None = None


class PatientBuilder:
    """Builds one patient: identity, studies, then documents with their statuses and faults."""

    def __init__(self, seed: int, index: int, *, corrupt: bool, imaging: bool | None, today: date = DEFAULT_TODAY,
                 incomplete: bool = False) -> None:
        self.rng = random.Random(f"fhir-bridge-sandbox:{seed}:patient:{index}")
        self.index, self.corrupt = index, corrupt
        self.anchor = datetime(today.year, today.month, today.day, tzinfo=UTC)
        self.specialty = SPECIALTY_ROTATION[index % len(SPECIALTY_ROTATION)]
        self.imaging = self.specialty in IMAGING_SPECIALTIES if imaging is None else imaging
        self.spec = tables()["specialties"][self.specialty]
        self.missing: tuple[str, ...] = tuple(self.spec["essential"]) if incomplete else ()
        self.practitioners = practitioners()

    def build(self, taken: Collection[str] = ()) -> SandboxPatient:
        """The patient, with a NIR none of ``taken`` has."""
        rng, t = self.rng, tables()
        keys = sorted(self.spec["conditions"])
        key = rng.choice(["breast", "lung"]) if self.index == 0 else rng.choice(keys)
        self.condition = self.spec["conditions"][key]
        gender = "female" if key == "breast" else rng.choice(["female", "male"])
        birth = date(1945, 1, 1) + timedelta(days=rng.randrange(365 * 45))
        birthplace = rng.choice(t["birthplaces"])
        self.patient = SandboxPatient(
            id=_hex_id(rng, "pat", 40), nir=make_nir(rng, gender, birth, birthplace, taken),
            given=rng.choice(t["given_names"][gender]), family=rng.choice(t["family_names"]),
            gender=gender, birth_date=birth, birthplace=birthplace, specialty=self.specialty,
            condition=self.condition["name"], missing=self.missing,
        )
        if self.imaging:
            self.patient.studies = [self._study(n) for n in range(rng.randint(1, 3))]
        self.patient.documents = self._documents()
        return self.patient

    # -- imaging ---------------------------------------------------------------------------------

    def _study(self, n: int) -> SandboxStudy:
        rng, modalities = self.rng, tables()["modalities"]
        primary = self.condition["modalities"][0] if n == 0 else rng.choice(self.condition["modalities"])
        wanted = [primary] * rng.randint(1, 3)
        if primary == "PT":
            wanted = ["PT", "CT"]  # a PET study comes with its CT for attenuation correction
        series = tuple(
            SandboxSeries(
                uid=_oid(rng), number=k + 1, modality=mod,
                description=f"{modalities[mod]['study']} — série {k + 1}",
                instances=tuple(SandboxInstance(uid=_oid(rng), sop_class=modalities[mod]["sop_class"], number=i + 1)
                                for i in range(rng.randint(2, 5))),
            )
            for k, mod in enumerate(wanted)
        )
        started = _when(rng, self.anchor, tables()["study_ago"])
        return SandboxStudy(
            id=_hex_id(rng, "img"), uid=_oid(rng), patient_id=self.patient.id, started=started,
            description=f"{modalities[primary]['study']} — bilan de {self.condition['name']}",
            series=series, endpoint_id=PACS.id, organization_id=PACS.organization_id,
            last_updated=started + timedelta(hours=2),
        )

    def archive_studies(self, count: int) -> list[SandboxStudy]:
        """``count`` more studies for the built patient, from their own random stream (so they shift nothing
        else), dated before every other study and document: a big imaging history for benchmarks, older than
        the current workup so triage's recency and consistency rules look at the same case as without them."""
        saved = self.rng
        self.rng = random.Random(f"fhir-bridge-sandbox:{self.patient.id}:archive-studies")
        oldest = min([d.date for d in self.patient.documents] + [s.started for s in self.patient.studies])
        try:
            studies = []
            for n in range(count):
                study = self._study(n)
                started = (oldest - timedelta(days=1 + n)).replace(hour=study.started.hour)
                studies.append(replace(study, id=f"img-archive-{n:04d}-{study.id[4:]}", started=started,
                                       last_updated=started + timedelta(hours=2)))
            return studies
        finally:
            self.rng = saved

    # -- documents -------------------------------------------------------------------------------

    def _documents(self) -> list[SandboxDocument]:
        rng, kinds = self.rng, tables()["document_types"]
        plans = [_Plan(IMAGING_REPORT, s.started + timedelta(days=1), "pdf", study=s) for s in self.patient.studies]
        wanted = rng.randint(8, 12)
        pool = [c for c in self.spec["document_types"] if c not in self.missing]
        rng.shuffle(pool)
        required = [c for c in self.spec["required"] if c not in self.missing]
        spare = [c for c in pool if c not in required] or required
        # every required type once, then extra ones: at least four, for the masked and damaged documents
        extras = max(wanted - len(plans), len(required) + 4) - len(required)
        first_extra = len(plans) + len(required)
        for code in [*required, *(spare[n % len(spare)] for n in range(extras))]:
            plans.append(_Plan(code, self._date(code), rng.choice(kinds[code]["kinds"])))
        replaced_at = rng.choice([i for i, p in enumerate(plans) if p.study is None])
        versions = 2 if self.index == 0 else 1
        older: list[_Plan] = []
        newest = plans[replaced_at]
        when = newest.date
        for v in range(versions):
            when -= timedelta(days=rng.randint(3, 40))
            older.insert(0, _Plan(newest.type_code, when, newest.kind, status=SUPERSEDED,
                                  note=f"Version {versions - v} du document, remplacée depuis."))
        extra = []
        if self.index % 2 == 0:
            code = rng.choice(pool)
            extra.append(_Plan(code, _when(rng, self.anchor, tables()["entered_in_error_ago"]), "pdf",
                               status=ENTERED_IN_ERROR, note="Document déposé par erreur dans le dossier."))
        docs = [self._document(p) for p in plans]
        chain = [self._document(p) for p in older] + [docs[replaced_at]]
        for previous, newer in pairwise(chain):
            newer.replaces = previous.id
            previous.last_updated = newer.date + timedelta(hours=1)
        eligible = [d for i, d in enumerate(docs) if i >= first_extra and i != replaced_at]
        masked = rng.choice(eligible)
        masked.masked = True
        if self.corrupt:
            unmasked = [d for d in eligible if not d.masked]
            faulty = rng.sample(unmasked, 2 if self.index == 0 else 1)
            faulty[0].corrupt = True
            if self.index == 0:
                faulty[1].truncated = True
        everything = docs + chain[:-1] + [self._document(p) for p in extra]
        return sorted(everything, key=lambda d: (d.date, d.id))

    def _date(self, type_code: str) -> datetime:
        return _when(self.rng, self.anchor, tables()["document_types"][type_code]["ago"])

    def _author(self, role: str) -> SandboxPractitioner:
        specialty = {"specialist": self.specialty if self.specialty != "rare-disease" else "genetics"}.get(role, role)
        matches = [p for p in self.practitioners if p.specialty == specialty] or self.practitioners
        return self.rng.choice(matches)

    def _organization(self, plan: _Plan) -> str:
        if plan.study is not None:
            return "org-imagerie"
        if self.specialty == "oncology":
            return self.rng.choice(["org-clcc", "org-chu"])
        return self.rng.choice(["org-chu", "org-ch"])

    def _document(self, plan: _Plan) -> SandboxDocument:
        rng, info = self.rng, tables()["document_types"][plan.type_code]
        doc_uuid = uuid.UUID(int=rng.getrandbits(128), version=4)
        uid = f"2.25.{doc_uuid.int}"
        author = self._author(info["author"])
        org_id = self._organization(plan)
        org = next(o for o in organizations() if o.id == org_id)
        lines = [self._line(line, plan) for line in info["body"]]
        if plan.note:
            lines.append(plan.note)
        title = info["title"] + f" du {plan.date:%d/%m/%Y}"
        rendering = Rendering(
            title=title, lines=tuple(lines), created=plan.date, uid=uid, type_code=plan.type_code,
            type_display=info["display"], confidentiality=info.get("confidentiality", "N"),
            patient_given=self.patient.given, patient_family=self.patient.family, patient_gender=self.patient.gender,
            patient_birth_date=self.patient.birth_date, patient_local_id=self.patient.id,
            author_given=author.given, author_family=author.family, author_id=author.idnat, organization=org.name,
        )
        data = render(plan.kind, rendering)
        if self.patient.nir.encode() in data:
            raise AssertionError("an attachment must never carry the NIR")
        fmt_code, fmt_display = _FORMATS[plan.kind]
        return SandboxDocument(
            id=_hex_id(rng, "doc"), patient_id=self.patient.id,
            master_identifier=f"urn:oid:{uid}" if plan.kind == "cda" else f"urn:uuid:{doc_uuid}",
            type_code=plan.type_code, type_display=info["display"], class_code=info["class"],
            class_display=tables()["classes"][info["class"]], format_code=fmt_code, format_display=fmt_display,
            content_type=CONTENT_TYPES[plan.kind], title=title, date=plan.date,
            last_updated=min(plan.date + timedelta(hours=rng.randint(1, 48)), self.anchor),  # never after today
            size=len(data), sha1_b64=sha1_b64(data),
            organization_id=org_id, author_id=author.id, status=plan.status,
            confidentiality=rendering.confidentiality, study_id=plan.study.id if plan.study else None, data=data,
        )

    def _line(self, template: str, plan: _Plan) -> str:
        findings = self.condition["findings"]
        return template.format(
            date=f"{plan.date:%d/%m/%Y}", patient=f"{self.patient.given} {self.patient.family}",
            condition=self.condition["name"], service=self.spec["label"],
            finding=findings[self.rng.randrange(len(findings))],
            study=plan.study.description if plan.study else "examen d'imagerie",
        )

"""The sandbox world as FHIR R4 JSON: Patient, DocumentReference, ImagingStudy, Endpoint, Organization.

URLs are absolute and built from the base the caller passes (the public base URL, or the request's own),
so the sandbox works on any port. Shapes follow MHD 4.2 / PDSm 3.1.1 DocumentReference (STANDARDS.md §1),
FR Core Patient INS identifiers (§2), ANS codes (§3) and R4 ImagingStudy with a DICOMweb Endpoint (§4).
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir_bridge.fhir.identity import INS_NIR_TEST
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.sandbox.content import SANDBOX_PATIENT_ID_ROOT
from fhir_bridge.sandbox.model import (
    SandboxDocument,
    SandboxEndpoint,
    SandboxOrganization,
    SandboxPatient,
    SandboxStudy,
    World,
)
from fhir_bridge.sandbox.population import tables

LOINC = "http://loinc.org"
CLASS_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_A03-ClasseDocument/FHIR/TRE-A03-ClasseDocument"
CONFIDENTIALITY_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
VISIBILITY_SYSTEM = (
    "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
)
MASQUE_PS = "MASQUE_PS"
FORMAT_SYSTEM = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
FACILITY_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_R02-SecteurActivite/FHIR/TRE-R02-SecteurActivite"
PRACTICE_SYSTEM = "https://mos.esante.gouv.fr/NOS/TRE_A01-CadreExercice/FHIR/TRE-A01-CadreExercice"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"
CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
FR_CORE_ID_TYPE = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
FR_CORE_RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
FR_CORE_RELIABILITY_CODES = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"
IDNAT_PS = "urn:oid:1.2.250.1.71.4.2.1"
URI = "urn:ietf:rfc:3986"
_CONFIDENTIALITY = {"N": "normal", "R": "restricted", "V": "very restricted"}
_WORLD_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Urls:
    """Where the sandbox is reached: ``root`` (scheme://host:port, no trailing slash) and its FHIR base."""

    root: str

    @property
    def fhir(self) -> str:
        return f"{self.root}/fhir"

    def binary(self, document_id: str) -> str:
        """ITI-68 retrieve URL of a document's attachment (a FHIR Binary read, MHD ITI-68 §2:3.68.4.1)."""
        return f"{self.fhir}/Binary/{document_id}"

    def full(self, resource_type: str, resource_id: str) -> str:
        return f"{self.fhir}/{resource_type}/{resource_id}"


def instant(when: datetime) -> str:
    """A FHIR ``instant`` as this synthetic source writes it: UTC, seconds, or milliseconds when there are some
    (unlike the bridge's own :func:`fhir_bridge.fhir.elements.instant`, always milliseconds: the sandbox plays
    a server with its own precision, which the sync watermarks must take as it comes)."""
    when = when.astimezone(UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond // 1000:03d}"
    return text + "Z"


def entry_uuid(document_id: str) -> str:
    """The DocumentEntry.entryUUID (``DocumentReference.identifier``), stable for a given id."""
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'https://fhir-bridge.dev/sandbox/{document_id}')}"


def patient(p: SandboxPatient) -> Resource:
    """FR Core Patient with a qualified INS (type ``INS-NIR-TEST`` for the test system) and status VALI."""
    return {
        "resourceType": "Patient",
        "id": p.id,
        "meta": {"versionId": "1", "lastUpdated": instant(_WORLD_EPOCH)},
        "extension": [{
            "url": FR_CORE_RELIABILITY,
            "extension": [{"url": "identityStatus", "valueCoding": {
                "system": FR_CORE_RELIABILITY_CODES, "code": "VALI", "display": "Identité validée"}}],
        }],
        "identifier": [
            {"use": "official", "type": {"coding": [{"system": FR_CORE_ID_TYPE, "code": "INS-NIR-TEST"}]},
             "system": INS_NIR_TEST, "value": p.nir},
            {"use": "usual", "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                   "code": "PI"}]},
             "system": f"urn:oid:{SANDBOX_PATIENT_ID_ROOT}", "value": p.id},
        ],
        "name": [{"use": "official", "family": p.family, "given": [p.given]}],
        "gender": p.gender,
        "birthDate": p.birth_date.isoformat(),
    }


def organization(o: SandboxOrganization) -> Resource:
    return {
        "resourceType": "Organization",
        "id": o.id,
        "meta": {"versionId": "1", "lastUpdated": instant(_WORLD_EPOCH)},
        "active": True,
        "type": [{"coding": [{"system": FACILITY_SYSTEM, "code": o.facility_code, "display": o.facility_display}]}],
        "name": o.name,
    }


def _security(doc: SandboxDocument) -> list[Resource]:
    labels: list[Resource] = [{"coding": [{"system": CONFIDENTIALITY_SYSTEM, "code": doc.confidentiality,
                                           "display": _CONFIDENTIALITY[doc.confidentiality]}]}]
    if doc.masked:  # JDV_J08: hidden from health professionals; never forwarded to a reviewer
        labels.append({"coding": [{"system": VISIBILITY_SYSTEM, "code": MASQUE_PS,
                                   "display": "Masqué aux professionnels de santé"}]})
    return labels


def _attachment(doc: SandboxDocument, urls: Urls) -> Resource:
    """MHD forbids inline ``data``; PDSm requires size, hash and title (STANDARDS.md §1)."""
    return {
        "contentType": doc.content_type,
        "language": "fr-FR",
        "url": urls.binary(doc.id),
        "size": doc.size,
        "hash": doc.sha1_b64,
        "title": doc.title,
        "creation": instant(doc.date),
    }


def document_reference(doc: SandboxDocument, world: World, urls: Urls) -> Resource:
    """An MHD Comprehensive / PDSm DocumentReference (MHD 4.2 §2:3.65.4.1.2.1, PDSm 3.1.1)."""
    if doc.submitted is not None:
        return _submitted_reference(doc, urls)
    org = world.organization(doc.organization_id)
    author = world.practitioner(doc.author_id) if doc.author_id else None
    resource: Resource = {
        "resourceType": "DocumentReference",
        "id": doc.id,
        "meta": {"versionId": str(doc.version), "lastUpdated": instant(doc.last_updated)},
    }
    if author is not None:
        resource["contained"] = [{
            "resourceType": "Practitioner",
            "id": "author",
            "identifier": [{"system": IDNAT_PS, "value": author.idnat}],
            "name": [{"family": author.family, "given": [author.given], "prefix": ["Dr"]}],
        }]
    resource.update({
        "masterIdentifier": {"system": URI, "value": doc.master_identifier},
        "identifier": [{"use": "official", "system": URI, "value": entry_uuid(doc.id)}],
        "status": doc.status,
        "docStatus": "final",
        "type": {"coding": [{"system": LOINC, "code": doc.type_code, "display": doc.type_display}]},
        "category": [{"coding": [{"system": CLASS_SYSTEM, "code": doc.class_code, "display": doc.class_display}]}],
        "subject": {"reference": f"Patient/{doc.patient_id}"},
        "date": instant(doc.date),
        "author": [{"reference": "#author"}] if author is not None else [],
        "custodian": {"reference": f"Organization/{doc.organization_id}", "display": org.name if org else ""},
    })
    if not resource["author"]:
        del resource["author"]
    if doc.replaces:
        resource["relatesTo"] = [{"code": "replaces", "target": {"reference": f"DocumentReference/{doc.replaces}"}}]
    resource["securityLabel"] = _security(doc)
    resource["content"] = [{
        "attachment": _attachment(doc, urls),
        "format": {"system": FORMAT_SYSTEM, "code": doc.format_code, "display": doc.format_display},
    }]
    context: Resource = {"period": {"start": instant(doc.date)}}
    if org is not None:
        context["facilityType"] = {"coding": [{"system": FACILITY_SYSTEM, "code": org.facility_code,
                                               "display": org.facility_display}]}
    context["practiceSetting"] = {"coding": [{"system": PRACTICE_SYSTEM, "code": "ETABLISSEMENT",
                                              "display": "Etablissement de santé"}]}
    if doc.study_id:
        context["related"] = [{"reference": f"ImagingStudy/{doc.study_id}"}]
    resource["context"] = context
    return resource


def _submitted_reference(doc: SandboxDocument, urls: Urls) -> Resource:
    """A document written through ITI-65: what the client sent, with the server's id, status and URL."""
    resource: Resource = copy.deepcopy(doc.submitted or {})
    resource["id"] = doc.id
    resource["meta"] = {"versionId": str(doc.version), "lastUpdated": instant(doc.last_updated)}
    resource["status"] = doc.status
    attachment = resource["content"][0]["attachment"]
    attachment.update({"url": urls.binary(doc.id), "size": doc.size, "hash": doc.sha1_b64})
    return resource


def imaging_study(study: SandboxStudy) -> Resource:
    """R4 ImagingStudy: Study UID as ``urn:dicom:uid`` / ``urn:oid:<uid>``, bare series and instance UIDs."""
    modalities = tables()["modalities"]

    def coding(code: str) -> Resource:
        return {"system": DCM, "code": code, "display": modalities[code]["display"]}

    return {
        "resourceType": "ImagingStudy",
        "id": study.id,
        "meta": {"versionId": "1", "lastUpdated": instant(study.last_updated)},
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{study.uid}"}],
        "status": "available",
        "modality": [coding(m) for m in study.modalities],
        "subject": {"reference": f"Patient/{study.patient_id}"},
        "started": instant(study.started),
        "endpoint": [{"reference": f"Endpoint/{study.endpoint_id}"}],
        "numberOfSeries": len(study.series),
        "numberOfInstances": sum(len(s.instances) for s in study.series),
        "description": study.description,
        "series": [
            {
                "uid": s.uid,
                "number": s.number,
                "modality": coding(s.modality),
                "description": s.description,
                "numberOfInstances": len(s.instances),
                "instance": [
                    {"uid": i.uid, "sopClass": {"system": URI, "code": f"urn:oid:{i.sop_class}"}, "number": i.number}
                    for i in s.instances
                ],
            }
            for s in study.series
        ],
    }


def endpoint(e: SandboxEndpoint, urls: Urls) -> Resource:
    """A DICOMweb WADO-RS Endpoint; ``address`` is the service base, no trailing slash (STANDARDS.md §4)."""
    return {
        "resourceType": "Endpoint",
        "id": e.id,
        "meta": {"versionId": "1", "lastUpdated": instant(_WORLD_EPOCH)},
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE_SYSTEM, "code": "dicom-wado-rs", "display": "DICOM WADO-RS"},
        "name": e.name,
        "managingOrganization": {"reference": f"Organization/{e.organization_id}"},
        "payloadType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
                                     "code": "any", "display": "Any"}], "text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom", "application/dicom+json"],
        "address": f"{urls.root}{e.path}".rstrip("/"),
    }


def any_resource(kind: str, item: Any, world: World, urls: Urls) -> Resource:
    """Render a world object by its FHIR type (used by searches)."""
    if kind == "Patient":
        return patient(item)
    if kind == "DocumentReference":
        return document_reference(item, world, urls)
    if kind == "ImagingStudy":
        return imaging_study(item)
    if kind == "Endpoint":
        return endpoint(item, urls)
    if kind == "Organization":
        return organization(item)
    raise ValueError(f"cannot render {kind}")

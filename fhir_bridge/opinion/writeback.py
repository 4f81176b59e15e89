"""Writing the opinion back into the patient's record: an ITI-65 Provide Document Bundle (STANDARDS.md §1).

MHD 4.2 §2:3.65.4.1.2: a ``transaction`` Bundle with exactly one SubmissionSet ``List`` (code
``MHDlistTypes#submissionset``, extension ``ihe-sourceId``, status current, mode working, date, subject, entries
naming the documents), one ``DocumentReference`` per document and a ``Binary`` with its bytes, every entry
POSTed with a ``urn:uuid:`` fullUrl. The DocumentReference follows MHD Comprehensive metadata and what ANS PDSm
adds (custodian, date, author, attachment size/hash/title, ``context.period.start``): type 11488-4 (a
consultation note, also "a second opinion given without seeing the patient", STANDARDS.md §3), the PDF rendering
in French as its one ``content`` (no inline data: the Binary carries it). The metadata codes are data,
``config/write-back.json`` (read by :mod:`fhir_bridge.adapters.reference_data`).

Written at most once per report version: the ``masterIdentifier`` is derived from the report's id and version
(a UUID v5), so a retry after a lost answer is recognised — the source refuses a second document with the same
masterIdentifier, and an ITI-67 search by ``identifier`` finds the first. An amendment replaces the document
written for the previous version (``relatesTo`` ``replaces``: the source marks the old one superseded).
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import Resource

SUBMISSION_SET = {"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset",
                  "display": "SubmissionSet as a FHIR List"}
SOURCE_ID = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId"
URI = "urn:ietf:rfc:3986"
#: the namespace of our masterIdentifiers (UUID v5 of "DiagnosticReport/<id>/_history/<v>")
NAMESPACE = uuid.UUID("7b0d7c1e-3f3a-5e55-9a43-2f8a1d6f0c11")


@dataclass(frozen=True)
class WriteBackConfig:
    """``config/write-back.json``: the metadata this deployment gives the documents it writes."""

    source_id: str
    custodian: Resource
    type: Resource
    class_: Resource
    format: Resource
    confidentiality: Resource
    facility_type: Resource
    practice_setting: Resource
    language: str
    titles: dict[str, str]


def write_back_config_from(data: Any, file: str = "write-back.json") -> WriteBackConfig:
    """The configuration of the parsed ``config/write-back.json`` (``file`` names it in errors)."""
    try:
        return WriteBackConfig(source_id=data["sourceId"], custodian=data["custodian"], type=data["type"],
                               class_=data["class"], format=data["format"], confidentiality=data["confidentiality"],
                               facility_type=data["facilityType"], practice_setting=data["practiceSetting"],
                               language=data["language"], titles=dict(data["titles"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"{file} is not a valid write-back configuration ({type(exc).__name__})") from None


def master_identifier(report_version: str) -> str:
    """The masterIdentifier of the document written for ``DiagnosticReport/<id>/_history/<v>``."""
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, report_version)}"


def provide_bundle(*, report: Resource, pdf: bytes, patient: str, config: WriteBackConfig, now: str,
                   replaces: str | None = None) -> Resource:
    """The ITI-65 Bundle for one version of a final-type report (stored: it has ``id`` and ``meta``).

    ``patient``: the Patient reference at the source (``Patient/<id>``, resolved by ITI-78 first);
    ``replaces``: the source's ``DocumentReference/<id>`` written for an earlier version.
    """
    version = f"DiagnosticReport/{report['id']}/_history/{report['meta']['versionId']}"
    master = master_identifier(version)
    list_url, doc_url, binary_url = (f"urn:uuid:{uuid.uuid5(NAMESPACE, f'{version}#{part}')}"
                                     for part in ("list", "document", "binary"))
    issued = str(report.get("issued") or now)
    title = config.titles.get(config.language, next(iter(config.titles.values())))
    authors = [{"display": str(r.get("display"))} for r in report.get("resultsInterpreter", []) or []
               if r.get("display")]
    document: Resource = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": URI, "value": master},
        "identifier": [{"use": "official", "system": URI, "value": doc_url}],
        "status": "current",
        "docStatus": "amended" if report.get("status") in ("amended", "corrected", "appended") else "final",
        "type": {"coding": [config.type]},
        "category": [{"coding": [config.class_]}],
        "subject": {"reference": patient},
        "date": now,
        "author": authors or [{"display": str(config.custodian.get("display", "fhir-bridge"))}],
        "custodian": config.custodian,
        "description": f"{title} — {version}",
        "securityLabel": [{"coding": [config.confidentiality]}],
        "content": [{
            "attachment": {
                "contentType": "application/pdf",
                "language": config.language,
                "url": binary_url,
                "size": len(pdf),
                "hash": base64.b64encode(hashlib.sha1(pdf).digest()).decode("ascii"),  # noqa: S324 - R4 asks SHA-1
                "title": f"{title}.pdf",
                "creation": issued,
            },
            "format": config.format,
        }],
        "context": {"period": {"start": issued}, "facilityType": {"coding": [config.facility_type]},
                    "practiceSetting": {"coding": [config.practice_setting]}},
    }
    if replaces:
        document["relatesTo"] = [{"code": "replaces", "target": {"reference": replaces}}]
    submission = {
        "resourceType": "List",
        "extension": [{"url": SOURCE_ID, "valueIdentifier": {"value": config.source_id}}],
        "identifier": [{"use": "official", "system": URI, "value": list_url}],
        "status": "current",
        "mode": "working",
        "title": title,
        "code": {"coding": [SUBMISSION_SET]},
        "subject": {"reference": patient},
        "date": now,
        "entry": [{"item": {"reference": doc_url}}],
    }
    binary = {"resourceType": "Binary", "contentType": "application/pdf", "data": base64.b64encode(pdf).decode()}
    entries = [(list_url, submission), (doc_url, document), (binary_url, binary)]
    return {"resourceType": "Bundle", "type": "transaction",
            "entry": [{"fullUrl": url, "resource": resource,
                       "request": {"method": "POST", "url": resource["resourceType"]}}
                      for url, resource in entries]}


def document_location(response: Resource) -> str | None:
    """The ``DocumentReference/<id>`` the source created, from its ``transaction-response`` (entries in the
    order of the request: the List, the DocumentReference, the Binary)."""
    for entry in response.get("entry", []) or []:
        location = str((entry.get("response") or {}).get("location") or "")
        if "DocumentReference/" in location:
            return "DocumentReference/" + location.split("DocumentReference/")[1].split("/_history")[0]
    return None

"""The sandbox's CapabilityStatement: exactly what the routes implement (FHIR R4 http.html#capabilities).

It claims the MHD Document Responder (ITI-67/68) and Document Recipient (ITI-65) actor statements it
behaves like; it does not claim profiles it would not fully meet.
"""

from __future__ import annotations

from fhir_bridge.fhir.resources import FHIR_JSON, Resource
from fhir_bridge.sandbox.render import Urls

_MHD = "https://profiles.ihe.net/ITI/MHD/CapabilityStatement"


def _param(name: str, kind: str, doc: str) -> Resource:
    return {"name": name, "type": kind, "documentation": doc}


def capability_statement(urls: Urls, *, page_cap: int) -> Resource:
    """CapabilityStatement (R4 4.0.1) of a sandbox reached at ``urls``."""
    read = {"code": "read"}
    search = {"code": "search-type"}
    return {
        "resourceType": "CapabilityStatement",
        "id": "fhir-bridge-sandbox",
        "status": "active",
        "experimental": True,
        "date": "2025-01-01",
        "publisher": "fhir-bridge",
        "kind": "instance",
        "instantiates": [f"{_MHD}/IHE.MHD.DocumentResponder", f"{_MHD}/IHE.MHD.DocumentRecipient"],
        "software": {"name": "fhir-bridge sandbox (synthetic national record)", "version": "0.1.0"},
        "implementation": {
            "description": "Synthetic MHD/PDSm document source: test patients, documents and imaging studies",
            "url": urls.fhir,
        },
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON, "json"],
        "rest": [{
            "mode": "server",
            "documentation": f"Searches page at most {page_cap} entries; follow Bundle.link[next].",
            "resource": [
                {
                    "type": "Patient",
                    "interaction": [read, search],
                    "searchParam": [
                        _param("identifier", "token", "INS (system urn:oid:1.2.250.1.213.1.4.10)"),
                        _param("_id", "token", "logical id"),
                    ],
                },
                {
                    "type": "DocumentReference",
                    "interaction": [read, search],
                    "searchParam": [
                        _param("patient", "reference", "ITI-67; the chained patient.identifier is supported too"),
                        _param("status", "token", "ITI-67, required; comma-separated values are ORed"),
                        _param("type", "token", "LOINC document type (JDV_J07)"),
                        _param("category", "token", "class code (TRE_A03)"),
                        _param("date", "date", "DocumentReference.date"),
                        _param("_lastUpdated", "date", "meta.lastUpdated, with ge/gt/le/lt prefixes"),
                        _param("_count", "number", f"page size, capped at {page_cap}"),
                    ],
                },
                {
                    "type": "ImagingStudy",
                    "interaction": [read, search],
                    "searchInclude": ["ImagingStudy:endpoint"],
                    "searchParam": [_param("patient", "reference", "the study's subject"),
                                    _param("_lastUpdated", "date", "meta.lastUpdated, with ge/gt/le/lt prefixes")],
                },
                {"type": "Endpoint", "interaction": [read]},
                {"type": "Organization", "interaction": [read]},
                {"type": "Binary", "interaction": [read],
                 "documentation": "ITI-68: the document's bytes in its own content type"},
                {"type": "List", "interaction": [read], "documentation": "SubmissionSets received by ITI-65"},
            ],
            "interaction": [{"code": "transaction", "documentation": "ITI-65 Provide Document Bundle"}],
        }],
    }

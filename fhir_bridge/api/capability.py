"""The CapabilityStatement: built from the same tables the routes and the store use, so it tells the truth.

FHIR R4 capabilitystatement.html; STANDARDS.md §9 ("GET [base]/metadata → CapabilityStatement that tells
the truth"). A test compares it with the routes actually mounted.
"""

from __future__ import annotations

from typing import Any

from fhir_bridge import __version__
from fhir_bridge.fhir.profiles import Profiles
from fhir_bridge.fhir.search_index import SEARCH_PARAMS
from fhir_bridge.fhir.terminology import CANONICAL_BASE

#: resource type → interactions served (R4 restful-interaction codes)
INTERACTIONS: dict[str, list[str]] = {
    "ServiceRequest": ["create", "read", "vread", "history-instance", "search-type"],
    "Task": ["read", "vread", "history-instance", "search-type"],
    "Bundle": ["read"],
    "DiagnosticReport": ["create", "read", "vread", "update", "delete", "history-instance", "search-type"],
    "AuditEvent": ["read", "search-type"],  # fhir_bridge.api.audit_routes
}
CONDITIONAL_CREATE = frozenset({"ServiceRequest", "DiagnosticReport"})
#: the AuditEvent search parameters (served by fhir_bridge.api.audit_routes over the audit log's own index,
#: fhir_bridge.audit.events.index_terms, not the resource store's SEARCH_PARAMS)
AUDIT_SEARCH_PARAMS: dict[str, tuple[str, str]] = {
    "date": ("date", "When the event was recorded (AuditEvent.recorded); prefixes eq ge gt le lt"),
    "patient": ("token", "The patient's identifier, system|value (also as patient:identifier)"),
    "agent": ("token", "An agent's identifier: a client id, fhir-bridge, the source's base URL"),
    "subtype": ("token", "The event subtype: a restful interaction, an IHE transaction, a case step"),
    "outcome": ("token", "0 success, 4 minor failure, 8 serious failure, 12 major failure"),
    "entity": ("reference", "A resource the event is about (Task/12)"),
}
#: AuditEvent operation → what the statement says of it (served by fhir_bridge.api.audit_routes)
AUDIT_OPERATIONS = {"verify": "Verify the audit chain (hashes, order, signed checkpoints); report the first broken seq"}
#: Task operation → what the statement says of it (served by fhir_bridge.api.operations)
TASK_OPERATIONS = {
    "refresh": "Pull the case again from the source and triage it again",
    "decline": "The assigned reviewer declines the case; it is routed to someone else",
    "request-documents": "The reviewer asks for more documents; the case waits for them",
}
#: resource type → operations served (``POST [type]/{id}/$name``, or type-level ``[type]/$name``)
OPERATIONS: dict[str, dict[str, str]] = {"AuditEvent": AUDIT_OPERATIONS, "Task": TASK_OPERATIONS}
#: resource type → what a client must know beyond the interactions (CapabilityStatement.rest.resource.documentation)
DOCUMENTATION: dict[str, str] = {
    "Bundle": "The case Bundle is streamed as application/fhir+json only; a read asking for XML gets 406.",
    "DiagnosticReport": "One final opinion per case (a second final is 409: amend it with PUT); on a panel's case "
                        "members post preliminary opinions and the coordinator (or the panel's consensus rule) the "
                        "final one; resultsInterpreter, performer and presentedForm (HTML and PDF, fr and en) are "
                        "set by the bridge; delete retracts a preliminary opinion of its author (then 410).",
}
COMMON_SEARCH = [("_count", "number", "Page size"), ("_offset", "number", "Where the page starts")]


def capability_statement(base_url: str, date: str, profiles: Profiles) -> dict[str, Any]:
    """The statement; ``rest.resource.supportedProfile`` names our profile of each type served (``profiles``:
    the process's, loaded with its settings by the composition root)."""
    known = profiles
    resources = []
    for rtype, interactions in INTERACTIONS.items():
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": code} for code in interactions],
            "versioning": "versioned" if "vread" in interactions else "no-version",
            "readHistory": "history-instance" in interactions,
            "updateCreate": False,
        }
        if (profile := known.for_type(rtype)) is not None:
            entry["supportedProfile"] = [profile["url"]]
        if rtype in DOCUMENTATION:
            entry["documentation"] = DOCUMENTATION[rtype]
        if rtype in CONDITIONAL_CREATE:
            entry["conditionalCreate"] = True
        if "update" in interactions:
            entry["conditionalUpdate"] = False
        if OPERATIONS.get(rtype):
            entry["operation"] = [
                {"name": name, "definition": f"{CANONICAL_BASE}/OperationDefinition/{rtype}-{name}",
                 "documentation": text}
                for name, text in OPERATIONS[rtype].items()
            ]
        params = SEARCH_PARAMS.get(rtype) or (AUDIT_SEARCH_PARAMS if rtype == "AuditEvent" else None)
        if params and "search-type" in interactions:
            entry["searchParam"] = [
                {"name": name, "type": kind, "documentation": doc} for name, (kind, doc) in params.items()
            ] + [{"name": n, "type": t, "documentation": d} for n, t, d in COMMON_SEARCH]
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "fhir-bridge",
        "kind": "instance",
        "software": {"name": "fhir-bridge", "version": __version__},
        "implementation": {"description": "fhir-bridge second-opinion exchange", "url": base_url},
        "fhirVersion": "4.0.1",
        # every interaction speaks both, but the streamed case Bundle read (JSON only, 406 for XML: see DOCUMENTATION)
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        "rest": [{"mode": "server", "security": _security(base_url), "resource": resources}],
    }


def _security(base_url: str) -> dict[str, Any]:
    """``rest.security``: SMART Backend Services (R4 capabilitystatement.html, SMART App Launch 2.2
    conformance.html: the ``oauth-uris`` extension names the token endpoint; discovery is the
    ``.well-known/smart-configuration`` document)."""
    root = base_url.removesuffix("/fhir")
    return {
        "cors": False,
        "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                 "code": "SMART-on-FHIR"}]}],
        "description": "SMART Backend Services: client_credentials with a private_key_jwt assertion (RS384/ES384) "
                       f"at {root}/auth/token; Bearer tokens of at most 300 s, system/ scopes; optional mutual TLS "
                       "with certificate-bound tokens. Platforms see their tenant's cases, reviewers the cases "
                       "assigned to them, auditors the AuditEvents; anything else answers 404.",
        "extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                       "extension": [{"url": "token", "valueUri": f"{root}/auth/token"}]}],
    }

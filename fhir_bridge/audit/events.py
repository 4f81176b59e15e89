"""AuditEvents for every exchange, in the shape of IHE BALP 1.1.4 (profiles.ihe.net/ITI/BALP), as plain R4 JSON.

Who saw or sent what about which patient, when, and how it ended (STANDARDS.md §7). Four builders:

* :func:`rest_event`: an inbound call on our FHIR API (BALP §3:5.7.3 RESTful activities). ``type`` rest,
  ``subtype`` the restful-interaction, ``action`` from it, ``outcome`` from the HTTP status; agents the client
  (its client id from the token, the token ``jti`` in ``policy`` as BALP §3:5.7.5.4 maps it) and the bridge;
  entities the patient, the resource (or, for a search, the raw request base64 in ``entity.query``) and the
  ``X-Request-Id`` (BALP ``BasicAuditEntityType#XrequestId``).
* :func:`source_event`: an outbound call to the national-record source: ITI-67 find, ITI-68 retrieve and
  ITI-78 patient query as BALP imports them from MHD/PDQm (``type`` rest, the ITI code as a second subtype);
  ITI-65 as MHD's own ``IHE.MHD.ProvideBundle.Audit.Source`` (DICOM Export, action R, patient and
  submission set entities only: that profile closes the entity slicing).
* :func:`job_event`: a background job step that changed a case (DICOM 110110 "Patient Record").
* :func:`delivery_event`: an opinion sent to the platform that asked for it (DICOM 110106 "Export").

The patient entity carries the patient's identifier (INS) itself: the audit log is the one place where the
bridge records it, because an auditor must answer "who saw what about this patient". Logs and errors never do.

The builders do not validate (fhir.resources costs ~0.5 ms per event; the tests validate every shape), and the
audit log, not the builder, stamps ``id`` and ``recorded`` (see ``fhir_bridge.audit.chain``).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from fhir_bridge.errors import AuditUnavailable as AuditUnavailable  # kept importable from here
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
IHE_EVENT_TYPE = "urn:ihe:event-type-code"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
#: our own subtypes (job steps, deliveries); the CodeSystem belongs in profiles/ once the codes settle
BRIDGE_EVENT = "https://fhir-bridge.dev/fhir/CodeSystem/audit-event"
JTI_PREFIX = "urn:ietf:params:oauth:jti:"  # BALP OAUTHaccessTokenUse: "jti SHALL be prefixed" (RFC 3553)

# R4 restful-interaction → AuditEvent.action (R4 valueset-audit-event-action: C R U D E)
_ACTIONS = {"read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "search-type": "E",
            "search-system": "E", "operation": "E", "create": "C", "update": "U", "patch": "U", "delete": "D",
            "transaction": "E", "batch": "E", "capabilities": "R"}  # fmt: skip
# Who is DICOM "Source" and who "Destination" (STANDARDS.md §7, BALP Read/Query profiles): the data of a read
# flows to the client, which is then the Destination; for a query or a write the client is the Source.
_CLIENT_IS_DESTINATION = frozenset({"read", "vread", "history-instance", "history-type", "capabilities"})
_ROLE_NAMES = {"110153": "Source Role ID", "110152": "Destination Role ID", "110150": "Application"}
# MHD / PDQm transactions the bridge consumes or initiates, with the REST interaction each one is
_TRANSACTIONS = {
    "ITI-67": ("Find Document References", "search-type"),
    "ITI-68": ("Retrieve Document", "read"),
    "ITI-78": ("Mobile Patient Demographics Query", "search-type"),
    "ITI-65": ("Provide Document Bundle", "transaction"),
}
_OBJECT_ROLES = {"3": "Report", "4": "Domain Resource", "20": "Job", "24": "Query"}  # R4 object-role
OUTCOMES = ("0", "4", "8", "12")  # R4 AuditEvent.outcome: success, minor, serious, major failure


@dataclass(frozen=True, slots=True)
class Party:
    """One side of an exchange: a client of our API, the bridge itself, the source, a delivery recipient.

    ``id`` is the identifier value (an OAuth client id, a base URL, a worker name), ``system`` its namespace
    (the token issuer); ``address`` is what the connection showed (IP address, host name or URL); ``jti`` the id
    of the access token that authorised the call; ``name`` a display text.
    """

    id: str
    system: str | None = None
    address: str | None = None
    jti: str | None = None
    name: str | None = None


def outcome_of(status: int | None) -> str:
    """R4 ``AuditEvent.outcome`` for an HTTP status: below 400 success, 4xx minor failure (the request was
    refused), 5xx serious failure (the action stopped part way), no status at all major failure (no answer)."""
    if status is None:
        return "12"
    return "0" if status < 400 else "4" if status < 500 else "8"


def rest_event(
    *,
    interaction: str,
    resource_type: str,
    status: int | None,
    client: Party,
    bridge: Party,
    recorded: datetime | None = None,
    resource_id: str | None = None,
    version_id: str | None = None,
    patient: PatientIdentifier | None = None,
    query: bytes | str | None = None,
    operation: str | None = None,
    request_id: str | None = None,
    outcome_desc: str | None = None,
) -> Resource:
    """An inbound call on our FHIR API (BALP Read / Query / Create / Update patterns).

    ``query`` is the raw request as received (method, URL and, for ``POST _search``, the form body); it is stored
    base64 (BALP: "preserving exactly what was requested, including possibly malicious patterns"). ``operation``
    names the operation (``$verify``) when ``interaction`` is ``operation``.
    """
    if interaction not in _ACTIONS:
        raise InvalidInput(f"{interaction!r} is not a restful-interaction code")
    if interaction == "operation" and not operation:
        raise InvalidInput("an operation event needs the operation's name")
    client_role = "110152" if interaction in _CLIENT_IS_DESTINATION else "110153"
    server_role = "110153" if client_role == "110152" else "110152"
    entities = _patient_entities(patient)
    if interaction.startswith("search"):
        entities.append(_query_entity(query if query is not None else b""))
    else:
        what: Resource = {"type": resource_type}
        if resource_id:  # a create that failed has no id: the entity still says which type was touched
            what["reference"] = f"{resource_type}/{resource_id}" + (f"/_history/{version_id}" if version_id else "")
        entity = _object(what, "4")
        if operation:
            entity["name"] = operation
        entities.append(entity)
    entities += _request_entities(request_id)
    return _event(
        type_=_coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        subtype=[_coding(RESTFUL_INTERACTION, interaction)],
        action=_ACTIONS[interaction],
        outcome=outcome_of(status),
        outcome_desc=outcome_desc,
        recorded=recorded,
        agents=[_agent(client, client_role, requestor=True), _agent(bridge, server_role, requestor=False)],
        bridge=bridge,
        entities=entities,
    )


def source_event(
    *,
    transaction: str,
    status: int | None,
    bridge: Party,
    source: Party,
    patient: PatientIdentifier | None,
    recorded: datetime | None = None,
    query: bytes | str | None = None,
    document: str | None = None,
    submission_set: str | None = None,
    request_id: str | None = None,
    outcome_desc: str | None = None,
) -> Resource:
    """An outbound call of ours to the source (MHD consumer / source side; STANDARDS.md §1 event types).

    ``query``: the raw ITI-67/ITI-78 request (method and URL); ``document``: the ITI-68 attachment URL;
    ``submission_set``: the ITI-65 SubmissionSet (a ``List/<id>`` reference or its ``urn:`` uniqueId).
    """
    if transaction not in _TRANSACTIONS:
        raise InvalidInput(f"unknown transaction {transaction!r}; one of {', '.join(_TRANSACTIONS)}")
    display, interaction = _TRANSACTIONS[transaction]
    iti = _coding(IHE_EVENT_TYPE, transaction, display)
    entities = _patient_entities(patient)
    if transaction == "ITI-65":  # IHE.MHD.ProvideBundle.Audit.Source: Export, action R, entity 2..2 (closed)
        set_ref = submission_set or ""
        what = {"reference": set_ref} if set_ref.startswith("List/") else {"identifier": {"value": set_ref}}
        entities.append(_object({**what, "type": "List"}, "20"))
        return _event(
            type_=_coding(DCM, "110106", "Export"), subtype=[iti], action="R", outcome=outcome_of(status),
            outcome_desc=outcome_desc, recorded=recorded, bridge=bridge, entities=entities,
            agents=[_agent(bridge, "110153", requestor=True), _agent(source, "110152", requestor=False)],
        )  # fmt: skip
    subtype = [_coding(RESTFUL_INTERACTION, interaction), iti]
    if transaction == "ITI-68":  # BALP ex-auditRetrieveDocument-consumer: read, ITI-68, DICOM Import
        subtype.append(_coding(DCM, "110107", "Import"))
        entities.append(_object({"reference": document or ""}, "3"))
        roles = ("110152", "110153")
    else:
        entities.append(_query_entity(query if query is not None else b""))
        roles = ("110153", "110152")
    return _event(
        type_=_coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        subtype=subtype,
        action=_ACTIONS[interaction],
        outcome=outcome_of(status),
        outcome_desc=outcome_desc,
        recorded=recorded,
        agents=[_agent(bridge, roles[0], requestor=True), _agent(source, roles[1], requestor=False)],
        bridge=bridge,
        entities=entities + _request_entities(request_id),
    )


def job_event(
    *,
    step: str,
    case: str,
    bridge: Party,
    patient: PatientIdentifier | None,
    recorded: datetime | None = None,
    action: str = "U",
    outcome: str = "0",
    job_id: str | None = None,
    outcome_desc: str | None = None,
) -> Resource:
    """A job step that created or changed a case (DICOM 110110 "Patient Record", action C or U).

    ``step`` is our subtype code (``collect``, ``triage``, ``package``…); ``case`` the Task reference, versioned
    when known (``Task/123/_history/4``); ``job_id`` the queue job that did it.
    """
    if action not in ("C", "R", "U", "D", "E"):
        raise InvalidInput(f"{action!r} is not an AuditEvent action")
    if outcome not in OUTCOMES:
        raise InvalidInput(f"{outcome!r} is not an AuditEvent outcome")
    entities = _patient_entities(patient)
    entities.append(_object({"reference": case}, "4"))
    if job_id:
        entities.append(_object({"identifier": {"value": job_id}}, "20"))
    return _event(
        type_=_coding(DCM, "110110", "Patient Record"),
        subtype=[_coding(BRIDGE_EVENT, step)],
        action=action,
        outcome=outcome,
        outcome_desc=outcome_desc,
        recorded=recorded,
        agents=[_agent(bridge, "110150", requestor=True)],
        bridge=bridge,
        entities=entities,
    )


def delivery_event(
    *,
    report: str,
    status: int | None,
    bridge: Party,
    recipient: Party,
    patient: PatientIdentifier | None,
    recorded: datetime | None = None,
    case: str | None = None,
    request_id: str | None = None,
    outcome_desc: str | None = None,
) -> Resource:
    """An opinion (``report``: a DiagnosticReport reference) sent out to ``recipient``: DICOM 110106 "Export",
    action R as DICOM and MHD record an export at its source; the bridge is the Source, the recipient the
    Destination."""
    entities = _patient_entities(patient)
    entities.append(_object({"reference": report}, "3"))
    if case:
        entities.append(_object({"reference": case}, "4"))
    return _event(
        type_=_coding(DCM, "110106", "Export"),
        subtype=[_coding(BRIDGE_EVENT, "delivery", "Opinion delivery")],
        action="R",
        outcome=outcome_of(status),
        outcome_desc=outcome_desc,
        recorded=recorded,
        agents=[_agent(bridge, "110153", requestor=True), _agent(recipient, "110152", requestor=False)],
        bridge=bridge,
        entities=entities + _request_entities(request_id),
    )


def index_terms(event: Resource) -> dict[str, list[str]]:
    """The search tokens an AuditEvent answers to (R4 auditevent.html search parameters, tokens as
    ``system|code`` and bare ``code``): patient (the patient entity's identifier), agent (each agent's
    identifier value), subtype, type, action, outcome and entity (each entity's reference, unversioned)."""
    terms: dict[str, list[str]] = {"patient": [], "agent": [], "subtype": [], "type": [], "entity": []}
    codings = [("type", event.get("type") or {})] + [("subtype", coding) for coding in event.get("subtype", [])]
    for name, coding in codings:
        if coding.get("code"):
            terms[name] += [f"{coding.get('system', '')}|{coding['code']}", str(coding["code"])]
    for agent in event.get("agent", []):
        ident = (agent.get("who") or {}).get("identifier") or {}
        if ident.get("value"):
            terms["agent"].append(str(ident["value"]))
    for entity in event.get("entity", []):
        what = entity.get("what") or {}
        role = entity.get("role") or {}
        ident = what.get("identifier") or {}
        if role.get("system") == OBJECT_ROLE and role.get("code") == "1" and ident.get("value"):
            terms["patient"].append(f"{ident.get('system', '')}|{ident['value']}")
        if what.get("reference"):
            terms["entity"].append(str(what["reference"]).split("/_history/")[0])
    terms["action"] = [str(event["action"])] if event.get("action") else []
    terms["outcome"] = [str(event["outcome"])] if event.get("outcome") else []
    return {name: list(dict.fromkeys(values)) for name, values in terms.items() if values}


def _event(
    *,
    type_: Resource,
    subtype: list[Resource],
    action: str,
    outcome: str,
    outcome_desc: str | None,
    recorded: datetime | None,
    agents: list[Resource],
    bridge: Party,
    entities: Iterable[Resource],
) -> Resource:
    event: Resource = {"resourceType": "AuditEvent", "type": type_, "subtype": subtype, "action": action,
                       "recorded": instant(recorded or datetime.now(UTC)), "outcome": outcome}  # fmt: skip
    if outcome_desc:
        event["outcomeDesc"] = outcome_desc
    event["agent"] = agents
    # R4 AuditEvent.source: the bridge records every event itself (security-source-type 4, application server)
    event["source"] = {"observer": _who(bridge), "type": [_coding(SOURCE_TYPE, "4", "Application Server")]}
    event["entity"] = list(entities)
    return event


def _agent(party: Party, role: str, *, requestor: bool) -> Resource:
    agent: Resource = {"type": {"coding": [_coding(DCM, role, _ROLE_NAMES[role])]}, "who": _who(party),
                       "requestor": requestor}  # fmt: skip
    if party.name:
        agent["name"] = party.name
    if party.jti:
        agent["policy"] = [JTI_PREFIX + quote(party.jti, safe=":-._~")]
    if party.address:
        agent["network"] = {"address": party.address, "type": _network_type(party.address)}
    return agent


def _who(party: Party) -> Resource:
    identifier = {"system": party.system, "value": party.id} if party.system else {"value": party.id}
    who: Resource = {"identifier": identifier}
    if party.name:
        who["display"] = party.name
    return who


def _network_type(address: str) -> str:
    """R4 network-type: 1 machine name, 2 IP address, 5 URI."""
    if "://" in address:
        return "5"
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _patient_entities(patient: PatientIdentifier | None) -> list[Resource]:
    if patient is None:
        return []
    what = {"type": "Patient", "identifier": {"system": patient.system, "value": patient.value}}
    return [{"what": what, "type": _coding(ENTITY_TYPE, "1", "Person"), "role": _coding(OBJECT_ROLE, "1", "Patient")}]


def _object(what: Resource, role: str) -> Resource:
    """A system object entity (audit-entity-type 2) in one of the roles BALP RestObjectRoles allows and MHD uses."""
    return {"what": what, "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, role, _OBJECT_ROLES[role])}  # fmt: skip


def _query_entity(query: bytes | str) -> Resource:
    raw = query.encode("utf-8") if isinstance(query, str) else query
    entity = _object({}, "24")
    del entity["what"]  # BALP Query: entity[query].what 0..0
    return entity | {"query": base64.b64encode(raw).decode("ascii")}


def _request_entities(request_id: str | None) -> list[Resource]:
    if not request_id:
        return []
    return [{"what": {"identifier": {"value": request_id}}, "type": _coding(BALP_ENTITY_TYPE, "XrequestId")}]


def _coding(system: str, code: str, display: str | None = None) -> Resource:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding

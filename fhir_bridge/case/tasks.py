"""The case's Task: FHIR workflow Task (``code = fulfill``, ``focus`` = the ServiceRequest) and its states.

Task.status follows the FHIR R4 Task state machine (task.html#statemachine); the finer case state is in
``businessStatus`` (our case-codes): requested → collecting → triaged-ready (or waiting-for-documents) →
in-review → opinion-final → delivered; also rejected, cancelled, failed. A case waiting for documents is
``on-hold`` (started, then held until the source has what triage asked for).
"""

from __future__ import annotations

from fhir_bridge.errors import Conflict
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE, CASE_CODES, Terminology

TASK_CODES = "http://hl7.org/fhir/CodeSystem/task-code"
OUTPUT_TYPES = f"{CANONICAL_BASE}/CodeSystem/task-output"

#: Task.status transitions we make (a subset of the R4 state machine)
TRANSITIONS: dict[str, frozenset[str]] = {
    "requested": frozenset({"in-progress", "failed", "cancelled", "rejected"}),
    "in-progress": frozenset({"ready", "on-hold", "completed", "failed", "cancelled", "in-progress"}),
    "ready": frozenset({"in-progress", "on-hold", "completed", "cancelled", "failed"}),
    "on-hold": frozenset({"in-progress", "cancelled", "failed"}),
    "completed": frozenset({"completed"}),
    "failed": frozenset(),
    "cancelled": frozenset(),
    "rejected": frozenset(),
}


def new_task(sr: Resource, authored_on: str, deadline: str | None, terminology: Terminology) -> Resource:
    task: Resource = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODES, "code": "fulfill"}]},
        "focus": {"reference": f"ServiceRequest/{sr['id']}"},
        "for": {"identifier": sr["subject"]["identifier"]},
        "authoredOn": authored_on,
        "lastModified": authored_on,
        "businessStatus": business_status("requested", terminology),
    }
    if sr.get("requester"):
        task["requester"] = sr["requester"]
    if deadline:
        task["restriction"] = {"period": {"end": deadline}}
    return task


def business_status(code: str, terminology: Terminology) -> Resource:
    return {"coding": [{"system": CASE_CODES, "code": code, "display": terminology.display(CASE_CODES, code)}],
            "text": terminology.display(CASE_CODES, code)}


def state_of(task: Resource) -> str:
    for coding in (task.get("businessStatus") or {}).get("coding", []):
        if coding.get("system") == CASE_CODES:
            return str(coding.get("code"))
    return str(task.get("status"))


def transition(task: Resource, status: str, state: str, now: str, terminology: Terminology,
               *, reason: str | None = None) -> Resource:
    """A copy of the Task moved to ``status``/``state``; Conflict when the state machine forbids it."""
    current = str(task.get("status"))
    if status not in TRANSITIONS.get(current, frozenset()):
        raise Conflict(f"the case can not go from {current} to {status}")
    moved = {k: v for k, v in task.items() if k != "statusReason"}
    moved["status"] = status
    moved["businessStatus"] = business_status(state, terminology)
    moved["lastModified"] = now
    if reason:
        moved["statusReason"] = {"text": reason}
    return moved


def output_type(code: str, display: str) -> Resource:
    """A ``Task.output.type`` from our task-output CodeSystem (case-bundle, left-out, triage, opinion…)."""
    return {"coding": [{"system": OUTPUT_TYPES, "code": code, "display": display}], "text": display}


def task_patient(task: Resource) -> PatientIdentifier | None:
    """The patient of a case: ``Task.for.identifier`` (the INS copied from the request)."""
    return PatientIdentifier.from_element((task.get("for") or {}).get("identifier"))

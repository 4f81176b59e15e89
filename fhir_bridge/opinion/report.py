"""The reviewer's opinion: a FHIR R4 DiagnosticReport answering the case's ServiceRequest.

Rules (STANDARDS.md §5, R4 diagnosticreport.html):

* ``basedOn`` names exactly one ServiceRequest of ours, which must exist and whose case must be ready
  for review; ``subject`` must identify the same patient (``subject.identifier``, the INS);
* a new opinion is ``preliminary`` or ``final``; a later version (PUT) may be ``final`` (from preliminary),
  ``amended``, ``corrected``, ``appended`` or ``entered-in-error``, keeping ``basedOn`` and ``subject``;
* ``issued`` is set when absent.
"""

from __future__ import annotations

from typing import Any

from fhir_bridge.errors import BusinessRuleViolation
from fhir_bridge.fhir.resources import Resource, check_resource_type, validate

NEW_STATUSES = frozenset({"preliminary", "final"})
#: the statuses of a released opinion (diagnosticreport.html status): rendered, delivered, one per case
FINAL_TYPES = frozenset({"final", "amended", "corrected", "appended"})
LATER_STATUSES = frozenset({"preliminary", "final", "amended", "corrected", "appended", "entered-in-error"})
REVIEWABLE_TASK_STATUSES = frozenset({"ready", "in-progress", "completed"})


def based_on_request(report: Resource) -> str:
    """The id of the ServiceRequest the report answers; BusinessRuleViolation unless exactly one."""
    refs = [str(r.get("reference", "")) for r in report.get("basedOn", []) or []]
    requests = [r.split("/_history/")[0].rstrip("/").split("/") for r in refs if "ServiceRequest/" in r]
    if len(requests) != 1 or len(requests[0]) < 2:
        raise BusinessRuleViolation("DiagnosticReport.basedOn must reference exactly one ServiceRequest",
                                    expression=["basedOn"])
    return requests[0][-1]


def check_new_opinion(resource: Any) -> Resource:
    report = check_resource_type(resource, "DiagnosticReport")
    validate(report)
    if report.get("status") not in NEW_STATUSES:
        raise BusinessRuleViolation("a new opinion is 'preliminary' or 'final'", expression=["status"])
    based_on_request(report)
    return report


def check_against_case(report: Resource, request: Resource, task: Resource) -> None:
    """The report must be about the request's patient, and the case must be ready for review."""
    theirs = (report.get("subject") or {}).get("identifier") or {}
    ours = (request.get("subject") or {}).get("identifier") or {}
    if (theirs.get("system"), str(theirs.get("value", "")).upper()) != (ours.get("system"),
                                                                         str(ours.get("value", "")).upper()):
        raise BusinessRuleViolation("DiagnosticReport.subject is not the patient of the ServiceRequest",
                                    expression=["subject"])
    if task.get("status") not in REVIEWABLE_TASK_STATUSES or (
        task.get("status") == "in-progress" and _state(task) == "collecting"
    ):
        raise BusinessRuleViolation("the case is not ready for review yet", expression=["basedOn"])


def check_amendment(new: Any, current: Resource) -> Resource:
    report = check_resource_type(new, "DiagnosticReport")
    validate(report)
    if report.get("status") not in LATER_STATUSES:
        raise BusinessRuleViolation(f"status {report.get('status')!r} is not a valid later version",
                                    expression=["status"])
    if current.get("status") in ("final", "amended", "corrected", "appended") and report.get("status") in (
        "preliminary",
    ):
        raise BusinessRuleViolation("a final opinion can not go back to preliminary", expression=["status"])
    if based_on_request(report) != based_on_request(current):
        raise BusinessRuleViolation("an amendment must keep basedOn", expression=["basedOn"])
    if (report.get("subject") or {}).get("identifier") != (current.get("subject") or {}).get("identifier"):
        raise BusinessRuleViolation("an amendment must keep the subject", expression=["subject"])
    return report


def _state(task: Resource) -> str:
    codings = (task.get("businessStatus") or {}).get("coding", [])
    return str(codings[0].get("code")) if codings else ""

"""The second-opinion request: what a platform must send, checked before anything is stored.

A request is a FHIR R4 ``ServiceRequest`` (workflow pattern, STANDARDS.md §5):

* ``code``: our ``case-codes#second-opinion`` or ``#tumor-board-opinion`` (mappings/case-codes.json);
* ``subject.identifier``: the patient's INS (an INS system of STANDARDS.md §2, a valid NIR), because the
  requesting platform and the source do not share Patient ids;
* ``category``: the specialty (mappings/specialty.json), which decides triage rules and reviewers;
* ``reasonCode`` and/or ``note``: the clinical question; ``occurrenceDateTime`` or ``occurrencePeriod.end``:
  the deadline; ``requester``; the proposed treatment plan as a ``note`` or ``supportingInfo``.
* ``status`` active (draft is not a request yet), ``intent`` order/original-order;
* optionally the extension ``https://fhir-bridge.dev/fhir/StructureDefinition/write-back`` (valueBoolean):
  ``true`` asks for the final opinion to be written back into the patient's record at the source (ITI-65,
  :mod:`fhir_bridge.opinion.writeback`); the platform asks it because the patient agreed to it.

Violations are :class:`BusinessRuleViolation` (HTTP 422), structural problems :class:`MalformedResource` (400).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_bridge.errors import BusinessRuleViolation, InvalidIdentifier
from fhir_bridge.fhir.identity import NIR_SYSTEMS, PatientIdentifier, validate_nir
from fhir_bridge.fhir.resources import Resource, check_resource_type, validate
from fhir_bridge.fhir.terminology import CANONICAL_BASE, CASE_CODES, Terminology

SPECIALTY = f"{CANONICAL_BASE}/CodeSystem/specialty"
REQUEST_CODES = frozenset({"second-opinion", "tumor-board-opinion"})
WRITE_BACK = f"{CANONICAL_BASE}/StructureDefinition/write-back"


@dataclass(frozen=True, slots=True)
class OpinionRequest:
    """What the workflow needs from a checked ServiceRequest: decided once, at intake (:func:`check_request`),
    and read back from the stored request by every later job (:func:`request_facts`)."""

    patient: PatientIdentifier
    specialty: str
    kind: str
    deadline: str | None
    write_back: bool = False


def check_request(resource: Any, terminology: Terminology) -> OpinionRequest:
    """Check a posted ServiceRequest (structure first, then our rules)."""
    sr = check_resource_type(resource, "ServiceRequest")
    validate(sr)
    if sr.get("status") != "active":
        raise BusinessRuleViolation("a second-opinion request must have status 'active'", expression=["status"])
    if sr.get("intent") not in ("order", "original-order"):
        raise BusinessRuleViolation("a second-opinion request must have intent 'order'", expression=["intent"])
    kind = _kind(sr)
    if kind is None:
        raise BusinessRuleViolation(
            f"ServiceRequest.code must be {CASE_CODES}#second-opinion or #tumor-board-opinion", expression=["code"]
        )
    identifier = (sr.get("subject") or {}).get("identifier") or {}
    system, value = identifier.get("system"), identifier.get("value")
    if system not in NIR_SYSTEMS or not isinstance(value, str):
        raise BusinessRuleViolation(
            "ServiceRequest.subject must identify the patient by INS (subject.identifier with an INS system)",
            expression=["subject.identifier"],
        )
    try:
        value = validate_nir(value)
    except InvalidIdentifier as exc:
        raise BusinessRuleViolation(f"subject.identifier: {exc.message}", expression=["subject.identifier"]) from None
    known = _specialties(terminology)
    specialty = _specialty(sr, known)
    if specialty is None:
        raise BusinessRuleViolation(
            f"ServiceRequest.category must give the specialty from {SPECIALTY} ({', '.join(sorted(known))})",
            expression=["category"],
        )
    if not sr.get("reasonCode") and not sr.get("note"):
        raise BusinessRuleViolation("the clinical question is missing (reasonCode or note)",
                                    expression=["reasonCode", "note"])
    flags = [e for e in sr.get("extension", []) or [] if e.get("url") == WRITE_BACK]
    if len(flags) > 1 or (flags and not isinstance(flags[0].get("valueBoolean"), bool)):
        raise BusinessRuleViolation(f"at most one {WRITE_BACK} extension, with a valueBoolean",
                                    expression=["extension"])
    return OpinionRequest(patient=PatientIdentifier(system, value), specialty=specialty, kind=kind,
                          deadline=_deadline(sr), write_back=asks_write_back(sr))


def request_facts(stored: Resource, terminology: Terminology) -> OpinionRequest:
    """The facts of a request the bridge stored: it passed :func:`check_request` at intake and its INS was
    stored in normal form, so they are read back as they were decided, without validating the resource again
    (fhir.resources validation costs milliseconds, and every collect, refresh and decline needs the facts)."""
    patient = PatientIdentifier.from_element((stored.get("subject") or {}).get("identifier"))
    kind, specialty = _kind(stored), _specialty(stored, _specialties(terminology))
    if patient is None or kind is None or specialty is None:
        raise BusinessRuleViolation("the stored request lacks what intake checked (subject, code, category)")
    return OpinionRequest(patient=patient, specialty=specialty, kind=kind, deadline=_deadline(stored),
                          write_back=asks_write_back(stored))


def _kind(sr: Resource) -> str | None:
    kinds = [c.get("code") for c in (sr.get("code") or {}).get("coding", []) if c.get("system") == CASE_CODES]
    return next((k for k in kinds if k in REQUEST_CODES), None)


def _specialties(terminology: Terminology) -> set[str]:
    return {c["code"] for c in terminology.resources.get("specialty", {}).get("concept", [])}


def _specialty(sr: Resource, known: set[str]) -> str | None:
    specialties = [c.get("code") for cat in sr.get("category", []) or [] for c in cat.get("coding", []) or []
                   if c.get("system") == SPECIALTY]
    return next((s for s in specialties if s in known), None)


def _deadline(sr: Resource) -> str | None:
    deadline = sr.get("occurrenceDateTime") or (sr.get("occurrencePeriod") or {}).get("end")
    return str(deadline) if deadline else None


def asks_write_back(request: Resource) -> bool:
    """Whether a (stored, so checked) request asks for the final opinion in the patient's record."""
    return any(e.get("url") == WRITE_BACK and e.get("valueBoolean") is True for e in request.get("extension", []) or [])

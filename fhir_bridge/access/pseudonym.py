"""Pseudonymised cases for reviewers abroad: a case pseudonym instead of the INS, and the way back.

Cross-border reviewers (issue 6; networks in ``config/reviewer-networks.json``, a reviewer's network on their
PractitionerRole in ``config/reviewers.json``, both read by :mod:`fhir_bridge.adapters.reference_data`) read
every case through these transforms:

* the **case pseudonym** is ``CP-`` and 24 base32 characters of HMAC-SHA256(bridge secret, Task id): stable for
  the case (refreshes keep the Task), different between cases, and not computable without the secret, which
  never leaves ``<data_dir>/keys``; nothing about the patient goes into it, so no INS can be guessed from it.
  It travels as an Identifier of system :data:`PSEUDONYM_SYSTEM`;
* every **Patient** (the bundle's, contained ones) keeps only its gender, the year of birth (and of death),
  its security labels and the pseudonym: no name, identifier, address, telecom, contact, photo, extension or
  narrative (R4 patient.html);
* every **reference to the patient** (``subject``, ``for``, ``patient``, ``sourcePatientInfo`` or one naming a
  Patient of the bundle) loses its ``display`` and carries the pseudonym instead of its identifier; any other
  INS-system identifier (FR Core, STANDARDS.md §2) is replaced by the pseudonym too;
* every other **string** (titles, descriptions, narrative, ``meta.source`` URLs; codes, systems and references
  excepted) has the patient's identifier values and name parts replaced by the pseudonym, whole words, any
  case: free text is not trusted to be clean;
* **Binary** resources, the documents themselves, are NOT rewritten (a PDF or a CDA document still names the
  patient): the README says so, and networks that must not see them should not be sent the case.

The mapping back stays in the bridge: :func:`reidentify_opinion` puts the INS back into an opinion posted
with the pseudonym, and the stored case Bundle of a case is indexed by its pseudonym (:data:`PSEUDONYM_TERM`),
so :meth:`fhir_bridge.workflow.case_bundles.CaseBundles.case_for_pseudonym` finds the case.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_bridge.errors import BusinessRuleViolation, InvalidInput
from fhir_bridge.fhir.identity import NIR_SYSTEMS
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.review.reviewers import ReviewerRegistry

PSEUDONYM_SYSTEM = f"{CANONICAL_BASE}/NamingSystem/case-pseudonym"
#: index term of a stored case Bundle stub (never a search parameter: clients can not send ``_`` criteria)
PSEUDONYM_TERM = "_case-pseudonym"
#: HL7 v3 ObservationValue "pseudonymized": the security label on a served pseudonymised Bundle's meta
PSEUDONYMISED_LABEL = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "PSEUDED",
                       "display": "pseudonymized"}
_DOMAIN = b"fhir-bridge case pseudonym v1\x00"
_PATIENT_KEYS = frozenset({"subject", "for", "patient", "sourcePatientInfo"})
#: strings that are codes, not text: never rewritten (a patient named like a code must not break the resource)
_CODED = frozenset({"resourceType", "system", "code", "status", "docStatus", "use", "gender", "contentType",
                    "language", "reference", "fullUrl", "url", "type", "mode", "intent", "priority", "id"})


class CasePseudonyms:
    """Case pseudonyms under one secret key (at least 32 random bytes, ``<data_dir>/keys``)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise InvalidInput("the case pseudonym key must hold at least 32 bytes")
        self._key = bytes(key)

    def of(self, task_id: str) -> str:
        """The pseudonym of the case whose Task is ``task_id``."""
        digest = hmac.new(self._key, _DOMAIN + task_id.encode("utf-8"), hashlib.sha256).digest()
        return "CP-" + base64.b32encode(digest[:15]).decode("ascii")

    def belongs_to(self, pseudonym: str, task_id: str) -> bool:
        return hmac.compare_digest(self.of(task_id), pseudonym)


@dataclass(frozen=True)
class ReviewerNetworks:
    """Which reviewer networks read cases pseudonymised (``config/reviewer-networks.json``)."""

    default: str
    pseudonymised: frozenset[str]
    known: frozenset[str]
    file: str = field(default="reviewer-networks.json", compare=False)  # named in errors

    def pseudonymises(self, network: str | None) -> bool:
        return (network or self.default) in self.pseudonymised

    def check(self, registry: ReviewerRegistry) -> None:
        """Refuse, at start-up, a reviewer in a network the file does not define (a typo must not silently
        send a cross-border reviewer the INS)."""
        for reviewer in registry.reviewers.values():
            if reviewer.network is not None and reviewer.network not in self.known:
                raise InvalidInput(f"PractitionerRole/{reviewer.id} is in network {reviewer.network!r}, which "
                                   f"{self.file} does not define")


def networks_from(document: Any, file: str = "reviewer-networks.json") -> ReviewerNetworks:
    """The networks of the parsed ``config/reviewer-networks.json`` (``file`` names it in errors)."""
    try:
        networks = document["networks"]
        default = document["defaultNetwork"]
        flags = {str(name): network["pseudonymise"] for name, network in networks.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InvalidInput(f"{file}: cannot read the reviewer networks") from None
    if default not in flags or not all(isinstance(flag, bool) for flag in flags.values()):
        raise InvalidInput(f"{file}: defaultNetwork must be one of the networks, and each network "
                           "must say pseudonymise true or false")
    return ReviewerNetworks(default=default, pseudonymised=frozenset(n for n, f in flags.items() if f),
                            known=frozenset(flags), file=file)


def pseudonym_identifier(pseudonym: str) -> Resource:
    return {"system": PSEUDONYM_SYSTEM, "value": pseudonym}


def pseudonymise_patient(patient: Resource, pseudonym: str) -> Resource:
    """A Patient reduced to what a reviewer abroad needs: gender, birth (and death) year, the pseudonym."""
    out: Resource = {"resourceType": "Patient"}
    if isinstance(patient.get("id"), str):
        out["id"] = patient["id"]  # a contained Patient is referenced as "#id"
    security = (patient.get("meta") or {}).get("security")
    if security:
        out["meta"] = {"security": copy.deepcopy(security)}
    out["identifier"] = [pseudonym_identifier(pseudonym)]
    if isinstance(patient.get("gender"), str):
        out["gender"] = patient["gender"]
    for key in ("birthDate", "deceasedDateTime"):
        if isinstance(patient.get(key), str) and len(patient[key]) >= 4:
            out[key] = patient[key][:4]  # a year is a valid R4 date and dateTime
    if isinstance(patient.get("deceasedBoolean"), bool):
        out["deceasedBoolean"] = patient["deceasedBoolean"]
    return out


def pseudonymise_bundle(bundle: Resource, pseudonym: str) -> Resource:
    """The case Bundle for a pseudonymised reader; Binary entries are passed through untouched."""
    entries = bundle.get("entry") or []
    resources = [e.get("resource") or {} for e in entries]
    patients = [r for r in resources if r.get("resourceType") == "Patient"]
    patients += [c for r in resources for c in r.get("contained") or [] if c.get("resourceType") == "Patient"]
    scrub = _Scrubber(pseudonym, patients, {str(e.get("fullUrl")) for e, r in zip(entries, resources, strict=True)
                                            if r.get("resourceType") == "Patient"})
    out = dict(bundle)
    out["entry"] = [entry if (entry.get("resource") or {}).get("resourceType") == "Binary" else scrub(entry)
                    for entry in entries]
    return out


def pseudonymise_view(resource: Resource, pseudonym: str) -> Resource:
    """A ServiceRequest, Task or DiagnosticReport as a pseudonymised reader sees it: ``subject``/``for`` carry
    the pseudonym, no display names the patient, no INS or name of the patient is left anywhere in it."""
    patients = [c for c in resource.get("contained") or [] if c.get("resourceType") == "Patient"]
    subjects = [resource.get(key) for key in ("subject", "for")]
    patients += [{"identifier": [s["identifier"]]} for s in subjects
                 if isinstance(s, dict) and isinstance(s.get("identifier"), dict)]
    result: Resource = _Scrubber(pseudonym, patients, set())(resource)
    return result


def reidentify_opinion(report: Resource, pseudonym: str, identifier: Mapping[str, Any]) -> Resource:
    """An opinion posted by a pseudonymised reviewer, with the case's INS (``identifier``, the ServiceRequest's
    subject) back in place of the pseudonym. Its subject must be exactly the case pseudonym: a reviewer abroad
    never names the patient otherwise, and a pseudonym of another case is refused."""
    theirs = (report.get("subject") or {}).get("identifier")
    if theirs != pseudonym_identifier(pseudonym):
        raise BusinessRuleViolation("DiagnosticReport.subject must identify the case by its pseudonym "
                                    f"({PSEUDONYM_SYSTEM})", expression=["subject"])
    ours = dict(identifier)

    def put_back(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj == pseudonym_identifier(pseudonym):
                return dict(ours)
            return {k: put_back(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [put_back(v) for v in obj]
        return obj

    result: Resource = put_back(report)
    result["subject"] = {"identifier": dict(ours)}
    return result


class _Scrubber:
    """Rewrites one resource (or bundle entry) for a pseudonymised reader; see the module docstring."""

    def __init__(self, pseudonym: str, patients: Iterable[Resource], patient_urls: set[str]) -> None:
        self.pseudonym = pseudonym
        self.identifier = pseudonym_identifier(pseudonym)
        self.patient_urls = patient_urls
        words: set[str] = set()
        self.values: set[tuple[Any, str]] = set()
        for patient in patients:
            for ident in _as_list(patient.get("identifier")):
                if isinstance(ident, dict) and ident.get("value"):
                    self.values.add((ident.get("system"), str(ident["value"]).upper()))
                    words.add(str(ident["value"]))
            for name in _as_list(patient.get("name")):
                if isinstance(name, dict):
                    parts = [name.get("family"), name.get("text"), *_as_list(name.get("given"))]
                    words.update(str(p) for p in parts if isinstance(p, str) and len(p.strip()) > 1)
        alternatives = sorted((re.escape(w.strip()) for w in words if w.strip()), key=len, reverse=True)
        self.text = re.compile(rf"(?<!\w)(?:{'|'.join(alternatives)})(?!\w)", re.IGNORECASE) if alternatives else None

    def __call__(self, obj: Any, key: str | None = None) -> Any:
        if isinstance(obj, str):
            return self.text.sub(self.pseudonym, obj) if self.text is not None and key not in _CODED else obj
        if isinstance(obj, list):
            out = [self(item, key) for item in obj]
            # two identifiers of the patient both became the pseudonym: keep it once
            return [v for i, v in enumerate(out) if v != self.identifier or self.identifier not in out[:i]]
        if not isinstance(obj, dict):
            return obj
        if obj.get("resourceType") == "Patient":
            return pseudonymise_patient(obj, self.pseudonym)
        if key in ("identifier", "valueIdentifier") and self._is_patients(obj):
            return dict(self.identifier)
        if self._names_patient(obj, key):
            reference = obj.get("reference")
            if isinstance(reference, str) and reference.startswith(("urn:uuid:", "#")):
                return {"reference": reference, **({"identifier": dict(self.identifier)} if "identifier" in obj
                                                   else {})}
            return {"identifier": dict(self.identifier)}
        return {k: self(v, k) for k, v in obj.items()}

    def _is_patients(self, identifier: Resource) -> bool:
        system, value = identifier.get("system"), str(identifier.get("value", "")).upper()
        return system in NIR_SYSTEMS or (system, value) in self.values or system == PSEUDONYM_SYSTEM

    def _names_patient(self, obj: Resource, key: str | None) -> bool:
        """A Reference (R4 references.html) to the patient: by its place, its target or its identifier."""
        if not any(k in obj for k in ("reference", "identifier", "display")) or "resourceType" in obj:
            return False
        if key in _PATIENT_KEYS or obj.get("reference") in self.patient_urls:
            return True
        identifier = obj.get("identifier")
        return isinstance(identifier, dict) and ("reference" in obj or "display" in obj or "type" in obj) and (
            self._is_patients(identifier))


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]

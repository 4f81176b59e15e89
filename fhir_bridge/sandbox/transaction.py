"""ITI-65 Provide Document Bundle, as the sandbox's Document Recipient receives it (MHD 4.2 §2:3.65).

The Bundle is checked whole before anything is stored, so a refused Bundle leaves the world untouched
(MHD §2:3.65.4.1.3: the recipient processes the bundle atomically). Only JSON is taken, though MHD asks a
Document Recipient to accept ``application/fhir+xml`` too. What is checked:

* a ``transaction`` Bundle of List, DocumentReference and Binary entries POSTed with a ``fullUrl``, plus the
  UpdateDocumentRefs ``PATCH DocumentReference/<id>`` entries (FHIRPath Patch setting status to
  ``superseded``, MHD §2:3.65.4.1.2.3) of the documents being replaced;
* exactly one SubmissionSet List (``MHDlistTypes#submissionset``) whose entries are the Bundle's
  DocumentReferences;
* each DocumentReference: status ``current``, a new ``masterIdentifier``, a ``subject`` that is a Patient of
  this server, exactly one ``content`` whose ``attachment.url`` is the ``fullUrl`` of a Binary of the Bundle
  (and no inline ``data``), declared size/hash (if any) matching the Binary, and ``relatesTo.replaces``
  targets that are current documents of the same patient — those become ``superseded``, with or without
  their PATCH entry (a Document Recipient may be robust, MHD §2:3.65.4.1.3).

Structural faults raise :class:`MalformedResource` (400); rule violations :class:`BusinessRuleViolation`
(422); a masterIdentifier already known raises :class:`Conflict` (409).
"""

from __future__ import annotations

import base64
import binascii
import copy
import uuid
from datetime import UTC, datetime
from typing import Any

from fhir_bridge.errors import BusinessRuleViolation, Conflict, MalformedResource
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.sandbox.content import sha1_b64
from fhir_bridge.sandbox.model import CURRENT, SUPERSEDED, SandboxDocument, World
from fhir_bridge.sandbox.render import CLASS_SYSTEM, CONFIDENTIALITY_SYSTEM, LOINC, MASQUE_PS, instant
from fhir_bridge.sandbox.search import reference_id

SUBMISSION_SET = ("https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "submissionset")


def _coding(concept: Any, system: str | None = None) -> dict[str, Any]:
    codings = concept.get("coding", []) if isinstance(concept, dict) else []
    for coding in codings:
        if system is None or coding.get("system") == system:
            return dict(coding)
    return {}


def _is_submission_set(resource: Resource) -> bool:
    return any(
        (c.get("system"), c.get("code")) == SUBMISSION_SET for c in resource.get("code", {}).get("coding", [])
    )


def _parse_instant(value: Any, fallback: datetime) -> datetime:
    if not isinstance(value, str):
        return fallback
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedResource("DocumentReference.date is not a FHIR instant", expression=["date"]) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class _Entries:
    """The Bundle's entries sorted by kind, with the structural checks."""

    def __init__(self, bundle: Resource) -> None:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise MalformedResource("ITI-65 expects a transaction Bundle", expression=["Bundle.type"])
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise MalformedResource("the transaction Bundle has no entries", expression=["Bundle.entry"])
        self.order: list[tuple[str, Resource]] = []
        self.by_url: dict[str, Resource] = {}
        #: UpdateDocumentRefs: request url "DocumentReference/<id>" → the FHIRPath Patch Parameters
        self.patches: dict[int, tuple[str, Resource]] = {}
        for n, entry in enumerate(entries):
            where = [f"Bundle.entry[{n}]"]
            if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
                raise MalformedResource("each entry needs a resource", expression=where)
            resource, full_url = entry["resource"], entry.get("fullUrl") or f"#entry-{n}"
            request = entry.get("request") or {}
            kind = resource.get("resourceType")
            if request.get("method") == "PATCH" and kind == "Parameters":
                self.patches[n] = (str(request.get("url", "")), resource)
            elif request.get("method") != "POST":
                raise MalformedResource("ITI-65 entries are POSTed, or PATCHed for UpdateDocumentRefs",
                                        expression=where)
            elif kind not in ("List", "DocumentReference", "Binary"):
                raise BusinessRuleViolation(f"ITI-65 accepts List, DocumentReference and Binary, not {kind}",
                                            expression=where)
            elif not isinstance(entry.get("fullUrl"), str):
                raise MalformedResource("each created entry needs a fullUrl", expression=where)
            if full_url in self.by_url:
                raise MalformedResource("two entries share one fullUrl", expression=where)
            self.by_url[full_url] = resource
            self.order.append((full_url, resource))

    def of(self, kind: str) -> list[tuple[str, Resource]]:
        return [(url, r) for n, (url, r) in enumerate(self.order)
                if r["resourceType"] == kind and n not in self.patches]


def _superseding_patch(world: World, url: str, parameters: Resource) -> str:
    """The id of the DocumentReference an UpdateDocumentRefs PATCH marks superseded (MHD §2:3.65.4.1.2.3).

    Only that one FHIRPath Patch is accepted: replace ``DocumentReference.status`` by ``superseded``.
    """
    operations = [p for p in parameters.get("parameter", []) if p.get("name") == "operation"]
    parts = {part.get("name"): part for op in operations for part in op.get("part", [])}
    value = parts.get("value", {})
    if (
        len(operations) != 1
        or parts.get("type", {}).get("valueCode") != "replace"
        or parts.get("path", {}).get("valueString") != "DocumentReference.status"
        or (value.get("valueCode") or value.get("valueString")) != SUPERSEDED
    ):
        raise BusinessRuleViolation("an ITI-65 PATCH may only set DocumentReference.status to superseded")
    if not url.startswith("DocumentReference/") or world.document(reference_id(url, "DocumentReference")) is None:
        raise BusinessRuleViolation("the PATCH does not target a DocumentReference of this server")
    return reference_id(url, "DocumentReference")


def provide(world: World, bundle: Resource, *, now: datetime | None = None) -> Resource:
    """Validate and store an ITI-65 Bundle; return the ``transaction-response`` Bundle."""
    now = now or datetime.now(UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # what meta.lastUpdated can say
    entries = _Entries(bundle)
    lists = [(u, r) for u, r in entries.of("List") if _is_submission_set(r)]
    if len(lists) != 1 or len(entries.of("List")) != 1:
        raise BusinessRuleViolation("ITI-65 needs exactly one SubmissionSet List (MHDlistTypes#submissionset)")
    references = entries.of("DocumentReference")
    if not references:
        raise BusinessRuleViolation("the Bundle carries no DocumentReference")
    list_url, submission = lists[0]
    listed = {item.get("item", {}).get("reference") for item in submission.get("entry", [])}
    seen_masters: set[str] = set()
    used_binaries: set[str] = set()
    new_docs: list[SandboxDocument] = []
    supersede: dict[str, datetime] = {}
    ids: dict[str, str] = {}
    patients: set[str] = set()
    for n, (url, ref) in enumerate(references):
        doc, binary_url, replaced = _document(world, ref, entries, n, now)
        if url not in listed:
            raise BusinessRuleViolation("every DocumentReference must be an entry of the SubmissionSet")
        if doc.master_identifier in seen_masters or world.has_master_identifier(doc.master_identifier):
            raise Conflict("a document with this masterIdentifier already exists", expression=["masterIdentifier"])
        if binary_url in used_binaries:
            raise BusinessRuleViolation("two DocumentReferences point at one Binary")
        seen_masters.add(doc.master_identifier)
        used_binaries.add(binary_url)
        for old in replaced:
            if old in supersede:
                raise BusinessRuleViolation("two documents replace the same document")
            supersede[old] = now
        ids[url] = doc.id
        ids[binary_url] = doc.id
        patients.add(doc.patient_id)
        new_docs.append(doc)
    if any(u not in ids for u, _ in entries.of("Binary")):
        raise BusinessRuleViolation("a Binary is not the attachment of any DocumentReference")
    patched = {n: _superseding_patch(world, url, params) for n, (url, params) in entries.patches.items()}
    if not set(patched.values()) <= set(supersede):
        raise BusinessRuleViolation("a PATCH supersedes a document that no DocumentReference of the Bundle replaces")
    subject = (submission.get("subject") or {}).get("reference")
    if subject and {reference_id(subject, "Patient")} != patients:
        raise BusinessRuleViolation("the SubmissionSet subject is not the documents' patient")
    list_id = f"ss-{uuid.uuid4().hex[:16]}"
    stored = copy.deepcopy(submission)
    stored.update({"id": list_id, "meta": {"versionId": "1", "lastUpdated": instant(now)}})
    for item in stored.get("entry", []):
        target = item.get("item", {}).get("reference")
        if target in ids:
            item["item"]["reference"] = f"DocumentReference/{ids[target]}"
    world.add_documents(new_docs, supersede)
    world.submission_sets[list_id] = stored
    locations = {list_url: f"List/{list_id}/_history/1"}
    locations.update({u: f"DocumentReference/{ids[u]}/_history/1" for u, _ in references})
    locations.update({u: f"Binary/{ids[u]}/_history/1" for u, _ in entries.of("Binary")})

    def response(n: int, url: str) -> Resource:
        if n in patched:
            old = world.document(patched[n])
            version = old.version if old else 1
            return {"status": "200 OK", "location": f"DocumentReference/{patched[n]}/_history/{version}",
                    "etag": f'W/"{version}"', "lastModified": instant(now)}
        return {"status": "201 Created", "location": locations[url], "etag": 'W/"1"', "lastModified": instant(now)}

    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "transaction-response",
        "entry": [{"response": response(n, url)} for n, (url, _) in enumerate(entries.order)],
    }


def _document(
    world: World, ref: Resource, entries: _Entries, n: int, now: datetime
) -> tuple[SandboxDocument, str, list[str]]:
    """One DocumentReference checked and turned into a stored document (not stored yet)."""
    where = f"DocumentReference[{n}]"
    if ref.get("status") != CURRENT:
        raise BusinessRuleViolation("a provided DocumentReference has status current", expression=[f"{where}.status"])
    master = (ref.get("masterIdentifier") or {}).get("value")
    if not isinstance(master, str) or not master:
        raise BusinessRuleViolation("masterIdentifier is required (MHD)", expression=[f"{where}.masterIdentifier"])
    subject = (ref.get("subject") or {}).get("reference")
    patient = world.patient(reference_id(subject, "Patient")) if isinstance(subject, str) else None
    if patient is None:
        raise BusinessRuleViolation("the subject is not a Patient of this server", expression=[f"{where}.subject"])
    content = ref.get("content")
    if not isinstance(content, list) or len(content) != 1:
        raise BusinessRuleViolation("exactly one content is allowed (MHD)", expression=[f"{where}.content"])
    attachment = content[0].get("attachment") or {}
    if "data" in attachment:
        raise BusinessRuleViolation("MHD forbids inline attachment.data", expression=[f"{where}.content"])
    binary_url = attachment.get("url")
    binary = entries.by_url.get(binary_url) if isinstance(binary_url, str) else None
    if not isinstance(binary_url, str) or binary is None or binary.get("resourceType") != "Binary":
        raise BusinessRuleViolation("attachment.url must be the fullUrl of a Binary in the Bundle",
                                    expression=[f"{where}.content.attachment.url"])
    try:
        data = base64.b64decode(binary.get("data", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise MalformedResource("Binary.data is not base64", expression=["Binary.data"]) from None
    digest = sha1_b64(data)
    if attachment.get("size") not in (None, len(data)) or attachment.get("hash") not in (None, digest):
        raise BusinessRuleViolation("attachment size or hash does not match the Binary",
                                    expression=[f"{where}.content.attachment"])
    replaced = []
    for relation in ref.get("relatesTo", []) or []:
        if relation.get("code") != "replaces":
            continue
        old = world.document(reference_id(str((relation.get("target") or {}).get("reference", "")),
                                           "DocumentReference"))
        if old is None or old.patient_id != patient.id or old.status != CURRENT:
            raise BusinessRuleViolation("relatesTo.replaces must target a current document of the same patient",
                                        expression=[f"{where}.relatesTo"])
        replaced.append(old.id)
    doc_id = f"doc-{uuid.uuid4().hex[:12]}"
    submitted = copy.deepcopy(ref)
    submitted.pop("id", None)
    submitted["subject"] = {"reference": f"Patient/{patient.id}"}
    for relation, old_id in zip((r for r in submitted.get("relatesTo", []) if r.get("code") == "replaces"),
                                replaced, strict=True):
        relation["target"] = {"reference": f"DocumentReference/{old_id}"}
    type_coding = _coding(ref.get("type"), LOINC) or _coding(ref.get("type"))
    class_coding = _coding((ref.get("category") or [{}])[0], CLASS_SYSTEM)
    labels = ref.get("securityLabel", []) or []
    confidentiality = next((c.get("code") for label in labels for c in label.get("coding", [])
                            if c.get("system") == CONFIDENTIALITY_SYSTEM), "N")
    fmt = _coding(content[0].get("format"))
    when = _parse_instant(ref.get("date"), now)
    doc = SandboxDocument(
        id=doc_id, patient_id=patient.id, master_identifier=master, type_code=type_coding.get("code", ""),
        type_display=type_coding.get("display", ""), class_code=class_coding.get("code", ""),
        class_display=class_coding.get("display", ""), format_code=fmt.get("code", ""),
        format_display=fmt.get("display", ""),
        content_type=str(attachment.get("contentType") or binary.get("contentType") or "application/octet-stream"),
        title=str(attachment.get("title", "")), date=when, last_updated=now, size=len(data), sha1_b64=digest,
        organization_id="", masked=any(c.get("code") == MASQUE_PS for label in labels for c in label.get("coding", [])),
        confidentiality=confidentiality if confidentiality in ("N", "R", "V") else "N", data=data,
        submitted=submitted,
    )
    return doc, binary_url, replaced

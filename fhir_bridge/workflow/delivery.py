"""Delivering a final opinion: the requesting client's webhook, and the write-back into the patient's record.

Both run as queue jobs (at least once, retried with backoff by the queue, ``[delivery]`` settings), one per
report **version**, with job ids that make enqueueing idempotent:

* ``deliver-webhook`` (``webhook:<client>:<report>:<version>``): a signed notification to the webhook of the
  client that sent the request (``clients add --webhook``), in the Standard Webhooks form
  (standardwebhooks.com): headers ``webhook-id`` (the job id: the same on every retry, so a receiver that got
  it twice can tell), ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256(id.timestamp.body)>``.
  The body names the resources (``ServiceRequest``, ``Task``, the ``DiagnosticReport`` version) and carries no
  patient data: the client reads the report with its own token. Any 2xx acknowledges it; anything else, or no
  answer, is recorded and retried until it succeeds or the attempts run out (then a dead letter that
  ``fhir-bridge sync deliver`` re-drives).
* ``deliver-record`` (``record:<report>:<version>``): ITI-65 of the French PDF rendering
  (:mod:`fhir_bridge.opinion.writeback`), when the request asked for it; the patient is resolved at the source first
  (ITI-78), a version already written is found again (ITI-67 by ``identifier``) instead of written twice, and
  the location the source returns is recorded on the case.

Every attempt is on the audit trail (``delivery_event`` for webhooks, the source client's ITI-65 event for the
record). Each success adds a ``Task.output`` (``notification`` or ``record-document``) naming the report version
it delivered (extension ``delivery-of``); when every delivery the case needs for its current final version is
done, the case moves to ``delivered``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import structlog

from fhir_bridge.audit import context as audit_context
from fhir_bridge.audit.events import Party, delivery_event
from fhir_bridge.case.intake import asks_write_back
from fhir_bridge.case.tasks import output_type, task_patient
from fhir_bridge.errors import BusinessRuleViolation, Conflict, DeliveryFailed, SourceRejected
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.opinion.report import FINAL_TYPES
from fhir_bridge.opinion.writeback import document_location, master_identifier, provide_bundle
from fhir_bridge.ports import Job, SourcePort, WebhookTarget
from fhir_bridge.rendering.forms import form_bytes
from fhir_bridge.workflow.collaborators import CaseRules, Ports
from fhir_bridge.workflow.taskbook import TaskBook

log = structlog.get_logger("fhir_bridge.delivery")

WEBHOOK_JOB, RECORD_JOB = "deliver-webhook", "deliver-record"
DELIVERY_KINDS = (WEBHOOK_JOB, RECORD_JOB)
DELIVERY_OF = f"{CANONICAL_BASE}/StructureDefinition/delivery-of"
#: ``meta.source`` of a ServiceRequest: the client that sent it (the one to notify)
CLIENT_SOURCE = "urn:fhir-bridge:client:"


def requesting_client(request: Resource) -> str | None:
    source = str((request.get("meta") or {}).get("source") or "")
    return source.removeprefix(CLIENT_SOURCE) if source.startswith(CLIENT_SOURCE) else None


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks signature: ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` with the secret's
    key (the base64 after ``whsec_``)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


class Deliveries:
    """Enqueues and runs the deliveries of final opinions."""

    def __init__(self, ports: Ports, rules: CaseRules, *, book: TaskBook, agent: Party | None = None,
                 public_base: str = "") -> None:
        self.ports, self.rules, self.book = ports, rules, book
        self.agent, self.public_base = agent, public_base.rstrip("/")

    def _target(self, client: str) -> WebhookTarget | None:
        """The client's webhook, if it registered one (and this bridge delivers webhooks at all)."""
        return self.ports.webhooks.target(client) if self.ports.webhooks is not None else None

    async def enqueue(self, report: Resource, task: Resource, request: Resource, *, event: str) -> None:
        """The deliveries of one report version (idempotent: a retried call enqueues nothing new): the webhook
        of the requesting client, and the record when the request asks for it (a final-type version only)."""
        version = report["meta"]["versionId"]
        client = requesting_client(request)
        if client and self._target(client) is not None:
            await self.ports.queue.enqueue(WEBHOOK_JOB, {"report": report["id"], "version": version, "event": event,
                                                   "client": client},
                                     job_id=f"webhook:{client}:{report['id']}:{version}")
        if asks_write_back(request) and report["status"] in FINAL_TYPES:
            await self.ports.queue.enqueue(RECORD_JOB, {"report": report["id"], "version": version},
                                     job_id=f"record:{report['id']}:{version}")
        if report["status"] in FINAL_TYPES:
            await self._maybe_delivered(task["id"], report, request)

    # -- the webhook ------------------------------------------------------------------------------------

    async def run_webhook_job(self, job: Job) -> None:
        report = await self.ports.store.vread("DiagnosticReport", job.payload["report"], str(job.payload["version"]))
        request_id = str(report["basedOn"][0]["reference"]).rpartition("/")[2]
        request = await self.ports.store.read("ServiceRequest", request_id)
        task = await self.book.for_request(request_id)
        client = str(job.payload["client"])
        target = self._target(client)
        if target is None:
            log.warning("delivery.no_webhook", client=client, job=job.id)
            return  # the client's webhook was removed since: nothing to deliver to
        version = f"DiagnosticReport/{report['id']}/_history/{report['meta']['versionId']}"
        sent_at = int(self.ports.clock().timestamp())
        body = json.dumps({
            "type": job.payload.get("event", "opinion.final"),
            "timestamp": instant(self.ports.clock()),
            "data": {"serviceRequest": f"ServiceRequest/{request_id}", "task": f"Task/{task['id']}",
                     "diagnosticReport": version, "status": report["status"],
                     **({"fhirBase": f"{self.public_base}/fhir"} if self.public_base else {})},
        }, separators=(",", ":")).encode()
        headers = {"content-type": "application/json", "webhook-id": job.id, "webhook-timestamp": str(sent_at),
                   "webhook-signature": sign_webhook(target.secret, job.id, sent_at, body)}
        status: int | None = None
        try:
            status = await self.ports.webhooks.send(target.url, body, headers) if self.ports.webhooks else None
        except DeliveryFailed as exc:
            await self._audit_webhook(version, task, client, None, exc.message)
            raise
        if status is None or not 200 <= status < 300:
            await self._audit_webhook(version, task, client, status, f"the webhook answered HTTP {status}")
            raise DeliveryFailed(f"the webhook of client {client} answered HTTP {status}")
        await self._audit_webhook(version, task, client, status, None)
        await self._record(task, "notification", "Opinion notified",
                           {"reference": version, "display": f"webhook of {client}: {job.payload.get('event')}"},
                           version)
        await self._maybe_delivered(task["id"], report, request)

    async def _audit_webhook(self, version: str, task: Resource, client: str, status: int | None,
                             error: str | None) -> None:
        if self.ports.audit is None or self.agent is None:
            return
        event = delivery_event(report=version, status=status if status is not None else 503, bridge=self.agent,
                               recipient=Party(client, name=f"webhook of {client}"), patient=task_patient(task),
                               case=f"Task/{task['id']}", request_id=audit_context.job_id.get(),
                               outcome_desc=error)
        await self.ports.audit.append(event)

    # -- the record --------------------------------------------------------------------------------------

    async def run_record_job(self, job: Job) -> None:
        if self.ports.source is None or self.rules.write_back is None:
            raise BusinessRuleViolation("no source or write-back configuration: the opinion can not be written back")
        report = await self.ports.store.vread("DiagnosticReport", job.payload["report"], str(job.payload["version"]))
        request_id = str(report["basedOn"][0]["reference"]).rpartition("/")[2]
        request = await self.ports.store.read("ServiceRequest", request_id)
        task = await self.book.for_request(request_id)
        version = f"DiagnosticReport/{report['id']}/_history/{report['meta']['versionId']}"
        if any(_delivery_of(o) == version for o in _outputs(task, "record-document")):
            return  # written by an earlier run of this job
        pdf = form_bytes(report, "application/pdf", self.rules.write_back.language)
        if pdf is None:
            raise BusinessRuleViolation("the opinion has no PDF rendering to write back")
        patient = task_patient(task)
        if patient is None:
            raise BusinessRuleViolation("the case names no patient")
        previous = [o for o in _outputs(task, "record-document") if _delivery_of(o) != version]
        replaces = _source_relative(previous[-1]) if previous else None
        with audit_context.bound(patient=patient):
            async with self.ports.source() as source:
                found = await source.find_patient(patient)
                patient_ref = f"Patient/{found['id']}"
                location = await self._already_written(source, found["id"], version)
                if location is None:
                    bundle = provide_bundle(report=report, pdf=pdf, patient=patient_ref, config=self.rules.write_back,
                                            now=instant(self.ports.clock()), replaces=replaces)
                    try:
                        response = await source.provide_document_bundle(bundle, patient=patient)
                        location = document_location(response)
                    except SourceRejected as exc:
                        if exc.status != 409:
                            raise
                        location = await self._already_written(source, found["id"], version)  # a lost answer
                if location is None:
                    raise Conflict("the source did not say where it stored the document")
                absolute = source.absolute(location)
        await self._record(task, "record-document", "Opinion written back to the patient's record",
                           {"reference": absolute, "display": f"{version} in the patient's record"}, version)
        await self._maybe_delivered(task["id"], report, request)

    async def _already_written(self, source: SourcePort, patient_id: str, version: str) -> str | None:
        """The source's DocumentReference already holding this version (ITI-67 by masterIdentifier)."""
        found = await source.find_document_references(patient_id,
                                                      extra={"identifier": master_identifier(version)})
        return f"DocumentReference/{found[0]['id']}" if found else None

    # -- the case -----------------------------------------------------------------------------------------

    async def _record(self, task: Resource, code: str, display: str, value: Resource, version: str) -> None:
        output = {"extension": [{"url": DELIVERY_OF, "valueReference": {"reference": version}}],
                  "type": output_type(code, display), "valueReference": value}

        def add(t: Resource) -> None:
            if not any(_delivery_of(o) == version and o.get("valueReference") == value for o in _outputs(t, code)):
                t["output"] = [*(t.get("output") or []), output]

        await self.book.edit(await self.ports.store.read("Task", task["id"]), add)

    async def _maybe_delivered(self, task_id: str, report: Resource, request: Resource) -> None:
        """``delivered`` once the current final version has reached everyone it must."""
        task = await self.ports.store.read("Task", task_id)
        current = await self.ports.store.read("DiagnosticReport", report["id"])
        if current["status"] not in FINAL_TYPES or task["status"] != "completed":
            return
        version = f"DiagnosticReport/{current['id']}/_history/{current['meta']['versionId']}"
        client = requesting_client(request)
        needs_webhook = bool(client and self._target(client) is not None)
        needs_record = asks_write_back(request)
        if not needs_webhook and not needs_record:
            return
        done_webhook = any(_delivery_of(o) == version for o in _outputs(task, "notification"))
        done_record = any(_delivery_of(o) == version for o in _outputs(task, "record-document"))
        if (done_webhook or not needs_webhook) and (done_record or not needs_record):
            await self.book.move(task, "completed", "delivered")



def _outputs(task: Resource, code: str) -> list[Resource]:
    return [o for o in task.get("output", []) or []
            if any(c.get("code") == code for c in (o.get("type") or {}).get("coding", []))]


def _delivery_of(output: Resource) -> str | None:
    for extension in output.get("extension", []) or []:
        if extension.get("url") == DELIVERY_OF:
            return str((extension.get("valueReference") or {}).get("reference"))
    return None


def _source_relative(output: Resource) -> str | None:
    reference = str((output.get("valueReference") or {}).get("reference") or "")
    return "DocumentReference/" + reference.split("DocumentReference/")[1] if "DocumentReference/" in reference \
        else None

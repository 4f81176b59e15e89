"""``fhir-bridge demo``: the whole path on embedded defaults, as real processes, then everything stopped.

A private redis-server, the sandbox source, the API and a worker are started on free ports; a platform asks a
multidisciplinary panel (the Heart Team of ``config/reviewers.json``) for an opinion on the sandbox's cardiology
patient, with write-back into the record; the worker pulls, packages and triages the case; the three panel
members post their opinions (one dissents), the coordinator issues the consensus with its HTML and PDF; the
platform's webhook (a receiver the demo runs, checking the Standard Webhooks signature) is notified, the opinion
is written back into the record (ITI-65) and found there again (ITI-67); the auditor verifies the audit chain.
Files land in ``--out``.

Nothing bypasses security: every client (the platform, the reviewer the case is routed to) is registered with its
own key pair (:mod:`fhir_bridge.dev.clients`) and calls with SMART Backend Services tokens.
"""

from __future__ import annotations

import base64
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.case.intake import WRITE_BACK
from fhir_bridge.dev.clients import DevClients, provision
from fhir_bridge.dev.processes import ProcessGroup, free_port
from fhir_bridge.dev.webhook_receiver import WebhookReceiver
from fhir_bridge.fhir.terminology import CANONICAL_BASE

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
LOINC = "http://loinc.org"
OPINION = f"{CANONICAL_BASE}/CodeSystem/opinion"


@dataclass
class DemoResult:
    out_dir: Path
    bundle_path: Path
    report_path: Path
    documents: int
    studies: int
    left_out: list[tuple[str, str]]
    conclusion: str
    seconds: float
    renderings: list[Path] = field(default_factory=list)
    dissents: int = 0
    notified: bool = False
    record_document: str = ""
    audit: str = ""


def second_opinion_request(patient: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The request a health-record platform sends (see README, "The flow")."""
    return {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "identifier": [{"system": "https://platform.example/requests", "value": request_id}],
        "code": {"coding": [{"system": f"{CANONICAL_BASE}/CodeSystem/case-codes", "code": "second-opinion"}]},
        "category": [{"coding": [{"system": f"{CANONICAL_BASE}/CodeSystem/specialty",
                                  "code": patient.get("specialty", "oncology")}]}],
        "subject": {"identifier": patient["identifier"]},
        "reasonCode": [{"text": "Confirmer le diagnostic et évaluer le plan de traitement proposé"}],
        "note": [{"text": "Plan proposé : chirurgie puis chimiothérapie adjuvante."}],
        "occurrenceDateTime": "2026-12-31T12:00:00Z",
        "requester": {"display": "Dr Sophie Bernard, CH de Valence"},
    }


def opinion_report(request_id: str, patient: dict[str, Any], *, status: str = "final",
                   diagnosis: str | None = "confirmed", plan: str | None = "agree",
                   conclusion: str = "Diagnostic confirmé. Le plan proposé est approprié ; une TEP de contrôle est "
                                     "recommandée.",
                   alternatives: tuple[str, ...] = (), tests: tuple[str, ...] = ("TEP-TDM de contrôle à 3 mois",),
                   risk: str | None = "Bénéfice attendu supérieur aux risques opératoires.",
                   codes: tuple[tuple[str, str, str], ...] = ()) -> dict[str, Any]:
    """A second opinion as a reviewer posts it: the coded content as contained Observations in ``result``
    (CodeSystem ``opinion``, see fhir_bridge.opinion.content), the conclusion and its codes."""
    items: list[dict[str, Any]] = []

    def item(code: str, **value: Any) -> None:
        items.append({"resourceType": "Observation", "id": f"item-{len(items) + 1}", "status": status if status
                      in ("preliminary", "final", "amended", "corrected") else "final",
                      "code": {"coding": [{"system": OPINION, "code": code}]}, **value})

    if diagnosis:
        item("diagnosis-agreement", valueCodeableConcept={"coding": [{"system": OPINION, "code": diagnosis}]})
    if plan:
        item("treatment-plan-assessment", valueCodeableConcept={"coding": [{"system": OPINION, "code": plan}]})
    for text in alternatives:
        item("alternative-treatment", valueString=text)
    for text in tests:
        item("recommended-test", valueCodeableConcept={"text": text})
    if risk:
        item("risk-benefit", valueString=risk)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": status,
        "basedOn": [{"reference": f"ServiceRequest/{request_id}"}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "OTH"}]}],
        "code": {"coding": [{"system": LOINC, "code": "11488-4", "display": "Consult note"}]},
        "subject": {"identifier": patient["identifier"]},
        "conclusion": conclusion,
    }
    if items:
        report["contained"] = items
        report["result"] = [{"reference": f"#{i['id']}"} for i in items]
    if codes:
        report["conclusionCode"] = [{"coding": [{"system": system, "code": code, "display": display}]}
                                    for system, code, display in codes]
    return report


def reviewer_opinion(request_id: str, patient: dict[str, Any]) -> dict[str, Any]:
    """The demo reviewer's final opinion: diagnosis confirmed, plan agreed, one test recommended."""
    return opinion_report(request_id, patient)


def run_demo(out_dir: Path, console: Console, *, log_level: str = "WARNING") -> DemoResult:
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fhir-bridge-demo-") as tmp:
        data_dir = Path(tmp)
        with EmbeddedRedis(data_dir, appendfsync="always") as redis, ProcessGroup(out_dir / "logs") as group:
            console.print(f"[bold]redis[/]   private redis-server at {redis.url}")
            sandbox_port, api_port = free_port(), free_port()
            source = f"http://127.0.0.1:{sandbox_port}/fhir"
            api = f"http://127.0.0.1:{api_port}/fhir"
            group.start("sandbox", ["sandbox", "--port", str(sandbox_port), "--patients", "3"],
                        health_url=f"http://127.0.0.1:{sandbox_port}/healthz")
            console.print(f"[bold]source[/]  sandbox national record at {source}")
            receiver = WebhookReceiver(port=free_port(), secret="")
            clients = provision(data_dir / "clients.json", data_dir / "client-keys",
                                webhooks={"platform": receiver.url})
            receiver.secret = clients.clients["platform"].webhook_secret or ""
            receiver.start()
            console.print(f"[bold]clients[/] {len(clients.clients)} registered (platforms, reviewers, auditor, "
                          f"operator), each with its own ES384 key; the platform's webhook at {receiver.url}")
            env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": source,
                   "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": log_level}
            group.start("api", ["serve", "--port", str(api_port)], health_url=f"http://127.0.0.1:{api_port}/readyz",
                        extra_env=env)
            group.start("worker", ["worker", "--name", "demo-worker"], extra_env=env)
            console.print(f"[bold]api[/]     fhir-bridge API at {api}, one worker")
            try:
                with httpx.Client(timeout=30) as http:
                    result = _scenario(http, api, f"http://127.0.0.1:{sandbox_port}", out_dir, console, clients,
                                       receiver)
            finally:
                receiver.stop()
    result.seconds = time.monotonic() - started
    return result


def _scenario(http: httpx.Client, api: str, sandbox: str, out_dir: Path, console: Console,
              clients: DevClients, receiver: WebhookReceiver) -> DemoResult:
    world = http.get(f"{sandbox}/_sandbox/world").raise_for_status().json()
    http.auth = clients.auth("platform", api)
    patient = next(p for p in world["patients"] if p.get("specialty") == "cardiology")
    request = second_opinion_request(patient, "DEMO-0001")
    request["code"]["coding"][0]["code"] = "tumor-board-opinion"
    request["reasonCode"] = [{"text": "Rétrécissement aortique serré symptomatique : chirurgie ou TAVI ?"}]
    request["note"] = [{"text": "Plan proposé : remplacement valvulaire aortique chirurgical."}]
    request["extension"] = [{"url": WRITE_BACK, "valueBoolean": True}]
    answer = http.post(f"{api}/ServiceRequest", json=request, headers={
        **FHIR_JSON, "If-None-Exist": "identifier=https://platform.example/requests|DEMO-0001"})
    answer.raise_for_status()
    sr = answer.json()
    console.print(f"[bold]request[/] ServiceRequest/{sr['id']} created ({answer.status_code}): a panel opinion, "
                  "with write-back into the record")

    task = _wait_task(http, api, sr["id"], console)
    state = task["businessStatus"]["coding"][0]["code"]
    console.print(f"[bold]task[/]    Task/{task['id']} is {task['status']} ({state}), due "
                  f"{task['restriction']['period']['end']}")
    triage: dict[str, Any] = next((c for c in task.get("contained", []) if c.get("id") == "triage"), {"issue": []})
    findings = [i for i in triage["issue"] if i.get("details")]
    blocking = sum(1 for i in findings if i.get("severity") in ("error", "fatal"))
    console.print(f"[bold]triage[/]  {len(findings)} finding(s), {blocking} blocking; routed to "
                  f"{(task.get('owner') or {}).get('display', 'nobody yet')}")
    bundle_ref = next(o["valueReference"]["reference"] for o in task["output"]
                      if o["type"]["coding"][0]["code"] == "case-bundle")
    owner = task["owner"]["reference"]
    panel = clients.registry.panels[owner.rpartition("/")[2]]
    member_auth = {m: clients.auth(f"reviewer-{m}", api) for m in panel.members}
    case_bundle = http.get(f"{api}/{bundle_ref}", auth=member_auth[panel.members[0]]).raise_for_status().content
    bundle_path = out_dir / "bundle.json"
    bundle_path.write_bytes(case_bundle)
    parsed = json.loads(case_bundle)
    types = [e["resource"]["resourceType"] for e in parsed["entry"]]
    left_out = []
    for contained in task.get("contained", []):
        if contained.get("id") != "left-out":
            continue
        for issue in contained.get("issue", []):
            codes = (issue.get("details") or {}).get("coding") or []
            if codes:
                left_out.append((codes[0]["code"], issue.get("diagnostics", "")))

    # each member gives a position; the last one dissents (a TAVI rather than surgery)
    for n, member in enumerate(panel.members):
        dissent = n == len(panel.members) - 1 and len(panel.members) > 2
        opinion = opinion_report(sr["id"], patient, status="preliminary",
                                 plan="alternative-proposed" if dissent else "agree",
                                 alternatives=("TAVI par voie fémorale",) if dissent else (),
                                 conclusion="Anatomie favorable à un TAVI." if dissent
                                 else "Remplacement valvulaire chirurgical recommandé.")
        posted = http.post(f"{api}/DiagnosticReport", json=opinion, headers=FHIR_JSON, auth=member_auth[member])
        if posted.status_code != 201:
            raise RuntimeError(f"a panel member's opinion was refused: {posted.status_code} {posted.text[:300]}")
        console.print(f"[bold]member[/]  {clients.registry.reviewers[member].display}: "
                      + ("dissents (alternative proposed)" if dissent else "agrees with the plan"))
    consensus = opinion_report(
        sr["id"], patient, conclusion="Consensus de la Heart Team : remplacement valvulaire aortique chirurgical ; "
                                      "l'option TAVI est rediscutée si le risque opératoire augmente.",
        tests=("Coronarographie préopératoire",),
        codes=(("https://smt.esante.gouv.fr/terminologie-cim-10", "I35.0", "Sténose aortique"),))
    posted = http.post(f"{api}/DiagnosticReport", json=consensus, headers=FHIR_JSON,
                       auth=member_auth[panel.coordinator or panel.members[0]])
    if posted.status_code != 201:
        raise RuntimeError(f"the panel's consensus was refused: {posted.status_code} {posted.text[:300]}")
    report = posted.json()
    dissents = [o for o in report.get("contained", []) if o["code"]["coding"][0]["code"] == "dissenting-opinion"]
    console.print(f"[bold]review[/]  DiagnosticReport/{report['id']}: the panel's final opinion "
                  f"({len(report['resultsInterpreter'])} members, {len(dissents)} dissent kept), HTML and PDF "
                  "in French and English")
    found = http.get(f"{api}/DiagnosticReport", params={"based-on": f"ServiceRequest/{sr['id']}",
                                                         "status": "final"}).json()
    if found.get("total") != 1:
        raise RuntimeError("the final report was not found by based-on search")
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(found["entry"][0]["resource"], ensure_ascii=False, indent=2), "utf-8")
    renderings = []
    for form in report["presentedForm"]:
        suffix = "pdf" if form["contentType"] == "application/pdf" else "html"
        path = out_dir / f"report-{form['language']}.{suffix}"
        path.write_bytes(base64.b64decode(form["data"]))
        renderings.append(path)

    notified = bool(receiver.wait_for(1, timeout=30))
    console.print(f"[bold]webhook[/] the platform was notified ({receiver.received[0].event['type']}, "
                  "signature verified)")
    delivered = _wait_delivered(http, api, task["id"])
    record = next(o["valueReference"]["reference"] for o in delivered["output"]
                  if o["type"]["coding"][0]["code"] == "record-document")
    in_record = http.get(f"{sandbox}/fhir/DocumentReference/{record.rsplit('/', 1)[1]}",
                         auth=None).raise_for_status().json()
    console.print(f"[bold]record[/]  written back with ITI-65 and found again: {record} "
                  f"({in_record['type']['coding'][0]['code']}, {in_record['status']})")
    console.print(f"[bold]task[/]    Task/{task['id']} is {delivered['status']} "
                  f"({delivered['businessStatus']['coding'][0]['code']})")
    verified = http.get(f"{api}/AuditEvent/$verify", auth=clients.auth("auditor", api)).raise_for_status().json()
    result = {p["name"]: p.get("valueString", p.get("valueInteger", p.get("valueBoolean")))
              for p in verified["parameter"]}
    audit_path = out_dir / "audit-verify.json"
    audit_path.write_text(json.dumps(verified, indent=2), "utf-8")
    console.print(f"[bold]audit[/]   chain verified by the auditor: {result.get('result')} "
                  f"({result.get('count')} events)")
    return DemoResult(out_dir=out_dir, bundle_path=bundle_path, report_path=report_path,
                      documents=types.count("DocumentReference"), studies=types.count("ImagingStudy"),
                      left_out=left_out, conclusion=report["conclusion"], seconds=0.0, renderings=renderings,
                      dissents=len(dissents), notified=notified, record_document=record,
                      audit=f"{result.get('result')} ({result.get('count')} events): {audit_path}")


def _wait_task(http: httpx.Client, api: str, sr_id: str, console: Console) -> dict[str, Any]:
    task: dict[str, Any] = {}
    deadline = time.monotonic() + 45
    with console.status("collecting the case from the source…"):
        while time.monotonic() < deadline:
            bundle = http.get(f"{api}/Task", params={"focus": f"ServiceRequest/{sr_id}"}).raise_for_status().json()
            task = bundle["entry"][0]["resource"] if bundle.get("entry") else {}
            if task.get("status") in ("ready", "failed"):
                break
            time.sleep(0.2)
    if task.get("status") != "ready":
        raise RuntimeError(f"the case did not become ready: {task.get('status')} "
                           f"{(task.get('statusReason') or {}).get('text', '')}")
    return task


def _wait_delivered(http: httpx.Client, api: str, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 45
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = http.get(f"{api}/Task/{task_id}").raise_for_status().json()
        if task["businessStatus"]["coding"][0]["code"] == "delivered":
            return task
        time.sleep(0.2)
    raise RuntimeError(f"the opinion was not delivered: {task.get('businessStatus')}")

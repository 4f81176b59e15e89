"""``fhir-bridge demo``: the whole path on embedded defaults, as real processes, then everything stopped.

A private redis-server, the sandbox source, the API and a worker are started on free ports; a platform asks
for a second opinion on the sandbox's oncology patient; the worker pulls and packages the case; a scripted
reviewer posts a final DiagnosticReport; the platform finds it by ``based-on``. Files land in ``--out``.

Nothing bypasses security: every client (the platform, the reviewer the case is routed to) is registered with its
own key pair (:mod:`fhir_bridge.adapters.dev_clients`) and calls with SMART Backend Services tokens.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from fhir_bridge.adapters.dev_clients import DevClients, provision
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.processes import ProcessGroup, free_port
from fhir_bridge.terminology import CANONICAL_BASE

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
    (CodeSystem ``opinion``, see fhir_bridge.opinion_content), the conclusion and its codes."""
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
            clients = provision(data_dir / "clients.json", data_dir / "client-keys")
            console.print(f"[bold]clients[/] {len(clients.clients)} registered (platforms, reviewers, auditor, "
                          "operator), each with its own ES384 key")
            env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": source,
                   "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": log_level}
            group.start("api", ["serve", "--port", str(api_port)], health_url=f"http://127.0.0.1:{api_port}/readyz",
                        extra_env=env)
            group.start("worker", ["worker", "--name", "demo-worker"], extra_env=env)
            console.print(f"[bold]api[/]     fhir-bridge API at {api}, one worker")
            with httpx.Client(timeout=30) as http:
                result = _scenario(http, api, f"http://127.0.0.1:{sandbox_port}", out_dir, console, clients)
    result.seconds = time.monotonic() - started
    return result


def _scenario(http: httpx.Client, api: str, sandbox: str, out_dir: Path, console: Console,
              clients: DevClients) -> DemoResult:
    world = http.get(f"{sandbox}/_sandbox/world").raise_for_status().json()
    http.auth = clients.auth("platform", api)
    patient = next(p for p in world["patients"] if p.get("specialty") == "oncology")
    request = second_opinion_request(patient, "DEMO-0001")
    answer = http.post(f"{api}/ServiceRequest", json=request, headers={
        **FHIR_JSON, "If-None-Exist": "identifier=https://platform.example/requests|DEMO-0001"})
    answer.raise_for_status()
    sr = answer.json()
    console.print(f"[bold]request[/] ServiceRequest/{sr['id']} created ({answer.status_code})")

    task: dict[str, Any] = {}
    deadline = time.monotonic() + 45
    with console.status("collecting the case from the source…"):
        while time.monotonic() < deadline:
            bundle = http.get(f"{api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).raise_for_status().json()
            task = bundle["entry"][0]["resource"] if bundle.get("entry") else {}
            if task.get("status") in ("ready", "failed"):
                break
            time.sleep(0.2)
    if task.get("status") != "ready":
        raise RuntimeError(f"the case did not become ready: {task.get('status')} "
                           f"{(task.get('statusReason') or {}).get('text', '')}")
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
    reviewer = clients.auth(clients.reviewer_for(task["owner"]["reference"]), api)
    case_bundle = http.get(f"{api}/{bundle_ref}", auth=reviewer).raise_for_status().content
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

    opinion = reviewer_opinion(sr["id"], patient)
    posted = http.post(f"{api}/DiagnosticReport", json=opinion, headers=FHIR_JSON, auth=reviewer)
    if posted.status_code != 201:
        raise RuntimeError(f"the reviewer's report was refused: {posted.status_code} {posted.text[:300]}")
    report = posted.json()
    console.print(f"[bold]review[/]  DiagnosticReport/{report['id']} posted by the reviewer ({report['status']})")
    found = http.get(f"{api}/DiagnosticReport", params={"based-on": f"ServiceRequest/{sr['id']}"}).json()
    if found.get("total") != 1:
        raise RuntimeError("the report was not found by based-on search")
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(found["entry"][0]["resource"], ensure_ascii=False, indent=2), "utf-8")
    final_task = http.get(f"{api}/Task/{task['id']}").json()
    console.print(f"[bold]task[/]    Task/{task['id']} is {final_task['status']} "
                  f"({final_task['businessStatus']['coding'][0]['code']})")
    return DemoResult(out_dir=out_dir, bundle_path=bundle_path, report_path=report_path,
                      documents=types.count("DocumentReference"), studies=types.count("ImagingStudy"),
                      left_out=left_out, conclusion=report["conclusion"], seconds=0.0)

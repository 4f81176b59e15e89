"""Issue 5 end to end: a 3-member panel with a dissent gives one final opinion, rendered in HTML and PDF,
amended with its history kept, notified to the requesting platform's webhook (down for a while, then up:
exactly once) and written back into the patient's record at the source (found again by ITI-67).

Real processes: redis-server, the sandbox, ``fhir-bridge serve`` and a worker; real tokens for every caller;
the webhook receiver is real HTTP (fhir_bridge.dev.webhook_receiver) checking the Standard Webhooks signature.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.reference_data import load_profiles, load_registry, load_terminology
from fhir_bridge.case.intake import WRITE_BACK
from fhir_bridge.dev.demo import opinion_report, second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup, free_port
from fhir_bridge.dev.webhook_receiver import WebhookReceiver
from fhir_bridge.fhir.profile_check import conform
from fhir_bridge.fhir.resources import Resource, validate
from fhir_bridge.opinion.writeback import master_identifier
from tests.e2e.conftest import Bridge, Sandbox, start_bridge, start_sandbox
from tests.e2e.test_exchange import post, wait_task

pytestmark = pytest.mark.e2e
HEART = load_registry().panels["rcp-heart-team"]
COORDINATOR, SURGEON, RADIOLOGIST = "cardio-fr-1", "csurg-fr-1", "radio-fr-1"
DOWN_FOR_S = 4.0


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(port=free_port(), secret="")
    yield hook
    hook.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, receiver: WebhookReceiver
          ) -> Iterator[tuple[Bridge, Sandbox]]:
    data_dir = tmp_path_factory.mktemp("panel")
    with ProcessGroup(data_dir / "logs") as group, EmbeddedRedis(data_dir) as redis:
        sandbox = start_sandbox(group, "sandbox-panel", "--patients", "3", "--no-corrupt")
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "panel", webhooks={"platform": receiver.url},
                              FHIR_BRIDGE_DELIVERY__BACKOFF_INITIAL="0.3", FHIR_BRIDGE_DELIVERY__BACKOFF_MAX="1.0")
        secret = bridge.clients.clients["platform"].webhook_secret
        assert secret
        receiver.secret = secret  # the receiver is not started yet: the platform is down
        bridge.start_worker("worker-panel")
        yield bridge, sandbox


@pytest.fixture(scope="module")
def case(world: tuple[Bridge, Sandbox], receiver: WebhookReceiver) -> dict[str, Any]:
    """A cardiology tumor-board case asking for write-back, answered by the Heart Team with one dissent."""
    bridge, sandbox = world
    patient = next(p for p in sandbox.world()["patients"] if p["specialty"] == "cardiology")
    body = second_opinion_request(patient, "PANEL-1")
    body["code"]["coding"][0]["code"] = "tumor-board-opinion"
    body["extension"] = [{"url": WRITE_BACK, "valueBoolean": True}]
    with bridge.client("platform") as platform:
        created = post(platform, bridge.api, "ServiceRequest", body)
        assert created.status_code == 201, created.text
        sr = created.json()
        task = wait_task(platform, bridge.api, sr["id"])
    assert task["status"] == "ready", task.get("statusReason")
    assert task["owner"]["reference"] == HEART.reference
    members: dict[str, Resource] = {}
    for member, kwargs in ((SURGEON, {"conclusion": "Remplacement valvulaire chirurgical."}),
                           (RADIOLOGIST, {"plan": "alternative-proposed", "alternatives": ("TAVI",),
                                          "conclusion": "Anatomie favorable à un TAVI."}),
                           (COORDINATOR, {"conclusion": "Chirurgie conventionnelle."})):
        with bridge.client(f"reviewer-{member}") as reviewer:
            answer = post(reviewer, bridge.api, "DiagnosticReport",
                          opinion_report(sr["id"], patient, status="preliminary", **kwargs))
            assert answer.status_code == 201, answer.text
            members[member] = answer.json()
    with bridge.client(f"reviewer-{SURGEON}") as surgeon:
        refused = post(surgeon, bridge.api, "DiagnosticReport", opinion_report(sr["id"], patient))
    with bridge.client(f"reviewer-{COORDINATOR}") as coordinator:
        final = post(coordinator, bridge.api, "DiagnosticReport", opinion_report(
            sr["id"], patient, conclusion="Consensus de la Heart Team : remplacement valvulaire aortique chirurgical.",
            tests=("Coronarographie préopératoire",)))
        assert final.status_code == 201, final.text
        second = post(coordinator, bridge.api, "DiagnosticReport", opinion_report(sr["id"], patient))
    return {"patient": patient, "sr": sr, "task": task, "members": members, "final": final.json(),
            "refused": refused, "second": second, "down_since": time.monotonic()}


def test_a_three_member_panel_with_one_dissent_gives_exactly_one_final_report(
    world: tuple[Bridge, Sandbox], case: dict[str, Any]
) -> None:
    bridge, _ = world
    assert case["refused"].status_code == 422  # a member may not issue the panel's final opinion
    assert case["second"].status_code == 409  # nor the coordinator a second one
    with bridge.client("platform") as platform:
        found = platform.get(f"{bridge.api}/DiagnosticReport", params={
            "based-on": f"ServiceRequest/{case['sr']['id']}", "status": "final,amended"}).raise_for_status().json()
    assert found["total"] == 1
    final = found["entry"][0]["resource"]
    assert final["id"] == case["final"]["id"]
    assert [r["reference"] for r in final["resultsInterpreter"]] == [
        f"PractitionerRole/{m}" for m in (COORDINATOR, SURGEON, RADIOLOGIST)]
    assert {p["reference"] for p in final["performer"]} == {"Organization/org-lyon"}
    dissents = [o for o in final["contained"] if o["code"]["coding"][0]["code"] == "dissenting-opinion"]
    assert [(d["performer"][0]["reference"], d["valueString"]) for d in dissents] == [
        (f"PractitionerRole/{RADIOLOGIST}", "Anatomie favorable à un TAVI.")]
    radiologist = case["members"][RADIOLOGIST]
    assert dissents[0]["extension"][0]["valueReference"]["reference"] == \
        f"DiagnosticReport/{radiologist['id']}/_history/1"


def test_the_html_and_pdf_exist_their_hashes_verify_and_the_pdf_renders_the_conclusion(
    case: dict[str, Any], tmp_path: Path
) -> None:
    final = case["final"]
    forms = {(f["contentType"], f["language"]): f for f in final["presentedForm"]}
    assert set(forms) == {(t, lang) for t in ("text/html", "application/pdf") for lang in ("fr", "en")}
    for form in forms.values():
        data = base64.b64decode(form["data"])
        assert form["size"] == len(data)
        assert form["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
    pdf = base64.b64decode(forms[("application/pdf", "fr")]["data"])
    text = " ".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "remplacement valvulaire aortique chirurgical" in " ".join(text.split())
    assert "Avis divergents" in text
    html = base64.b64decode(forms[("text/html", "en")]["data"]).decode()
    assert "Dissenting opinions" in html and "Heart Team" in html
    pdftoppm = shutil.which("pdftoppm")
    if pdftoppm is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    (tmp_path / "opinion.pdf").write_bytes(pdf)
    subprocess.run([pdftoppm, "-png", "-r", "50", "-f", "1", "-l", "1", str(tmp_path / "opinion.pdf"),
                    str(tmp_path / "page")], check=True, timeout=60)
    page = next(tmp_path.glob("page*.png")).read_bytes()
    assert page.startswith(b"\x89PNG") and len(page) > 5_000


def test_the_webhook_down_for_a_while_gets_the_notification_exactly_once_after_it_comes_back(
    world: tuple[Bridge, Sandbox], case: dict[str, Any], receiver: WebhookReceiver
) -> None:
    bridge, _ = world
    time.sleep(max(0.0, DOWN_FOR_S - (time.monotonic() - case["down_since"])))  # retries fail meanwhile
    assert receiver.deliveries == 0
    receiver.start()
    [notification] = receiver.wait_for(1, timeout=60)
    time.sleep(3)  # anything still queued would arrive now
    assert receiver.deliveries == 1 and receiver.refused == 0
    final = case["final"]
    assert notification.event["type"] == "opinion.final"
    assert notification.event["data"]["diagnosticReport"] == f"DiagnosticReport/{final['id']}/_history/1"
    assert case["patient"]["identifier"]["value"] not in str(notification.event)
    with bridge.client("auditor") as auditor:
        events = auditor.get(f"{bridge.api}/AuditEvent", params={"subtype": "delivery", "_count": "100"}
                             ).raise_for_status().json()
    outcomes = [e["resource"]["outcome"] for e in events.get("entry", [])]
    assert "0" in outcomes and any(o != "0" for o in outcomes)  # the failed attempts are on the record too


def test_the_opinion_is_written_back_and_found_again_by_iti_67(world: tuple[Bridge, Sandbox],
                                                               case: dict[str, Any]) -> None:
    bridge, sandbox = world
    final = case["final"]
    location = wait_output(bridge, case["task"]["id"], "record-document")
    patient_id = sandbox_patient_id(sandbox, case["patient"])
    found = httpx.get(f"{sandbox.url}/DocumentReference", params={
        "patient": patient_id, "status": "current", "type": "http://loinc.org|11488-4"}, timeout=30).json()
    documents = [e["resource"] for e in found.get("entry", [])]
    mine = [d for d in documents if d["masterIdentifier"]["value"] == master_identifier(
        f"DiagnosticReport/{final['id']}/_history/1")]
    assert len(mine) == 1
    assert location.endswith(f"DocumentReference/{mine[0]['id']}")
    attachment = mine[0]["content"][0]["attachment"]
    pdf = httpx.get(attachment["url"], timeout=30).raise_for_status().content  # ITI-68
    forms = {(f["contentType"], f["language"]): f for f in final["presentedForm"]}
    assert pdf == base64.b64decode(forms[("application/pdf", "fr")]["data"])
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()


def test_an_amendment_keeps_the_history_replaces_the_record_document_and_is_notified(
    world: tuple[Bridge, Sandbox], case: dict[str, Any], receiver: WebhookReceiver
) -> None:
    bridge, sandbox = world
    final = case["final"]
    wait_output(bridge, case["task"]["id"], "record-document")
    receiver.wait_for(1)
    amended = {**final, "status": "amended", "conclusion": final["conclusion"] + " Revoir à 3 mois."}
    with bridge.client(f"reviewer-{SURGEON}") as surgeon:  # only the coordinator amends the consensus
        assert surgeon.put(f"{bridge.api}/DiagnosticReport/{final['id']}", json=amended,
                           headers={"If-Match": 'W/"1"'}).status_code == 403
    with bridge.client(f"reviewer-{COORDINATOR}") as coordinator:
        stale = coordinator.put(f"{bridge.api}/DiagnosticReport/{final['id']}", json=amended,
                                headers={"If-Match": 'W/"7"'})
        assert stale.status_code == 412
        answer = coordinator.put(f"{bridge.api}/DiagnosticReport/{final['id']}", json=amended,
                                 headers={"If-Match": 'W/"1"'})
        assert answer.status_code == 200, answer.text
    with bridge.client("platform") as platform:
        history = platform.get(f"{bridge.api}/DiagnosticReport/{final['id']}/_history").raise_for_status().json()
        assert [e["resource"]["status"] for e in history["entry"]] == ["amended", "final"]
        first = platform.get(f"{bridge.api}/DiagnosticReport/{final['id']}/_history/1").raise_for_status().json()
        assert first["conclusion"] == final["conclusion"] and first["status"] == "final"
    notifications = receiver.wait_for(2)
    assert notifications[1].event["type"] == "opinion.amended"
    assert notifications[1].event["data"]["diagnosticReport"] == f"DiagnosticReport/{final['id']}/_history/2"
    wait_state(bridge, case["task"]["id"], "delivered", outputs=2)
    patient_id = sandbox_patient_id(sandbox, case["patient"])
    current = httpx.get(f"{sandbox.url}/DocumentReference", params={
        "patient": patient_id, "status": "current", "type": "http://loinc.org|11488-4"}, timeout=30).json()
    superseded = httpx.get(f"{sandbox.url}/DocumentReference", params={
        "patient": patient_id, "status": "superseded", "type": "http://loinc.org|11488-4"}, timeout=30).json()
    masters = {v: master_identifier(f"DiagnosticReport/{final['id']}/_history/{v}") for v in (1, 2)}
    ours = set(masters.values())  # the record may hold consultation notes of its own
    assert [e["resource"]["masterIdentifier"]["value"] for e in current.get("entry", [])
            if e["resource"]["masterIdentifier"]["value"] in ours] == [masters[2]]
    assert [e["resource"]["masterIdentifier"]["value"] for e in superseded.get("entry", [])
            if e["resource"]["masterIdentifier"]["value"] in ours] == [masters[1]]


def test_every_resource_of_the_panel_case_is_valid_r4_and_conforms(world: tuple[Bridge, Sandbox],
                                                                   case: dict[str, Any]) -> None:
    bridge, _ = world
    wait_state(bridge, case["task"]["id"], "delivered")
    profiles, terminology = load_profiles(), load_terminology()
    emitted: list[Resource] = []
    with bridge.client("platform") as platform:
        emitted.append(platform.get(f"{bridge.api}/ServiceRequest/{case['sr']['id']}").raise_for_status().json())
        emitted += [e["resource"] for e in platform.get(f"{bridge.api}/Task/{case['task']['id']}/_history")
                    .raise_for_status().json()["entry"]]
        reports = platform.get(f"{bridge.api}/DiagnosticReport", params={
            "based-on": f"ServiceRequest/{case['sr']['id']}"}).raise_for_status().json()
        for entry in reports["entry"]:
            emitted += [e["resource"] for e in platform.get(
                f"{bridge.api}/DiagnosticReport/{entry['resource']['id']}/_history").raise_for_status().json()["entry"]]
    with bridge.client("auditor") as auditor:
        emitted += [e["resource"] for e in auditor.get(f"{bridge.api}/AuditEvent", params={"_count": "200"})
                    .raise_for_status().json()["entry"]]
    assert {r["resourceType"] for r in emitted} == {"ServiceRequest", "Task", "DiagnosticReport", "AuditEvent"}
    for resource in emitted:
        validate(resource)
        errors = [i for i in conform(resource, profiles, terminology) if i.severity == "error"]
        assert errors == [], (resource["resourceType"], errors)


def wait_output(bridge: Bridge, task_id: str, code: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    with bridge.client("platform") as platform:
        while time.monotonic() < deadline:
            task = platform.get(f"{bridge.api}/Task/{task_id}").raise_for_status().json()
            found = [o["valueReference"]["reference"] for o in task.get("output", [])
                     if o["type"]["coding"][0]["code"] == code]
            if found:
                return str(found[-1])
            time.sleep(0.2)
    raise AssertionError(f"no {code} output on the case")


def wait_state(bridge: Bridge, task_id: str, state: str, *, outputs: int = 1, timeout: float = 60) -> Resource:
    deadline = time.monotonic() + timeout
    task: Resource = {}
    with bridge.client("platform") as platform:
        while time.monotonic() < deadline:
            task = platform.get(f"{bridge.api}/Task/{task_id}").raise_for_status().json()
            records = [o for o in task.get("output", []) if o["type"]["coding"][0]["code"] == "record-document"]
            if task["businessStatus"]["coding"][0]["code"] == state and len(records) >= outputs:
                return task
            time.sleep(0.2)
    raise AssertionError(f"the case stayed {task.get('businessStatus')}")


def sandbox_patient_id(sandbox: Sandbox, patient: Resource) -> str:
    identifier = patient["identifier"]
    found = httpx.get(f"{sandbox.url}/Patient", params={
        "identifier": f"{identifier['system']}|{identifier['value']}"}, timeout=30).json()
    return str(found["entry"][0]["resource"]["id"])


def test_a_majority_panel_gets_its_final_from_the_bridge_at_the_last_member_opinion(
    world: tuple[Bridge, Sandbox]
) -> None:
    """The configured rule (rcp-neuro-oncology: ``majority``) issues the consensus without a coordinator's post;
    two of its members review from abroad and name the patient by the case pseudonym."""
    bridge, sandbox = world
    panel = load_registry().panels["rcp-neuro-oncology"]
    patient = next(p for p in sandbox.world()["patients"] if p["specialty"] == "neurology")
    body = second_opinion_request(patient, "PANEL-MAJORITY")
    body["code"]["coding"][0]["code"] = "tumor-board-opinion"
    with bridge.client("platform") as platform:
        created = post(platform, bridge.api, "ServiceRequest", body)
        assert created.status_code == 201, created.text
        sr = created.json()
        task = wait_task(platform, bridge.api, sr["id"])
    assert task["status"] == "ready" and task["owner"]["reference"] == panel.reference
    dissenter = panel.members[-1]
    for member in panel.members:
        with bridge.client(f"reviewer-{member}") as reviewer:
            seen = reviewer.get(f"{bridge.api}/ServiceRequest/{sr['id']}").raise_for_status().json()
            opinion = opinion_report(sr["id"], {"identifier": seen["subject"]["identifier"]}, status="preliminary",
                                     diagnosis="changed" if member == dissenter else "confirmed",
                                     conclusion=f"Position de {member}.")
            answer = post(reviewer, bridge.api, "DiagnosticReport", opinion)
            assert answer.status_code == 201, answer.text
    with bridge.client("platform") as platform:
        finals = platform.get(f"{bridge.api}/DiagnosticReport", params={
            "based-on": f"ServiceRequest/{sr['id']}", "status": "final"}).raise_for_status().json()
    assert finals["total"] == 1
    final = finals["entry"][0]["resource"]
    method = next(e["valueCoding"]["code"] for e in final["extension"] if e["url"].endswith("/consensus-method"))
    assert method == "majority"
    assert final["conclusion"] == f"Position de {panel.coordinator}."
    assert len(final["resultsInterpreter"]) == len(panel.members)
    dissents = [o["performer"][0]["reference"] for o in final["contained"]
                if o["code"]["coding"][0]["code"] == "dissenting-opinion"]
    assert dissents == [f"PractitionerRole/{dissenter}"]
    assert final["subject"]["identifier"] == patient["identifier"]  # stored under the INS, not the pseudonym
    validate(final)

"""The audit trail end to end (issue 7): real redis-server, `fhir-bridge serve`, a worker and the sandbox.

Every API route is called once with its own X-Request-Id, by the registered client allowed to (real tokens), and
must leave exactly one inbound AuditEvent naming that client and the token's jti (anonymous without a token); the
collect job must leave its outbound events (ITI-78, ITI-67, ITI-68, with the patient) and one job event per
Task version it wrote; every event is valid R4; the chain verifies through the API and the CLI; an export
verifies offline; a tampered stored event is found by `fhir-bridge audit verify` at its seq.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.audit.events import IHE_EVENT_TYPE, JTI_PREFIX
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from fhir_bridge.fhir.resources import validate
from tests.e2e.conftest import Bridge, Sandbox, start_bridge
from tests.e2e.test_exchange import FHIR, opinion_as_seen, wait_task

pytestmark = pytest.mark.e2e
EV, HEAD = "fhir-bridge:{audit}:ev", "fhir-bridge:{audit}:head"
BRIDGE = "fhir-bridge"  # the bridge's own agent id
Event = dict[str, Any]


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[Bridge]:
    """Its own Redis (fsync always, as the private server runs for the audit), API and worker."""
    data_dir = tmp_path_factory.mktemp("audited")
    with EmbeddedRedis(data_dir, appendfsync="always") as redis, ProcessGroup(data_dir / "logs") as group:
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "audited", FHIR_BRIDGE_AUDIT__CHECKPOINT_EVERY="7")
        bridge.start_worker("audited-worker")
        yield bridge


class Walk:
    """Calls the API, each call with its own X-Request-Id and as the client it names, and remembers what each
    call was and which token (jti) it carried."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.api = bridge.api
        self.calls: list[Call] = []
        self.clients: dict[str, httpx.Client] = {}

    def client(self, client_id: str) -> httpx.Client:
        if client_id not in self.clients:
            self.clients[client_id] = self.bridge.client(client_id)
        return self.clients[client_id]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def __call__(self, interaction: str, method: str, path: str, *, caller: str | None, status: int = 200,
                 body: Any = None, about_patient: bool = True, **kwargs: Any) -> httpx.Response:
        """``caller``: a registered client id, or None for a call without a token."""
        request_id = f"walk-{len(self.calls) + 1}-{interaction}"
        headers = {"X-Request-Id": request_id, **kwargs.pop("headers", {})}
        if body is not None:
            kwargs["content"] = json.dumps(body).encode()
            headers.setdefault("Content-Type", FHIR["Content-Type"])
        send = self.client(caller).request if caller else httpx.request
        answer = send(method, f"{self.api}/{path}", headers=headers, timeout=30, **kwargs)
        assert answer.status_code == status, f"{method} {path}: {answer.status_code} {answer.text[:300]}"
        assert answer.headers["X-Request-Id"] == request_id
        sent = answer.request.headers.get("Authorization")
        self.calls.append(Call(request_id, method, f"/fhir/{path}", interaction, answer.status_code,
                               about_patient and answer.status_code < 400, caller or "anonymous",
                               claims(sent)["jti"] if sent else None))
        return answer


def claims(authorization: str) -> dict[str, Any]:
    """The claims of the ``Bearer`` JWT a call carried, unverified: the test reads back what it sent."""
    payload = authorization.split()[1].split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@dataclass(frozen=True)
class Call:
    request_id: str
    method: str
    path: str
    interaction: str
    status: int
    about_patient: bool  # the event must name the patient
    client_id: str  # who the event must name as the requestor ("anonymous" without a token)
    jti: str | None  # the id of the access token the call carried


def parameters(body: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [{"name": k, "valueString": v} for k, v in body.items()]}


def owner_of(task: dict[str, Any]) -> str:
    return str(task["owner"]["reference"]).rsplit("/", 1)[1]


def wait_state(client: httpx.Client, api: str, task_id: str, states: tuple[str, ...],
               timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = client.get(f"{api}/Task/{task_id}").raise_for_status().json()
        if task["businessStatus"]["coding"][0]["code"] in states:
            return task
        time.sleep(0.2)
    raise AssertionError(f"the task stayed {task.get('businessStatus')}")


def all_events(auditor: httpx.Client, api: str) -> list[Event]:
    """Every event recorded before now, through the API's own paging (events recorded while we page, by these
    very searches, are after ``date=lt<now>`` and do not shift the pages)."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    url: str | None = f"{api}/AuditEvent?" + httpx.QueryParams({"date": f"lt{now}", "_count": "200"}).__str__()
    events: list[Event] = []
    while url:
        page = auditor.get(url, timeout=30).raise_for_status().json()
        validate(page)
        assert page["type"] == "searchset"
        events += [entry["resource"] for entry in page.get("entry", [])]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert len(events) == page["total"] == len({e["id"] for e in events})
    return events


def request_ids(event: Event) -> list[str]:
    return [e["what"]["identifier"]["value"] for e in event["entity"] if e.get("type", {}).get("code") == "XrequestId"]


def inbound(event: Event) -> bool:
    """A call on our API: its requestor is the client (the bridge is the requestor of its own calls and jobs)."""
    return any(a["requestor"] and a["who"]["identifier"]["value"] != BRIDGE for a in event["agent"])


def requestor(event: Event) -> Event:
    return next(a for a in event["agent"] if a["requestor"])


def codes(event: Event, system: str | None = None) -> list[str]:
    return [c["code"] for c in event["subtype"] if system is None or c["system"] == system]


def patient_of(event: Event) -> str | None:
    return next((e["what"]["identifier"]["value"] for e in event["entity"] if e.get("role", {}).get("code") == "1"),
                None)


def cli(bridge: Bridge, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhir_bridge", "audit", *args], capture_output=True, text=True,
                          timeout=120, env={**bridge.env, "PATH": "/usr/bin:/bin", "FHIR_BRIDGE_LOG_LEVEL": "WARNING"})


@pytest.fixture(scope="module")
def walk(audited: Bridge) -> Iterator[Walk]:
    walk = Walk(audited)
    yield walk
    walk.close()


@pytest.fixture(scope="module")
def auditor(audited: Bridge) -> Iterator[httpx.Client]:
    with audited.client("auditor") as client:
        yield client


@pytest.fixture(scope="module")
def walked(audited: Bridge, sandbox: Sandbox, walk: Walk, auditor: httpx.Client) -> dict[str, Any]:
    """Walk every API route once, through a whole case, each call by the client that may make it: the platform
    requests and follows its case, the assigned reviewer reads the bundle and answers, the operator refreshes,
    the auditor reads the audit."""
    api, platform = audited.api, walk.client("platform")
    patient = sandbox.world()["patients"][0]
    token = f"{patient['identifier']['system']}|{patient['identifier']['value']}"
    walk("capabilities", "GET", "metadata", caller=None, about_patient=False)  # open to all
    sr = walk("create", "POST", "ServiceRequest", caller="platform", status=201,
              body=second_opinion_request(patient, "AUDIT-1"),
              headers={"If-None-Exist": "identifier=https://platform.example/requests|AUDIT-1"}).json()
    walk("read", "GET", f"ServiceRequest/{sr['id']}", caller="platform")
    walk("vread", "GET", f"ServiceRequest/{sr['id']}/_history/1", caller="platform")
    walk("history-instance", "GET", f"ServiceRequest/{sr['id']}/_history", caller="platform")
    walk("search-type", "GET", "ServiceRequest", caller="platform", params={"subject:identifier": token})
    found = walk("search-type", "POST", "ServiceRequest/_search", caller="platform", about_patient=False,
                 content="identifier=https://platform.example/requests|AUDIT-1",
                 headers={"Content-Type": "application/x-www-form-urlencoded"}).json()
    assert found["total"] == 1
    task = wait_task(platform, api, sr["id"])
    assert task["status"] == "ready", task.get("statusReason")
    walk("read", "GET", f"Task/{task['id']}", caller="platform")
    walk("vread", "GET", f"Task/{task['id']}/_history/1", caller="platform")
    walk("search-type", "GET", "Task", caller="platform", params={"focus": f"ServiceRequest/{sr['id']}"},
         about_patient=False)
    walk("search-type", "POST", "Task/_search", caller="platform", content=f"focus=ServiceRequest/{sr['id']}",
         about_patient=False, headers={"Content-Type": "application/x-www-form-urlencoded"})
    walk("history-instance", "GET", f"Task/{task['id']}/_history", caller="platform")
    bundle_ref = next(o["valueReference"]["reference"] for o in task["output"]
                      if o["type"]["coding"][0]["code"] == "case-bundle")
    reviewer = audited.reviewer_of(task)
    bundle = walk("read", "GET", bundle_ref, caller=reviewer).json()
    assert bundle["resourceType"] == "Bundle"
    walk("operation", "POST", f"Task/{task['id']}/$request-documents", caller=reviewer,
         body=parameters({"reviewer": owner_of(task), "text": "Merci d'ajouter le compte rendu opératoire"}))
    walk("operation", "POST", f"Task/{task['id']}/$refresh", caller="operator")
    task = wait_state(platform, api, task["id"], ("triaged-ready",))
    walk("operation", "POST", f"Task/{task['id']}/$decline", caller=audited.reviewer_of(task),
         body=parameters({"reviewer": owner_of(task), "reason": "conflit d'intérêts"}))
    task = platform.get(f"{api}/Task/{task['id']}").raise_for_status().json()
    assert task.get("owner"), "the declined case found no other reviewer"
    reviewer = audited.reviewer_of(task)  # the case went to someone else: they answer it
    draft = walk("create", "POST", "DiagnosticReport", caller=reviewer, status=201,
                 body={**opinion_as_seen(walk.client(reviewer), api, sr["id"]), "status": "preliminary"}).json()
    walk("delete", "DELETE", f"DiagnosticReport/{draft['id']}", caller=reviewer, status=204, about_patient=False)
    walk("read", "GET", f"DiagnosticReport/{draft['id']}", caller=reviewer, status=410)
    walk("read", "GET", f"DiagnosticReport/{draft['id']}", caller="platform-other", status=404)  # not theirs
    deleted = walk("history-instance", "GET", f"DiagnosticReport/{draft['id']}/_history", caller=reviewer).json()
    assert [e["resource"]["status"] for e in deleted["entry"]] == ["preliminary"]
    report = walk("create", "POST", "DiagnosticReport", caller=reviewer, status=201,
                  body=opinion_as_seen(walk.client(reviewer), api, sr["id"])).json()
    walk("read", "GET", f"DiagnosticReport/{report['id']}", caller=reviewer)
    amended = dict(report, status="amended", conclusion=report["conclusion"] + " (précision)")
    walk("update", "PUT", f"DiagnosticReport/{report['id']}", caller=reviewer, body=amended,
         headers={"If-Match": 'W/"1"'})
    walk("search-type", "GET", "DiagnosticReport", caller="platform",
         params={"based-on": f"ServiceRequest/{sr['id']}"}, about_patient=False)
    walk("search-type", "POST", "DiagnosticReport/_search", caller="platform", content=f"subject:identifier={token}",
         headers={"Content-Type": "application/x-www-form-urlencoded"})
    walk("history-instance", "GET", f"DiagnosticReport/{report['id']}/_history", caller="platform")
    walk("vread", "GET", f"DiagnosticReport/{report['id']}/_history/1", caller=reviewer)
    page = walk("search-type", "GET", "AuditEvent", caller="auditor", params={"patient": token, "_count": "3"}).json()
    assert page["total"] > 3 and any(link["relation"] == "next" for link in page["link"])
    walk("search-type", "POST", "AuditEvent/_search", caller="auditor", content="subtype=ITI-67&outcome=0",
         about_patient=False, headers={"Content-Type": "application/x-www-form-urlencoded"})
    walk("read", "GET", f"AuditEvent/{page['entry'][0]['resource']['id']}", caller="auditor")
    walk("operation", "GET", "AuditEvent/$verify", caller="auditor", about_patient=False)
    walk("operation", "POST", "AuditEvent/$verify", caller="auditor", about_patient=False)
    # refused calls are on the record too: unknown, without a token, with the wrong role
    walk("read", "GET", "Task/no-such-task", caller="platform", status=404)
    walk("read", "GET", f"Task/{task['id']}", caller=None, status=401)
    walk("search-type", "GET", "AuditEvent", caller="platform", status=403, params={"subtype": "read"})
    events = all_events(auditor, api)
    return {"walk": walk, "events": events, "patient": patient, "sr": sr, "task_id": task["id"], "token": token}


def test_the_walk_calls_every_fhir_route(walked: dict[str, Any]) -> None:
    from fastapi import APIRouter
    from fastapi.routing import APIRoute

    from fhir_bridge.api.app import FHIR_ROUTERS  # the routers the app mounts under /fhir, AuditEvent included

    router = APIRouter(routes=[route for fhir in FHIR_ROUTERS for route in fhir.routes])

    routes = [r for r in router.routes if isinstance(r, APIRoute) and r.path.startswith("/fhir")]
    served = {(method, route.path) for route in routes for method in route.methods}
    walked_routes = set()
    for call in walked["walk"].calls:
        route = next(r for r in routes if call.method in r.methods and r.path_regex.match(call.path))
        walked_routes.add((call.method, route.path))
    assert served - walked_routes == set()


def test_every_api_call_has_exactly_one_audit_event(walked: dict[str, Any]) -> None:
    events, walk = walked["events"], walked["walk"]
    for call in walk.calls:
        mine = [e for e in events if call.request_id in request_ids(e) and inbound(e)]
        assert len(mine) == 1, f"{call}: {len(mine)} inbound events"
        [event] = mine
        assert codes(event) == [call.interaction], call
        assert event["outcome"] == ("0" if call.status < 400 else "4"), call
        # BALP: the client id from the token as the requestor, the token's jti in its policy
        client = requestor(event)
        assert client["who"]["identifier"]["value"] == call.client_id, call
        assert client.get("policy") == ([JTI_PREFIX + call.jti] if call.jti else None), call


def test_the_events_name_the_patient_and_the_resource_version(walked: dict[str, Any]) -> None:
    events, nir, sr = walked["events"], walked["patient"]["identifier"]["value"], walked["sr"]
    by_id = {rid: e for e in events if inbound(e) for rid in request_ids(e)}
    for call in walked["walk"].calls:
        assert (patient_of(by_id[call.request_id]) == nir) is call.about_patient, call
    create = by_id["walk-2-create"]
    assert any(e["what"].get("reference") == f"ServiceRequest/{sr['id']}/_history/1" for e in create["entity"])
    search = by_id["walk-6-search-type"]
    query = base64.b64decode(next(e["query"] for e in search["entity"] if "query" in e))
    assert query.startswith(b"GET /fhir/ServiceRequest?subject%3Aidentifier=")


def test_every_audit_event_is_valid_r4(walked: dict[str, Any]) -> None:
    for event in walked["events"]:
        validate(event)
        assert event["resourceType"] == "AuditEvent"


def test_the_collect_job_left_its_outbound_calls_with_the_patient(walked: dict[str, Any]) -> None:
    events, nir = walked["events"], walked["patient"]["identifier"]["value"]
    outbound = [e for e in events if codes(e, IHE_EVENT_TYPE)]
    transactions = {code for e in outbound for code in codes(e, IHE_EVENT_TYPE)}
    assert {"ITI-78", "ITI-67", "ITI-68"} <= transactions
    for event in outbound:
        assert patient_of(event) == nir
        requestor = next(a for a in event["agent"] if a["requestor"])
        assert requestor["who"]["identifier"]["value"] == "fhir-bridge"
    intake = [e for e in outbound if "walk-2-create" in request_ids(e)]
    assert [codes(e, IHE_EVENT_TYPE) for e in intake] == [["ITI-78"]]  # the intake check, under the call's id
    iti67 = next(e for e in outbound if "ITI-67" in codes(e))
    query = base64.b64decode(next(e["query"] for e in iti67["entity"] if "query" in e)).decode()
    assert query.startswith("GET ") and "/DocumentReference?" in query and "status=current" in query
    studies = [e for e in events if codes(e) == ["search-type"] and not inbound(e)
               and any(x["what"].get("type") == "ImagingStudy" for x in e["entity"] if "what" in x)]
    assert not studies or all(patient_of(e) == nir for e in studies)
    refused = [e["outcomeDesc"] for e in outbound if "ITI-68" in codes(e) and e.get("outcomeDesc")]
    assert "attachment-error:hash-mismatch" in refused  # the sandbox's corrupted attachment, on the record


def test_every_task_version_written_has_its_job_event(walked: dict[str, Any], audited: Bridge) -> None:
    task_id, events = walked["task_id"], walked["events"]
    history = walked["walk"].client("platform").get(f"{audited.api}/Task/{task_id}/_history").json()
    versions = sorted(int(e["resource"]["meta"]["versionId"]) for e in history["entry"])
    jobs = [e for e in events if e["type"]["code"] == "110110"]
    written = [x["what"]["reference"] for e in jobs for x in e["entity"]
               if x["what"].get("reference", "").startswith(f"Task/{task_id}/")]
    assert sorted(written) == sorted(f"Task/{task_id}/_history/{v}" for v in versions if v > 1)
    steps = {code for e in jobs for code in codes(e)}
    assert {"collecting", "triaged-ready", "waiting-for-documents", "case-edit", "opinion-final"} <= steps
    job_ids = {codes(e)[0]: x["what"]["identifier"]["value"] for e in jobs for x in e["entity"]
               if x.get("role", {}).get("code") == "20"}  # fmt: skip
    assert job_ids["triaged-ready"].startswith(f"collect:{task_id}")  # moved by the worker, in its job


def test_the_chain_verifies_through_the_api_and_the_cli(walked: dict[str, Any], audited: Bridge,
                                                        auditor: httpx.Client) -> None:
    result = auditor.get(f"{audited.api}/AuditEvent/$verify").raise_for_status().json()
    validate(result)
    values = {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in result["parameter"]}
    assert values["result"] is True and values["count"] >= len(walked["events"])
    assert values["lastCheckpointSeq"] > 0
    verified = cli(audited, "verify")
    assert verified.returncode == 0, verified.stderr + verified.stdout
    assert verified.stdout.startswith("audit chain ok:")


def test_an_export_verifies_offline_and_a_changed_line_does_not(walked: dict[str, Any], audited: Bridge,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "audit.ndjson"
    exported = cli(audited, "export", "--since", "2020-01-01", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["count"] >= len(walked["events"]) and (tmp_path / "audit.manifest.json").is_file()
    key = audited.data_dir / "keys" / "audit-signing.jwk.json"
    offline = subprocess.run([sys.executable, "-m", "fhir_bridge", "audit", "verify-export", str(out), "--key",
                              str(key)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert offline.returncode == 0, offline.stderr + offline.stdout
    lines = out.read_bytes().splitlines(keepends=True)
    changed = json.loads(lines[4])
    changed["outcome"] = "12"
    lines[4] = json.dumps(changed, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    out.write_bytes(b"".join(lines))
    broken = cli(audited, "verify-export", str(out), "--key", str(key))
    assert broken.returncode == 1 and f"broken at seq {summary['firstSeq'] + 4}" in broken.stdout


def test_a_tampered_stored_event_is_found_at_its_seq(walked: dict[str, Any], audited: Bridge,
                                                     auditor: httpx.Client) -> None:
    """Last: it breaks this bridge's chain for good."""
    import redis

    client = redis.Redis.from_url(audited.redis_url)
    member = f"{12:015d}"
    event = json.loads(client.hget(EV, member))  # type: ignore[arg-type]
    event["outcome"] = "8" if event["outcome"] != "8" else "0"
    client.hset(EV, member, json.dumps(event, separators=(",", ":"), sort_keys=True))
    client.close()
    verified = cli(audited, "verify")
    assert verified.returncode == 1
    assert verified.stdout.startswith("audit chain broken at seq 12:"), verified.stdout
    result = auditor.get(f"{audited.api}/AuditEvent/$verify").raise_for_status().json()
    values = {p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in result["parameter"]}
    assert values["result"] is False and values["firstBrokenSeq"] == 12


def test_stopping_the_api_and_the_worker_signs_the_chain_end(walked: dict[str, Any], audited: Bridge) -> None:
    """Last of all: it stops this bridge."""
    import redis

    client = redis.Redis.from_url(audited.redis_url)
    seq = cps = 0
    for _ in range(3):  # an append may itself be due for a checkpoint: make one that is not
        httpx.get(f"{audited.api}/metadata").raise_for_status()
        seq, cps = (int(v or 0) for v in client.hmget(HEAD, ["seq", "cps"]))
        if cps < seq:
            break
    assert cps < seq
    for child in list(audited.group.children):
        audited.group.stop(child)
    assert [int(v or 0) for v in client.hmget(HEAD, ["seq", "cps"])] == [seq, seq]
    client.close()

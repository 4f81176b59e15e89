"""Part 4: ``fhir-bridge sync refresh`` over 10,000 open cases with 1 % changed at the source.

``sync refresh`` is issue 8's command; on a branch without it, the
full run reports the part as pending; ``python -m bench sync --quick`` runs everything around it (so the
harness is ready and kept working) and reports the same.

What the harness does, all of it real:

1. a sandbox with one patient per case (``--patients N``; searches there only look at the named patient's
   documents, so its cost does not grow with the world), a private ``redis-server`` (``appendfsync always``,
   the default), ``fhir-bridge serve`` and, in quick mode, workers;
2. N open cases requested through the API by a platform with real tokens (one ServiceRequest per patient,
   each checked at the source as intake does). Quick mode: the workers pull and package each, until no case is
   still requested or collecting. Full mode: a full pull of 10,000 cases would take about 2.5 hours on 2 cores
   (~1.1 cases/s, measured), and the pull is part 1's subject, not this part's; so each case is moved to
   ``ready`` through the bridge's own TaskBook (a ``collecting`` version, then ``triaged-ready``, as a pull
   leaves it) and given the sync mark a pull records (the source's Patient id and a watermark newer than the
   patient's documents, ``CaseSync.record_pull``), straight in the bridge's Redis. The refresh then finds
   exactly the state a real pull leaves;
3. 1 % of the patients changed at the source: one new document each, written with ITI-65 (``POST /fhir``);
4. the sandbox's request log cleared, then timed in the same run:
   * the limit: :mod:`bench.refresh_limit`, one ``DocumentReference?patient&status&_lastUpdated=gt`` search
     per case with the bridge's concurrency, nothing else (what "one search per case" costs at best);
   * ``fhir-bridge sync refresh`` (or what ``BENCH_SYNC_REFRESH`` says, e.g. ``"sync refresh --all"``);
5. the log read back: requests per case, searches per unchanged case (target: at most one), what the
   changed cases cost, and the wall time against the limit's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shlex
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

from bench.common import (
    Report,
    Row,
    Timed,
    python_module,
    run_timed,
    sandbox_requests,
    sandbox_world,
    start_on_free_port,
)
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.clients import DevClients, provision
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup

FHIR = {"Content-Type": "application/fhir+json"}
SIZES = {"full": {"cases": 10_000, "changed_every": 100, "workers": 0},
         "quick": {"cases": 20, "changed_every": 10, "workers": 1}}
REFRESH = os.environ.get("BENCH_SYNC_REFRESH", "sync refresh")


def refresh_available() -> bool:
    """Whether this branch's CLI has the refresh command (issue 8)."""
    args = python_module("fhir_bridge", *shlex.split(REFRESH), "--help")
    return subprocess.run(args, capture_output=True, timeout=60).returncode == 0


def change_bundle(patient_id: str, n: int) -> dict[str, Any]:
    """A minimal MHD ITI-65 Provide Document Bundle adding one new document for ``patient_id``."""
    data = f"Compte rendu complémentaire {n}, déposé après l'ouverture du dossier.\n".encode()
    doc_url, bin_url, list_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    document = {
        "resourceType": "DocumentReference", "status": "current",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"},
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4",
                             "display": "CR ou fiche de consultation ou de visite"}]},
        "subject": {"reference": f"Patient/{patient_id}"}, "date": when,
        "content": [{"attachment": {"contentType": "text/plain", "language": "fr-FR", "url": bin_url,
                                    "size": len(data), "title": "Compte rendu complémentaire",
                                    "hash": base64.b64encode(hashlib.sha1(data).digest()).decode()}}],
    }
    submission = {
        "resourceType": "List", "status": "current", "mode": "working", "date": when,
        "extension": [{"url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId",
                       "valueIdentifier": {"value": "urn:oid:2.25.1"}}],
        "identifier": [{"use": "usual", "system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}],
        "code": {"coding": [{"system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                             "code": "submissionset"}]},
        "subject": {"reference": f"Patient/{patient_id}"}, "entry": [{"item": {"reference": doc_url}}],
    }
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": base64.b64encode(data).decode()}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": list_url, "resource": submission, "request": {"method": "POST", "url": "List"}},
        {"fullUrl": doc_url, "resource": document, "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": bin_url, "resource": binary, "request": {"method": "POST", "url": "Binary"}},
    ]}


async def _open_cases(api: str, clients: DevClients, patients: list[dict[str, Any]]) -> None:
    """One second-opinion request per patient, 16 in flight, as the platform (tokens renewed by the auth)."""
    slots = asyncio.Semaphore(16)
    async with httpx.AsyncClient(auth=clients.auth("platform", api), timeout=120) as http:
        async def ask(n: int, patient: dict[str, Any]) -> None:
            body = json.dumps(second_opinion_request(patient, f"SYNC-{n}")).encode()
            key = f"identifier=https://platform.example/requests|SYNC-{n}"
            async with slots:
                (await http.post(f"{api}/ServiceRequest", content=body,
                                 headers={**FHIR, "If-None-Exist": key})).raise_for_status()

        await asyncio.gather(*(ask(n, p) for n, p in enumerate(patients)))


async def _ready_as_pulled(redis_url: str, patients: list[dict[str, Any]], watermark: str) -> dict[str, int]:
    """Full mode: each requested case moved to ``ready`` as its pull would leave it, with the sync mark its
    pull records (see the module docstring); returns the counts by status."""
    from redis.asyncio import Redis

    from fhir_bridge.adapters.redis_store import RedisResourceStore
    from fhir_bridge.adapters.reference_data import load_terminology
    from fhir_bridge.adapters.sync_state import RedisSyncState
    from fhir_bridge.fhir.identity import PatientIdentifier
    from fhir_bridge.workflow.taskbook import TaskBook

    redis = Redis.from_url(redis_url)
    try:
        store, marks = RedisResourceStore(redis), RedisSyncState(redis)
        book = TaskBook(store, load_terminology())
        source_ids = {p["identifier"]["value"]: p["id"] for p in patients}
        tasks: list[dict[str, Any]] = []
        while True:
            page = await store.search("Task", {"status": ["requested"]}, count=500, offset=len(tasks))
            tasks += page.resources
            if len(tasks) >= page.total or not page.resources:
                break
        slots = asyncio.Semaphore(32)

        async def ready(task: dict[str, Any]) -> None:
            async with slots:
                moved = await book.move(task, "in-progress", "collecting")
                await book.move(moved, "ready", "triaged-ready")
                ident = task["for"]["identifier"]
                await marks.advance(PatientIdentifier(ident["system"], ident["value"]),
                                    patient_id=source_ids[ident["value"]], watermark=watermark)

        await asyncio.gather(*(ready(t) for t in tasks))
        return {"ready": len(tasks), "on-hold": 0, "failed": 0}
    finally:
        await redis.aclose()


def _count(http: httpx.Client, api: str, status: str) -> int:
    total: int = http.get(f"{api}/Task", params={"status": status, "_count": "0"}).raise_for_status().json()["total"]
    return total


def _wait_settled(api: str, clients: DevClients, cases: int, timeout: float) -> dict[str, int]:
    """Wait until every case has been pulled (none requested or collecting); returns the counts by status."""
    deadline = time.monotonic() + timeout
    with httpx.Client(auth=clients.auth("platform", api), timeout=60) as http:
        while True:
            busy = _count(http, api, "requested") + _count(http, api, "in-progress")
            if busy == 0 or time.monotonic() > deadline:
                counts = {s: _count(http, api, s) for s in ("ready", "on-hold", "failed", "requested", "in-progress")}
                if busy:
                    raise RuntimeError(f"seeding did not settle in {timeout:.0f} s: {counts}")
                if sum(counts.values()) < cases:
                    raise RuntimeError(f"only {sum(counts.values())} of {cases} cases were created: {counts}")
                return counts
            time.sleep(1)


def _request_patients(log: Iterable[dict[str, Any]], world: dict[str, Any]) -> list[tuple[str | None, bool]]:
    """For each logged request: the patient it concerns (by id, INS or document), and whether it is a search."""
    by_nir = {p["identifier"]["value"]: p["id"] for p in world["patients"]}
    by_doc = {d: p["id"] for p in world["patients"] for d in p["documents"]["all"]}
    out: list[tuple[str | None, bool]] = []
    for record in log:
        parts = str(record["path"]).rstrip("/").split("/")  # /fhir/Type[/id]
        query = parse_qs(str(record.get("query", "")))
        search = len(parts) == 3 or parts[-1] == "_search"
        named = query.get("patient") or query.get("subject")
        patient = named[0] if named else None
        if patient is None and "identifier" in query:
            patient = by_nir.get(query["identifier"][0].rsplit("|", 1)[-1])
        if patient is None and len(parts) == 4 and parts[2] in ("Binary", "DocumentReference"):
            patient = by_doc.get(parts[3])
        out.append((patient.rsplit("/", 1)[-1] if patient else None, search))
    return out


def _searches(per_request: list[tuple[str | None, bool]], unchanged: set[str]) -> tuple[int, int]:
    """Most searches any unchanged case cost, and their total."""
    searches = Counter(p for p, search in per_request if search and p in unchanged)
    return max((searches.get(p, 0) for p in unchanged), default=0), sum(searches.values())


def run_sync(report: Report, mode: str, work: Path) -> None:
    """Part 4; see the module docstring."""
    size = SIZES[mode]
    cases, every = int(size["cases"]), int(size["changed_every"])
    available = refresh_available()
    if not available and mode == "full":
        report.add(Row("4 sync", f"sync refresh, {cases:,} open cases, 1 % changed", None, "",
                       f"awaits issue 8: `fhir-bridge {REFRESH}` is not on this branch (python -m bench sync "
                       "--quick runs the harness around it)", "<= 1 search per case", None))
        return
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    with EmbeddedRedis(work, appendfsync="always") as redis, ProcessGroup(work / "logs") as group:
        sandbox = start_on_free_port(group, "sandbox-sync", ["sandbox", "--patients", str(cases), "--no-corrupt"],
                                     "/healthz", timeout=600)
        world = sandbox_world(sandbox)
        patients = world["patients"][:cases]
        clients = provision(data_dir / "clients.json", data_dir / "client-keys")
        env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": f"{sandbox}/fhir",
               "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": "WARNING"}
        root = start_on_free_port(group, "api", ["serve"], "/readyz", extra_env=env)
        api = f"{root}/fhir"
        workers = [group.start(f"worker-{n}", ["worker", "--name", f"sync-worker-{n}"], extra_env=env)
                   for n in range(int(size["workers"]))]
        started = time.monotonic()
        asyncio.run(_open_cases(api, clients, patients))
        if workers:
            counts = _wait_settled(api, clients, cases, timeout=max(300.0, cases * 0.5))
        else:
            time.sleep(0.01)
            watermark = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            counts = asyncio.run(_ready_as_pulled(redis.url, patients, watermark))
        seeded_in = time.monotonic() - started
        for worker in workers:
            group.stop(worker)  # the refresh runs alone, as a scheduled job would
        time.sleep(0.01)
        opened = datetime.now(UTC).isoformat(timespec="milliseconds")  # gt at ms precision: the next ms
        changed = [p["id"] for p in patients[::every]]
        with httpx.Client(timeout=60) as http:
            for n, patient_id in enumerate(changed):
                http.post(f"{sandbox}/fhir", content=json.dumps(change_bundle(patient_id, n)).encode(),
                          headers=FHIR).raise_for_status()
        (work / "patients.json").write_text(json.dumps([p["id"] for p in patients]), "utf-8")
        sandbox_requests(sandbox, clear=True)
        limit = run_timed(python_module("bench.refresh_limit", "--source", f"{sandbox}/fhir", "--patients",
                                        str(work / "patients.json"), "--since", opened))
        limit_log = sandbox_requests(sandbox, clear=True)
        refreshed: Timed | None = None
        if available:
            refreshed = run_timed(python_module("fhir_bridge", *shlex.split(REFRESH)), env=env,
                                  stderr_path=work / "refresh.stderr", timeout=3600)
        refresh_log = sandbox_requests(sandbox, clear=True)
    unchanged = {p["id"] for p in patients} - set(changed)
    limit_worst, _ = _searches(_request_patients(limit_log, world), unchanged)
    how = "pulled by the workers" if size["workers"] else "requested through the API, made ready as pulled"
    seeding = (f"{cases} cases {how} in {seeded_in:.0f} s ({counts['ready']} ready, {counts['on-hold']} on hold, "
               f"{counts['failed']} failed), {len(changed)} changed at the source; limit: one search per case, "
               f"{limit.seconds:.2f} s, {len(limit_log)} requests, {(limit.json() or {}).get('changed')} changes "
               f"found, at most {limit_worst} search per unchanged case")
    if refreshed is None:
        report.add(Row("4 sync", f"sync refresh, {cases:,} open cases, 1 % changed", None, "",
                       f"awaits issue 8: `fhir-bridge {REFRESH}` is not on this branch; harness ran: {seeding}",
                       "<= 1 search per case", None))
        return
    per_case = _request_patients(refresh_log, world)
    worst, total = _searches(per_case, unchanged)
    on_changed = sum(1 for p, _ in per_case if p in set(changed))
    report.add(Row(
        "4 sync", f"sync refresh, {cases:,} open cases, 1 % changed: wall / limit", refreshed.seconds / limit.seconds,
        "x", f"refresh {refreshed.seconds:.1f} s (exit {refreshed.returncode}), {len(refresh_log)} source requests "
        f"({len(refresh_log) / cases:.2f} per case; {on_changed} for the {len(changed)} changed cases); "
        f"searches per unchanged case: max {worst}, total {total}; {seeding}",
        "<= 1 search per case", worst <= 1 and refreshed.returncode == 0))

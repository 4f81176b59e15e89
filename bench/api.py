"""Part 3a: the API under load, on 2 cores. Requests/s, p50 and p99 of a DiagnosticReport read and a based-on
search, against ``/healthz`` of the same server in the same run.

The real thing, as a deployment runs it: a private ``redis-server`` (``appendfsync always``, the bridge's
default: every audited call is on disk before its answer leaves), the sandbox as the source, ``fhir-bridge
serve`` (one uvicorn worker) and one ``fhir-bridge worker``. Cases are seeded through the API by real clients
with real SMART Backend Services tokens (:mod:`fhir_bridge.dev.clients`): a platform asks for second
opinions, the worker pulls and packages them, the assigned reviewer posts each opinion.

The load comes from ``wrk`` (Debian package; ``bash dev.sh bench`` installs it as root) with the platform's
bearer token, else from :mod:`bench.loadgen` in its own process. The baseline is the same tool on
``/healthz`` of the same server: no token check, no store, no audit, so ``healthz rps / read rps`` is what a
FHIR read costs us over a bare request through the same stack, and the difference of the inverses is that
cost in milliseconds of one core. Endpoints are measured in turn, round after round, and the medians kept.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import common
from bench.common import Report, Row, median, py_spy, python_module, sandbox_world, start_on_free_port, top_functions
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.clients import DevClients, provision
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup

FHIR = {"Content-Type": "application/fhir+json"}
SIZES = {"full": {"cases": 6, "seconds": 10, "rounds": 3, "connections": 16},
         "quick": {"cases": 1, "seconds": 1, "rounds": 1, "connections": 4}}


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str


def token(clients: DevClients, client_id: str, api: str) -> str:
    """A fresh access token for ``client_id`` from the bridge's token endpoint (at most 300 s: one per run)."""
    auth = clients.auth(client_id, api)
    request = auth.token_request()
    with httpx.Client(timeout=30) as http:
        return auth.take_token_response(http.send(request))


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip()).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse_wrk(output: str) -> tuple[float, float, float, int]:
    """Requests/s, p50 and p99 in ms, and the non-2xx count from ``wrk --latency`` output."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                                             output)[0]) if "Socket errors" in output else 0
    return rps, p50, p99, errors


def load(url: str, bearer: str, seconds: float, connections: int) -> Load:
    """``connections`` connections on ``url`` for ``seconds``, with wrk when installed."""
    header = f"Authorization: Bearer {bearer}"
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
                              "-H", header, url], capture_output=True, text=True, timeout=seconds + 60, check=True)
        rps, p50, p99, errors = parse_wrk(out.stdout)
        return Load(rps, p50, p99, errors, "wrk")
    out = subprocess.run(python_module("bench.loadgen", url, "--connections", str(connections), "--seconds",
                                       str(seconds), "--header", header),
                         capture_output=True, text=True, timeout=seconds + 60, check=True)
    got: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return Load(got["rps"], got["p50_ms"], got["p99_ms"], int(got["errors"]), "bench.loadgen (httpx)")


def _wait_task(http: httpx.Client, api: str, sr_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        found = http.get(f"{api}/Task", params={"focus": f"ServiceRequest/{sr_id}"}).raise_for_status().json()
        task = found["entry"][0]["resource"] if found.get("entry") else {}
        if task.get("status") in ("ready", "failed", "on-hold"):
            return task
        time.sleep(0.2)
    raise RuntimeError(f"a seeded case stayed {task.get('status')!r}")


def seed(api: str, clients: DevClients, patients: list[dict[str, Any]], cases: int) -> list[tuple[str, str]]:
    """Ask for ``cases`` second opinions and post the reviewers' opinions; returns (ServiceRequest, report) ids."""
    made: list[tuple[str, str]] = []
    with httpx.Client(auth=clients.auth("platform", api), timeout=60) as platform:
        requests = []
        for n in range(cases):
            body = second_opinion_request(patients[n % len(patients)], f"BENCH-{n}")
            answer = platform.post(f"{api}/ServiceRequest", content=json.dumps(body).encode(),
                                   headers={**FHIR, "If-None-Exist": f"identifier=https://platform.example/requests|"
                                                                     f"BENCH-{n}"})
            requests.append(answer.raise_for_status().json()["id"])
        for sr_id in requests:
            task = _wait_task(platform, api, sr_id)
            if task.get("status") != "ready":
                continue
            reviewer_id = clients.reviewer_for(task["owner"]["reference"])
            with httpx.Client(auth=clients.auth(reviewer_id, api), timeout=60) as reviewer:
                seen = reviewer.get(f"{api}/ServiceRequest/{sr_id}").raise_for_status().json()
                opinion = reviewer_opinion(sr_id, {"identifier": seen["subject"]["identifier"]})
                answer = reviewer.post(f"{api}/DiagnosticReport", content=json.dumps(opinion).encode(), headers=FHIR)
                made.append((sr_id, answer.raise_for_status().json()["id"]))
    if not made:
        raise RuntimeError("no seeded case became ready: nothing to read")
    return made


def run_api(report: Report, mode: str, work: Path) -> None:
    """Part 3a; see the module docstring."""
    size = SIZES[mode]
    work.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    with EmbeddedRedis(work, appendfsync="always") as redis, ProcessGroup(work / "logs") as group:
        sandbox = start_on_free_port(group, "sandbox-api", ["sandbox", "--patients", "4", "--no-corrupt"], "/healthz")
        clients = provision(data_dir / "clients.json", data_dir / "client-keys")
        env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": f"{sandbox}/fhir",
               "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": "WARNING"}
        root = start_on_free_port(group, "api", ["serve"], "/readyz", extra_env=env)
        api = f"{root}/fhir"
        worker = group.start("worker", ["worker", "--name", "bench-worker"], extra_env=env)
        patients = [p for p in sandbox_world(sandbox)["patients"] if p["specialty"] == "oncology"]
        made = seed(api, clients, patients or sandbox_world(sandbox)["patients"], int(size["cases"]))
        group.stop(worker)  # nothing left to pull: the API has the cores to itself (and the load tool)
        sr_id, report_id = made[0]
        targets = {"healthz": f"{root}/healthz", "read": f"{api}/DiagnosticReport/{report_id}",
                   "search": f"{api}/DiagnosticReport?based-on=ServiceRequest/{sr_id}"}
        with httpx.Client(timeout=30) as http:  # each URL answers 200 with the token before it is loaded
            bearer = token(clients, "platform", api)
            for url in targets.values():
                http.get(url, headers={"Authorization": f"Bearer {bearer}"}).raise_for_status()
        results: dict[str, list[Load]] = {name: [] for name in targets}
        for _ in range(int(size["rounds"])):
            for name, url in targets.items():
                results[name].append(load(url, token(clients, "platform", api), float(size["seconds"]),
                                          int(size["connections"])))
        if common.PROFILE_DIR is not None:
            server = next(c for c in group.children if c.name == "api")
            for name in ("read", "search"):
                _profile_server(server.process.pid, f"api-{name}", targets[name], token(clients, "platform", api),
                                float(size["seconds"]), int(size["connections"]))
    base = _summary(results["healthz"])
    tool = results["healthz"][0].tool
    for name, label in (("read", "GET DiagnosticReport/{id}"), ("search", "GET DiagnosticReport?based-on=")):
        got = _summary(results[name])
        report.add(Row(
            "3 api", f"{label} requests/s", got["rps"], "req/s",
            f"p50 {got['p50']:.1f} ms, p99 {got['p99']:.1f} ms; /healthz {base['rps']:,.0f} req/s, p50 "
            f"{base['p50']:.1f} ms, p99 {base['p99']:.1f} ms (ratio healthz/{name} {base['rps'] / got['rps']:.1f}x, "
            f"+{1000 / got['rps'] - 1000 / base['rps']:.2f} ms of server time per request); "
            f"{tool}, {size['connections']} connections, {size['seconds']} s x {size['rounds']} rounds (median); "
            f"non-2xx {got['errors']}"))


def _profile_server(pid: int, name: str, url: str, bearer: str, seconds: float, connections: int) -> None:
    """``py-spy record --pid`` on the API while the same load runs again (not counted): flame graph and top
    functions of the thread holding the GIL, in the profile directory."""
    spy, where = py_spy(), common.PROFILE_DIR
    if spy is None or where is None:
        raise RuntimeError("--profile needs py-spy (pip install -e '.[bench]', or bash dev.sh bench)")
    for fmt, out in (("flamegraph", where / f"{name}.svg"), ("raw", where / f"{name}.raw")):
        recorder = subprocess.Popen([spy, "record", "--gil", "--pid", str(pid), "-r", "250", "-d",
                                     str(max(1, round(seconds))), "-f", fmt, "-o", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        load(url, bearer, seconds, connections)
        recorder.wait(timeout=seconds + 60)
    top_functions(where / f"{name}.raw", where / f"{name}.txt")


def _summary(loads: list[Load]) -> dict[str, float]:
    return {"rps": median([x.rps for x in loads]), "p50": median([x.p50_ms for x in loads]),
            "p99": median([x.p99_ms for x in loads]), "errors": sum(x.errors for x in loads)}

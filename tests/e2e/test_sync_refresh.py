"""``fhir-bridge sync refresh`` against real processes, checked on the sandbox's request log: one incremental
search per patient (``_lastUpdated=gt<watermark>``), a full pull only for the patient whose record changed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge, start_sandbox
from tests.e2e.sync_helpers import run_cli, summary
from tests.e2e.test_exchange import post, wait_task
from tests.unit.test_sandbox_write import provide_bundle

pytestmark = pytest.mark.e2e
OPEN = ("ready", "on-hold", "failed")


@pytest.fixture
def refresh_bridge(tmp_path: Path, processes: ProcessGroup) -> Iterator[tuple[Bridge, Sandbox]]:
    own = start_sandbox(processes, "sandbox-refresh", "--patients", "3", "--no-corrupt")
    with EmbeddedRedis(tmp_path) as redis, ProcessGroup(tmp_path / "logs") as group:
        bridge = start_bridge(group, redis, own.url, tmp_path, "refresh")
        bridge.start_worker("worker-refresh")
        yield bridge, own


def source_log(sandbox: Sandbox) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = httpx.get(f"{sandbox.root}/_sandbox/requests", timeout=10).json()
    for entry in entries:
        entry["params"] = dict(parse_qsl(entry["query"]))
    return entries


def clear_log(sandbox: Sandbox) -> None:
    httpx.delete(f"{sandbox.root}/_sandbox/requests", timeout=10).raise_for_status()


def refresh(bridge: Bridge) -> dict[str, Any]:
    done = run_cli(bridge, "sync", "refresh")
    assert done.returncode == 0, done.stderr
    return summary(done)


def test_refresh_fetches_only_what_changed_after_the_watermark(refresh_bridge: tuple[Bridge, Sandbox]) -> None:
    bridge, sandbox = refresh_bridge
    patients = sandbox.world()["patients"]
    with bridge.client("platform") as platform:
        requests = [post(platform, bridge.api, "ServiceRequest", second_opinion_request(p, f"REFRESH-{n}")).json()
                    for n, p in enumerate(patients)]
        tasks = [wait_task(platform, bridge.api, sr["id"], statuses=OPEN) for sr in requests]
    assert all(t["status"] in ("ready", "on-hold") for t in tasks), [t.get("statusReason") for t in tasks]

    clear_log(sandbox)
    assert refresh(bridge) | {"failures": {}} == {"patients": 3, "unchanged": 3, "changed": 0, "casesRefreshed": 0,
                                                  "casesSkipped": 0, "sourceSearches": 3, "failed": 0,
                                                  "failures": {}}
    quiet = source_log(sandbox)
    assert [e["path"] for e in quiet] == ["/fhir/DocumentReference"] * 3, "one search per patient, nothing else"
    assert {e["params"]["patient"] for e in quiet} == {p["id"] for p in patients}
    assert all(e["params"]["status"] == "current" and e["params"]["_lastUpdated"].startswith("gt") for e in quiet)

    changed = patients[1]
    written = httpx.post(f"{sandbox.url}", json=provide_bundle(changed["id"]),
                         headers={"Content-Type": "application/fhir+json"}, timeout=10)
    assert written.status_code == 200, written.text
    clear_log(sandbox)
    report = refresh(bridge)
    assert (report["changed"], report["unchanged"], report["casesRefreshed"]) == (1, 2, 1)
    with bridge.client("platform") as platform:
        again = wait_task(platform, bridge.api, requests[1]["id"], statuses=("ready", "on-hold"), timeout=60)
        history = platform.get(f"{bridge.api}/Task/{again['id']}/_history").json()
    assert [e["resource"]["businessStatus"]["coding"][0]["code"] for e in history["entry"]].count("collecting") == 2
    log = source_log(sandbox)
    for other in (patients[0], patients[2]):
        mine = [e for e in log if e["params"].get("patient") == other["id"] or other["identifier"]["value"]
                in e["query"]]
        assert len(mine) == 1 and "_lastUpdated" in mine[0]["params"], "no re-pull of an unchanged patient"
    repulled = [e for e in log if e["params"].get("patient") == changed["id"] and "_lastUpdated" not in e["params"]]
    assert {e["path"] for e in repulled} == {"/fhir/DocumentReference", "/fhir/ImagingStudy"}, "a full re-pull"

    clear_log(sandbox)
    assert (refresh(bridge)["changed"], len(source_log(sandbox))) == (0, 3), "the watermark moved past the change"
    new_doc = sandbox.world()["patients"][1]["documents"]["current"]
    assert len(new_doc) == len(changed["documents"]["current"]) + 1

"""Scale-out, end to end (issue 8 "done when"): a 500-case worklist submitted through one API process, worked
by three worker processes while one of them is SIGKILLed twice (and restarted, as systemd or Kubernetes would);
every case ends exactly once with exactly one case Bundle, and the worklist run again through a second API
process creates nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.redis_store import RedisResourceStore
from fhir_bridge.case.tasks import state_of
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge, start_on_free_port, start_sandbox
from tests.e2e.sync_helpers import platform_options, run_cli, summary, worklist_line, write_worklist

pytestmark = pytest.mark.e2e
CASES = 500
SETTLED = ("ready", "on-hold", "failed")


@pytest.fixture
def scaled(tmp_path: Path, processes: ProcessGroup) -> Iterator[tuple[Bridge, Sandbox, str]]:
    source = start_sandbox(processes, "sandbox-scale", "--patients", "40", "--no-corrupt")
    with EmbeddedRedis(tmp_path) as redis, ProcessGroup(tmp_path / "logs") as group:
        bridge = start_bridge(group, redis, source.url, tmp_path, "scale", FHIR_BRIDGE_WORKER__RECLAIM_IDLE_MS="1500")
        port = start_on_free_port(group, "scale-api-2", ["serve"], "/readyz", extra_env=bridge.env)
        yield bridge, source, f"http://127.0.0.1:{port}/fhir"


async def case_states(url: str) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], int]:
    """Every Task, each Task's history (oldest first), and how many case Bundles are stored."""
    redis = Redis.from_url(url)
    try:
        store = RedisResourceStore(redis)
        tasks = (await store.search("Task", {}, count=10 * CASES)).resources
        histories = {t["id"]: list(reversed(await store.history("Task", t["id"]))) for t in tasks}
        bundles = (await store.search("Bundle", {}, count=10 * CASES)).total
        return tasks, histories, bundles
    finally:
        await redis.aclose()


async def settled_count(url: str) -> int:
    redis = Redis.from_url(url)
    try:
        return (await RedisResourceStore(redis).search("Task", {"status": list(SETTLED)}, count=0)).total
    finally:
        await redis.aclose()


def test_three_workers_one_killed_twice_every_case_ends_once(scaled: tuple[Bridge, Sandbox, str],
                                                            tmp_path: Path) -> None:
    bridge, sandbox, second_api = scaled
    started = time.monotonic()
    patients = sandbox.world()["patients"]
    lines = [worklist_line(patients[n % len(patients)], f"Question {n} de la RCP") for n in range(CASES)]
    worklist = write_worklist(tmp_path / "rcp-500.csv", lines)
    for name in ("steady-1", "steady-2", "victim-0"):
        bridge.start_worker(name)
    env = {**bridge.env}
    submit = subprocess.Popen([sys.executable, "-m", "fhir_bridge", "sync", "worklist", str(worklist),
                               *platform_options(bridge)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**_environ(), **env})
    kills = 0
    for threshold in (CASES // 5, CASES // 2):
        while asyncio.run(settled_count(bridge.redis_url)) < threshold:
            assert time.monotonic() - started < 240, "the cases are not being worked"
            time.sleep(0.2)
        victim = next(c for c in bridge.group.children if c.name == f"victim-{kills}")
        bridge.group.stop(victim, kill=True)  # SIGKILL in the middle of its work
        kills += 1
        bridge.start_worker(f"victim-{kills}")  # the supervisor restarts it (its own log file)
    out, err = submit.communicate(timeout=240)
    assert submit.returncode == 0, err
    first = summary(subprocess.CompletedProcess([], 0, out, err))
    assert (first["created"], first["alreadyThere"], first["failed"]) == (CASES, 0, 0)
    while asyncio.run(settled_count(bridge.redis_url)) < CASES:
        assert time.monotonic() - started < 300, "cases left unfinished"
        time.sleep(0.5)

    tasks, histories, bundles = asyncio.run(case_states(bridge.redis_url))
    assert kills == 2 and len(tasks) == CASES
    assert Counter(t["status"] for t in tasks)["failed"] == 0, [t.get("statusReason") for t in tasks]
    for task in tasks:
        steps = [(v["status"], state_of(v)) for v in histories[task["id"]]]
        assert steps[:2] == [("requested", "requested"), ("in-progress", "collecting")], steps
        assert len(steps) == 3 and steps[2][0] in ("ready", "on-hold"), f"a case ended more than once: {steps}"
    assert bundles == CASES, "exactly one case Bundle per case"
    assert len({t["output"][0]["valueReference"]["reference"] for t in tasks}) == CASES

    again = run_cli(bridge, "sync", "worklist", str(worklist), *platform_options(bridge)[2:],
                    "--api", second_api)
    assert again.returncode == 0, again.stderr
    assert (summary(again)["created"], summary(again)["alreadyThere"]) == (0, CASES)
    assert asyncio.run(case_states(bridge.redis_url))[2] == CASES
    dead = run_cli(bridge, "jobs", "list", "--state", "dead", "--json")
    assert dead.returncode == 0 and dead.stdout == "", dead.stdout
    verified = run_cli(bridge, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    logs = "".join(p.read_text("utf-8", "replace") for p in (tmp_path / "logs").glob("*.log"))
    assert logs.count('"job.reclaimed"') >= 2, "each SIGKILL left a job half done, finished by another worker"


def _environ() -> dict[str, str]:
    import os

    return dict(os.environ)

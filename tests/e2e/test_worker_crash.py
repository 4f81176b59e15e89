"""A worker SIGKILLed in the middle of packaging: another worker finishes, the case ends ready exactly once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge, start_sandbox
from tests.e2e.test_exchange import post, wait_task

pytestmark = pytest.mark.e2e


@pytest.fixture
def slow_bridge(tmp_path: Path, processes: ProcessGroup) -> Iterator[tuple[Bridge, Sandbox]]:
    slow = start_sandbox(processes, "sandbox-slow", "--patients", "2", "--page-cap", "2", "--latency", "400")
    with EmbeddedRedis(tmp_path) as redis, ProcessGroup(tmp_path / "logs") as group:
        bridge = start_bridge(group, redis, slow.url, tmp_path, "crash",
                              FHIR_BRIDGE_WORKER__RECLAIM_IDLE_MS="1500", FHIR_BRIDGE_SOURCE__CONCURRENCY="2")
        yield bridge, slow


async def count_keys(url: str, pattern: str) -> int:
    redis = Redis.from_url(url)
    try:
        return len([k async for k in redis.scan_iter(match=pattern)])
    finally:
        await redis.aclose()


def test_a_killed_worker_job_is_finished_by_another_exactly_once(slow_bridge: tuple[Bridge, Sandbox]) -> None:
    bridge, sandbox = slow_bridge
    patient = sandbox.world()["patients"][0]
    victim = bridge.start_worker("victim")
    with bridge.client("platform") as platform:
        answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "CRASH-1"))
        assert answer.status_code == 201, answer.text
        sr = answer.json()
        wait_task(platform, bridge.api, sr["id"], statuses=("in-progress",), timeout=30)
        time.sleep(1.0)  # well inside the pull: searches and retrieves are under way
        bridge.group.stop(victim, kill=True)
        still = wait_task(platform, bridge.api, sr["id"], timeout=5, statuses=("in-progress",))
        assert still["status"] == "in-progress"

        bridge.start_worker("rescuer")
        task = wait_task(platform, bridge.api, sr["id"], timeout=90)
        assert task["status"] == "ready", task.get("statusReason")
        history = platform.get(f"{bridge.api}/Task/{task['id']}/_history").json()
        assert [e["resource"]["status"] for e in reversed(history["entry"])] == ["requested", "in-progress", "ready"]
    assert asyncio.run(count_keys(bridge.redis_url, "*{Bundle}:r:*")) == 1
    bundle_ref = task["output"][0]["valueReference"]["reference"]
    with bridge.client(bridge.reviewer_of(task)) as reviewer:
        assert reviewer.get(f"{bridge.api}/{bundle_ref}").status_code == 200

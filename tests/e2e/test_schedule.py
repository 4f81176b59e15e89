"""A scheduled job runs once per tick with three real worker processes on one Redis (issue 8)."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.scheduler import RedisScheduler
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge
from tests.fakes import InMemoryQueue

pytestmark = pytest.mark.e2e
EVERY_2_S = "*/2 * * * * *"


@pytest.fixture
def scheduled_bridge(tmp_path: Path, sandbox: Sandbox) -> Iterator[Bridge]:
    with EmbeddedRedis(tmp_path) as redis, ProcessGroup(tmp_path / "logs") as group:
        yield start_bridge(group, redis, sandbox.url, tmp_path, "sched", FHIR_BRIDGE_SCHEDULE__OVERDUE=EVERY_2_S)


async def recorded_runs(url: str) -> list[tuple[int, str]]:
    redis = Redis.from_url(url)
    try:
        return await RedisScheduler(redis, InMemoryQueue(), []).runs("overdue")
    finally:
        await redis.aclose()


def test_a_scheduled_job_runs_once_per_tick_with_three_workers(scheduled_bridge: Bridge) -> None:
    bridge = scheduled_bridge
    workers = [bridge.start_worker(f"sched-{n}") for n in range(3)]
    time.sleep(12)
    for worker in workers:
        bridge.group.stop(worker)
    time.sleep(0.5)  # the last enqueued tick may still be running on its way out: it finished before exit
    runs = asyncio.run(recorded_runs(bridge.redis_url))
    ticks = [tick for tick, _ in runs]
    assert len(ticks) >= 4, runs
    assert Counter(ticks).most_common(1)[0][1] == 1, f"a tick ran twice: {runs}"
    assert ticks == sorted(ticks)
    assert {b - a for a, b in itertools.pairwise(ticks)} == {2000}, f"a tick was skipped: {ticks}"
    assert {who for _, who in runs} <= {"sched-0", "sched-1", "sched-2"}
    metrics = httpx.get(bridge.api.removesuffix("/fhir") + "/metrics", timeout=10).text
    claimed = re.search(r'^fhir_bridge_schedule_ticks_total\{job="overdue"\} (\d+)', metrics, re.M)
    assert claimed is not None and int(claimed[1]) >= len(ticks), metrics
    done = re.search(r'^fhir_bridge_job_attempts_total\{kind="sync-overdue",outcome="done"\} (\d+)', metrics, re.M)
    assert done is not None and int(done[1]) == len(ticks)

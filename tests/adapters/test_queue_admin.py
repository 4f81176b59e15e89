"""Operators' view of the queue (``fhir-bridge jobs``, ``sync deliver``, ``/metrics``) on a real redis-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from fhir_bridge.adapters.queue import RedisJobQueue
from fhir_bridge.adapters.queue_admin import QueueAdmin
from fhir_bridge.ports import Job
from tests.adapters.test_queue import FAST, Worker, eventually

SECRET = "295109912611193"


def make_queue(redis_url: str, **options: object) -> RedisJobQueue:
    return RedisJobQueue(Redis.from_url(redis_url), blocking_redis=Redis.from_url(redis_url, socket_timeout=None),
                         **{**FAST, **options})  # type: ignore[arg-type]


async def failing(job: Job) -> None:
    if job.kind != "collect-case":
        raise ConnectionError(f"webhook refused for patient {SECRET}")


async def test_jobs_are_listed_by_state_without_payload_values(redis_client: Redis, redis_url: str) -> None:
    queue = make_queue(redis_url, max_attempts=2, backoff_initial=30, backoff_max=30)
    admin = QueueAdmin(queue)
    await queue.enqueue("deliver-webhook", {"patient": SECRET}, job_id="deliver:1")
    await queue.enqueue("deliver-iti65", {"patient": SECRET}, job_id="deliver:2")
    await queue.enqueue("collect-case", {"task": "t1"}, job_id="collect:1")
    ready = await admin.jobs()
    assert sorted((j.id, j.state, j.attempts) for j in ready) == [
        ("collect:1", "ready", 0), ("deliver:1", "ready", 0), ("deliver:2", "ready", 0)]
    assert ready[0].payload_fields in (("patient",), ("task",))
    worker = Worker(queue, "w1", failing).start()
    await eventually(lambda: queue.counters.retries == 2 and queue.counters.processed == 1)
    await worker.halt()
    delayed = await admin.jobs(["delayed"])
    assert sorted(j.id for j in delayed) == ["deliver:1", "deliver:2"]
    assert all(j.attempts == 1 and 0 < (j.due_in_seconds or 0) <= 30 for j in delayed)
    assert SECRET not in json.dumps([j.to_json() for j in await admin.jobs()])
    assert await admin.outcomes() == {("deliver-webhook", "retry"): 1, ("deliver-iti65", "retry"): 1,
                                      ("collect-case", "done"): 1}
    shown = await admin.show("collect:1")
    assert shown is not None and shown.state == "done"
    assert await admin.show("nope") is None
    await queue.aclose()


async def test_sync_deliver_redrives_only_delivery_kinds(redis_client: Redis, redis_url: str) -> None:
    queue = make_queue(redis_url, max_attempts=1)
    admin = QueueAdmin(queue)
    for job_id, kind in (("d1", "deliver-webhook"), ("d2", "deliver-iti65"), ("c1", "refresh-case")):
        await queue.enqueue(kind, {"x": 1}, job_id=job_id)
    worker = Worker(queue, "w1", failing).start()
    await eventually(lambda: queue.counters.dead == 3)
    await worker.halt()
    assert {(j.id, j.error_type) for j in await admin.jobs(["dead"])} == {
        ("d1", "ConnectionError"), ("d2", "ConnectionError"), ("c1", "ConnectionError")}
    done = await admin.redrive(["deliver-*"])
    assert (done.from_dead, done.made_due) == (2, 0)
    assert {j.id for j in await admin.jobs(["ready"])} == {"d1", "d2"}
    assert {j.id for j in await admin.jobs(["dead"])} == {"c1"}
    await queue.aclose()

    slow = make_queue(redis_url, max_attempts=5, backoff_initial=60, backoff_max=60)
    worker = Worker(slow, "w2", failing).start()
    await eventually(lambda: slow.counters.retries == 2)
    await worker.halt()
    made_due = await QueueAdmin(slow).redrive(["deliver-webhook"])
    assert (made_due.from_dead, made_due.made_due) == (0, 1)
    [due] = [j for j in await admin.jobs(["delayed"]) if j.id == "d1"]
    assert due.due_in_seconds == 0
    await slow.aclose()


def cli(redis_url: str, tmp_path: Path, *args: str, group: str = "jobs") -> subprocess.CompletedProcess[str]:
    env = {"FHIR_BRIDGE_REDIS_URL": redis_url, "FHIR_BRIDGE_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "fhir_bridge", group, *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


async def test_the_jobs_command(redis_client: Redis, redis_url: str, tmp_path: Path) -> None:
    queue = make_queue(redis_url, max_attempts=1)
    await queue.enqueue("deliver-webhook", {"patient": SECRET}, job_id="deliver:9")
    worker = Worker(queue, "w1", failing).start()
    await eventually(lambda: queue.counters.dead == 1)
    await worker.halt()
    await queue.aclose()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(redis_url, tmp_path, *args)

    listed = await asyncio.to_thread(run, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["id"], row["state"], row["errorType"], row["payloadFields"]) == (
        "deliver:9", "dead", "ConnectionError", ["patient"])
    table = await asyncio.to_thread(run, "list")
    assert "deliver:9" in table.stdout and SECRET not in table.stdout + listed.stdout
    shown = await asyncio.to_thread(run, "show", "deliver:9")
    assert json.loads(shown.stdout)["state"] == "dead"
    unknown = await asyncio.to_thread(run, "show", "nope")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    refused = await asyncio.to_thread(run, "purge-dead")
    assert refused.returncode == 2 and "--yes" in refused.stderr and "1 dead letter" in refused.stderr
    redriven = await asyncio.to_thread(cli, redis_url, tmp_path, "deliver", group="sync")
    assert redriven.returncode == 0, redriven.stderr
    assert json.loads(redriven.stdout) == {"fromDead": 1, "madeDue": 0, "kinds": ["deliver-*"]}
    again = await asyncio.to_thread(run, "retry", "deliver:9")
    assert again.returncode == 2  # no longer dead: back in the queue
    purged = await asyncio.to_thread(run, "purge-dead", "--yes")
    assert purged.returncode == 0 and json.loads(purged.stdout) == {"purged": 0}
    queue = make_queue(redis_url, max_attempts=1)
    await queue.enqueue("refresh-case", {"x": 1}, job_id="other:1")
    worker = Worker(queue, "w2", failing).start()
    await eventually(lambda: queue.counters.dead == 2)  # deliver:9, re-driven above, fails again; then other:1
    await worker.halt()
    await queue.aclose()
    retried = await asyncio.to_thread(run, "retry", "other:1")
    assert retried.returncode == 0 and json.loads(retried.stdout) == {"retried": "other:1"}

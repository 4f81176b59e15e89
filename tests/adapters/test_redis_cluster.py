"""Every Redis adapter of the bridge on a real three-node Redis Cluster (issue 8: key design for Cluster).

A Lua script or MULTI whose keys are in more than one slot fails on a cluster (CROSSSLOT), so these runs
prove each multi-key operation stays within one hash tag: the store (one tag per resource type), the queue
(``{jobs}``, and its operators' view), the audit chain (``{audit}``), the scheduler (``{schedule}``), the
per-patient sync marks and the token replay cache (one key per operation, no tag: they spread over nodes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.auth import RedisReplayCache
from fhir_bridge.adapters.queue import RedisJobQueue
from fhir_bridge.adapters.queue_admin import QueueAdmin
from fhir_bridge.adapters.redis_clients import connect
from fhir_bridge.adapters.redis_store import RedisResourceStore
from fhir_bridge.adapters.scheduler import RedisScheduler
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.adapters.sync_state import RedisSyncState
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.ports import Job, SyncMark
from fhir_bridge.schedule import load_schedule
from tests.adapters.test_audit_log import read
from tests.adapters.test_queue import FAST, Worker, eventually
from tests.redis_cluster import RedisClusterNodes, redis_cluster

__all__ = ["redis_cluster"]


@pytest.fixture
async def cluster(redis_cluster: RedisClusterNodes) -> AsyncIterator[Redis]:
    client = connect(redis_cluster.url, cluster=True)
    await client.flushall()
    yield client
    await client.aclose()


async def test_the_store_on_a_cluster(cluster: Redis) -> None:
    store = RedisResourceStore(cluster)
    task, created = await store.create({"resourceType": "Task", "status": "requested"},
                                       index={"status": ["requested"]}, unique_key="task-for:ServiceRequest/1")
    again, created_again = await store.create({"resourceType": "Task", "status": "requested"},
                                              index={"status": ["requested"]}, unique_key="task-for:ServiceRequest/1")
    assert created and not created_again and again["id"] == task["id"]
    await store.update({**task, "status": "ready"}, index={"status": ["ready"]}, if_match="1")
    await store.create({"resourceType": "ServiceRequest", "status": "active"}, index={"status": ["active"]})
    page = await store.search("Task", {"status": ["ready"], "_lastUpdated": ["ge2020"]}, count=10)
    assert page.total == 1 and [v["status"] for v in await store.history("Task", task["id"])] == ["ready", "requested"]


async def test_the_queue_and_its_admin_on_a_cluster(cluster: Redis, redis_cluster: RedisClusterNodes) -> None:
    blocking = connect(redis_cluster.url, cluster=True, socket_timeout=None)
    queue = RedisJobQueue(cluster, blocking_redis=blocking, **{**FAST, "max_attempts": 2})

    async def handler(job: Job) -> None:
        if job.kind == "deliver-webhook":
            raise ConnectionError("refused")

    await queue.enqueue("collect-case", {"task": "t1"}, job_id="collect:t1")
    await queue.enqueue("deliver-webhook", {"x": 1}, job_id="deliver:1")
    worker = Worker(queue, "w1", handler).start()
    await eventually(lambda: queue.counters.processed == 1 and queue.counters.dead == 1, within=10)
    await worker.halt()
    admin = QueueAdmin(queue)
    assert [(j.id, j.state) for j in await admin.jobs()] == [("deliver:1", "dead")]
    assert (await admin.redrive(["deliver-*"])).from_dead == 1
    assert await queue.depth() == 1 and await admin.outcomes() == {
        ("collect-case", "done"): 1, ("deliver-webhook", "retry"): 1, ("deliver-webhook", "dead"): 1}
    await blocking.aclose()


async def test_the_audit_chain_on_a_cluster(cluster: Redis) -> None:
    log = RedisAuditLog(cluster, signer=Es384Signer.generate(), checkpoint_every=3, checkpoint_seconds=3600)
    for n in range(1, 8):
        await log.append(read(n))
    assert (await log.verify()).ok
    events, total = await log.search(subtype="read", count=3)
    assert total == 7 and len(events) == 3


async def test_scheduler_marks_and_replay_cache_on_a_cluster(cluster: Redis) -> None:
    queue = RedisJobQueue(cluster, **FAST)
    [job] = load_schedule({"overdue": "* * * * *"}, "UTC")
    scheduler = RedisScheduler(cluster, queue, [job])
    tick = datetime(2026, 11, 2, 2, 0, tzinfo=UTC)
    claims = await asyncio.gather(*(scheduler.claim(job, tick, f"w{n}") for n in range(3)))
    assert claims.count(True) == 1
    await scheduler.record_run("overdue", int(tick.timestamp() * 1000), "w1")
    assert len(await scheduler.runs("overdue")) == 1
    marks = RedisSyncState(cluster)
    patient = PatientIdentifier(INS_NIR_TEST, "295109912611193")
    await marks.advance(patient, patient_id="p1", watermark="2026-11-01T00:00:00Z")
    assert await marks.get(patient) == SyncMark("p1", "2026-11-01T00:00:00Z")
    cache = RedisReplayCache(cluster)
    assert await cache.remember("jti-1", 60) and not await cache.remember("jti-1", 60)


async def test_the_keys_are_spread_over_the_nodes(cluster: Redis, redis_cluster: RedisClusterNodes) -> None:
    assert isinstance(cluster, RedisCluster)
    store = RedisResourceStore(cluster)
    for rtype in ("Task", "ServiceRequest", "Bundle", "DiagnosticReport", "AuditEvent"):
        await store.create({"resourceType": rtype}, index={})
    per_node = []
    for port in redis_cluster.ports:
        node = Redis(host="127.0.0.1", port=port)
        per_node.append(await node.dbsize())
        await node.aclose()
    assert sum(1 for n in per_node if n) >= 2, per_node

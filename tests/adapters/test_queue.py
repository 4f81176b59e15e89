"""The Redis Streams job queue against a real redis-server: once, retried, dead-lettered, reclaimed."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.queue import RedisJobQueue
from fhir_bridge.adapters.queue_policy import KindPolicy, PermanentJobError
from fhir_bridge.errors import InvalidInput
from fhir_bridge.ports import Job, JobQueuePort

FAST = {"block_ms": 20, "backoff_initial": 0.01, "backoff_max": 0.05, "reclaim_idle_ms": 5_000}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=[None, 3], ids=["default-replies", "resp3-replies"])
async def make_queue(
    redis_client: Redis, redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., RedisJobQueue]]:
    """Queues on the flushed test database, with the clients redis-py builds by default and with
    ``protocol=3`` (which changes the shape of some replies); every client is closed after the test."""
    clients: list[Redis] = []

    def make(**options: Any) -> RedisJobQueue:
        main = Redis.from_url(redis_url, protocol=request.param)
        blocking = Redis.from_url(redis_url, protocol=request.param, socket_timeout=None)
        clients.extend([main, blocking])
        return RedisJobQueue(main, blocking_redis=blocking, **{**FAST, **options})

    yield make
    for client in clients:
        await client.aclose()


class Worker:
    """A consumer running ``queue.run`` in a task, recording every job its handler saw."""

    def __init__(self, queue: RedisJobQueue, name: str, handler: Callable[[Job], Awaitable[None]] | None = None):
        self.queue, self.name, self.handler = queue, name, handler
        self.seen: list[Job] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _handle(self, job: Job) -> None:
        self.seen.append(job)
        if self.handler is not None:
            await self.handler(job)

    def start(self) -> Worker:
        self.task = asyncio.create_task(self.queue.run(self.name, self._handle, self.stop))
        return self

    async def halt(self) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 5)

    async def crash(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``check`` until it holds: queue work happens in other tasks and processes."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_redis_job_queue_implements_the_port(make_queue: Callable[..., RedisJobQueue]) -> None:
    port: JobQueuePort = make_queue()
    assert port is not None


async def test_a_job_is_processed_once_with_its_payload(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue()
    job_id = await queue.enqueue("collect", {"task": "t1", "note": "é", "n": 2})
    worker = Worker(queue, "w1").start()
    await eventually(lambda: len(worker.seen) == 1)
    await eventually(lambda: queue.counters.processed == 1)
    await asyncio.sleep(0.1)
    await worker.halt()
    [job] = worker.seen
    assert (job.id, job.kind, job.payload, job.attempt) == (job_id, "collect", {"task": "t1", "note": "é", "n": 2}, 1)
    assert await queue.job_state(job_id) == "done"
    assert (await queue.depth(), await queue.pending_count(), await queue.oldest_age_seconds()) == (0, 0, 0.0)


async def test_a_handler_failing_twice_runs_three_times(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue(max_attempts=5)

    async def flaky(job: Job) -> None:
        if job.attempt < 3:
            raise ConnectionResetError("source hiccup")

    worker = Worker(queue, "w1", flaky).start()
    job_id = await queue.enqueue("collect", {"task": "t1"})
    await eventually(lambda: queue.counters.processed == 1)
    await worker.halt()
    assert [job.attempt for job in worker.seen] == [1, 2, 3]
    assert queue.counters.retries == 2
    assert await queue.job_state(job_id) == "done"
    assert await queue.dead_letters() == []


async def test_a_job_failing_every_attempt_ends_in_dead_letters(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue(max_attempts=3)

    async def broken(job: Job) -> None:
        raise ValueError("bad document for patient 1234")

    worker = Worker(queue, "w1", broken).start()
    job_id = await queue.enqueue("collect", {"task": "secret-task-id"}, job_id="collect:t9")
    await eventually(lambda: queue.counters.dead == 1)
    await worker.halt()
    assert len(worker.seen) == 3
    [letter] = await queue.dead_letters()
    assert (letter.job_id, letter.kind, letter.attempts) == (job_id, "collect", 3)
    assert (letter.error_type, letter.error_message) == ("ValueError", "bad document for patient 1234")
    assert letter.payload == {"task": "secret-task-id"}
    assert "secret-task-id" not in repr(letter), "the payload stays out of reprs that may reach logs"
    assert await queue.job_state(job_id) == "dead"
    assert await queue.depth() == 0 and await queue.pending_count() == 0


async def test_a_permanent_error_goes_straight_to_dead_letters(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue(max_attempts=5)

    async def refuse(job: Job) -> None:
        raise PermanentJobError("the Task no longer exists")

    worker = Worker(queue, "w1", refuse).start()
    await queue.enqueue("collect", {"task": "gone"})
    await eventually(lambda: queue.counters.dead == 1)
    await worker.halt()
    assert len(worker.seen) == 1
    [letter] = await queue.dead_letters()
    assert (letter.error_type, letter.attempts) == ("PermanentJobError", 1)


async def test_a_kind_has_its_own_attempts_and_permanent_errors(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue(max_attempts=2, policies={"deliver-webhook": KindPolicy(4, 0.01, 0.02),
                                                 "deliver-record": KindPolicy(4, 0.01, 0.02, permanent=(KeyError,))})

    async def fail(job: Job) -> None:
        raise (KeyError if job.payload["n"] else ValueError)("no PDF")

    worker = Worker(queue, "w1", fail).start()
    await queue.enqueue("collect", {"n": 0})  # the queue's defaults: 2 attempts
    await queue.enqueue("deliver-webhook", {"n": 0})  # its own: 4 attempts
    await queue.enqueue("deliver-record", {"n": 1})  # a permanent error for this kind: 1 attempt
    await queue.enqueue("collect", {"n": 1})  # the same error is not permanent for another kind
    await eventually(lambda: queue.counters.dead == 4)
    await worker.halt()
    attempts = sorted((letter.kind, letter.error_type, letter.attempts) for letter in await queue.dead_letters())
    assert attempts == [("collect", "KeyError", 2), ("collect", "ValueError", 2), ("deliver-record", "KeyError", 1),
                        ("deliver-webhook", "ValueError", 4)]


async def test_dead_jobs_can_be_retried_or_purged(make_queue: Callable[..., RedisJobQueue]) -> None:
    queue = make_queue(max_attempts=1)
    healthy = asyncio.Event()

    async def fails_until_healthy(job: Job) -> None:
        if not healthy.is_set():
            raise RuntimeError("down")

    worker = Worker(queue, "w1", fails_until_healthy).start()
    await queue.enqueue("deliver", {"report": "r1"}, job_id="deliver:r1")
    await queue.enqueue("deliver", {"report": "r2"}, job_id="deliver:r2")
    await eventually(lambda: queue.counters.dead == 2)
    assert [letter.job_id for letter in await queue.dead_letters()] == ["deliver:r2", "deliver:r1"]

    healthy.set()
    assert await queue.retry_dead("deliver:r1")
    assert not await queue.retry_dead("deliver:r1"), "already back in the queue"
    assert not await queue.retry_dead("never-enqueued")
    await eventually(lambda: queue.counters.processed == 1)
    assert worker.seen[-1].payload == {"report": "r1"} and worker.seen[-1].attempt == 1
    assert [letter.job_id for letter in await queue.dead_letters()] == ["deliver:r2"]

    assert await queue.purge_dead() == 1
    assert await queue.dead_letters() == []
    assert not await queue.retry_dead("deliver:r2")
    await queue.enqueue("deliver", {"report": "r2"}, job_id="deliver:r2")  # a purged job may be enqueued again
    await eventually(lambda: queue.counters.processed == 2)
    await worker.halt()


async def test_the_same_job_id_is_enqueued_once_while_pending_or_done(
    make_queue: Callable[..., RedisJobQueue],
) -> None:
    queue = make_queue()
    assert await queue.enqueue("collect", {"task": "t1"}, job_id="collect:t1") == "collect:t1"
    assert await queue.enqueue("collect", {"task": "t1"}, job_id="collect:t1") == "collect:t1"
    assert await queue.depth() == 1
    assert await queue.job_state("collect:t1") == "pending"
    worker = Worker(queue, "w1").start()
    await eventually(lambda: queue.counters.processed == 1)
    await queue.enqueue("collect", {"task": "t1"}, job_id="collect:t1")
    await asyncio.sleep(0.1)
    await worker.halt()
    assert [job.id for job in worker.seen] == ["collect:t1"]
    with pytest.raises(InvalidInput):
        await queue.enqueue("collect", {"task": object()})
    with pytest.raises(InvalidInput):
        await queue.enqueue("collect", {}, job_id="x" * 257)


async def test_a_crashed_consumers_job_is_reclaimed_by_another(make_queue: Callable[..., RedisJobQueue]) -> None:
    started = asyncio.Event()

    async def hang(job: Job) -> None:
        started.set()
        await asyncio.sleep(60)

    doomed = Worker(make_queue(reclaim_idle_ms=60_000), "doomed", hang).start()
    queue = make_queue(reclaim_idle_ms=150)
    job_id = await queue.enqueue("collect", {"task": "t1"})
    await asyncio.wait_for(started.wait(), 5)
    await doomed.crash()
    assert await queue.pending_count() == 1

    rescuer = Worker(queue, "rescuer").start()
    await eventually(lambda: queue.counters.processed == 1)
    await rescuer.halt()
    [job] = rescuer.seen
    assert (job.id, job.attempt, job.meta["consumer"]) == (job_id, 2, "rescuer")
    assert queue.counters.reclaimed == 1
    assert await queue.pending_count() == 0


async def test_a_long_job_is_not_taken_from_a_live_worker(make_queue: Callable[..., RedisJobQueue]) -> None:
    async def slow(job: Job) -> None:
        await asyncio.sleep(0.6)  # four times the idle limit: only the heartbeat keeps it

    queue = make_queue(reclaim_idle_ms=150)
    first = Worker(queue, "first", slow).start()
    await queue.enqueue("collect", {"task": "t1"})
    await eventually(lambda: len(first.seen) == 1)
    second = Worker(make_queue(reclaim_idle_ms=150), "second").start()
    await eventually(lambda: queue.counters.processed == 1)
    await asyncio.gather(first.halt(), second.halt())
    assert second.seen == []


async def test_a_job_that_kills_every_worker_ends_in_dead_letters(make_queue: Callable[..., RedisJobQueue]) -> None:
    started = asyncio.Event()

    async def fatal(job: Job) -> None:
        started.set()
        await asyncio.sleep(60)

    queue = make_queue(reclaim_idle_ms=100, max_attempts=2)
    await queue.enqueue("collect", {"task": "poison"}, job_id="poison")
    for name in ("w1", "w2"):
        started.clear()
        worker = Worker(make_queue(reclaim_idle_ms=100, max_attempts=2), name, fatal).start()
        await asyncio.wait_for(started.wait(), 5)
        await worker.crash()
    last = Worker(queue, "w3", fatal).start()
    await eventually(lambda: queue.counters.dead == 1)
    await last.halt()
    assert last.seen == [], "the third delivery is not run"
    [letter] = await queue.dead_letters()
    assert (letter.job_id, letter.error_type, letter.attempts) == ("poison", "WorkerLost", 2)


async def test_two_consumers_share_fifty_jobs_each_processed_exactly_once(
    make_queue: Callable[..., RedisJobQueue],
) -> None:
    async def work(job: Job) -> None:
        await asyncio.sleep(0.002)

    queue = make_queue()
    workers = [Worker(make_queue(), f"w{i}", work).start() for i in range(2)]
    ids = [await queue.enqueue("collect", {"n": n}) for n in range(50)]
    await eventually(lambda: sum(len(w.seen) for w in workers) == 50)
    await asyncio.sleep(0.1)
    await asyncio.gather(*(w.halt() for w in workers))
    seen = Counter(job.id for w in workers for job in w.seen)
    assert sorted(seen) == sorted(ids) and set(seen.values()) == {1}
    assert all(w.seen for w in workers), "both consumers took work"
    assert await queue.depth() == 0 and await queue.pending_count() == 0


async def test_retries_move_back_exactly_once_with_many_workers(make_queue: Callable[..., RedisJobQueue]) -> None:
    async def fail_first(job: Job) -> None:
        if job.attempt == 1:
            raise TimeoutError("first try")

    queue = make_queue()
    workers = [Worker(make_queue(), f"w{i}", fail_first).start() for i in range(4)]
    for n in range(20):
        await queue.enqueue("collect", {"n": n})
    await eventually(lambda: sum(len(w.seen) for w in workers) >= 40)
    await asyncio.sleep(0.2)
    await asyncio.gather(*(w.halt() for w in workers))
    runs = Counter((job.id, job.attempt) for w in workers for job in w.seen)
    assert len(runs) == 40 and set(runs.values()) == {1}


async def test_stopping_finishes_the_job_in_hand(make_queue: Callable[..., RedisJobQueue]) -> None:
    in_handler, release = asyncio.Event(), asyncio.Event()

    async def careful(job: Job) -> None:
        in_handler.set()
        await release.wait()

    queue = make_queue(block_ms=1000)
    worker = Worker(queue, "w1", careful).start()
    job_id = await queue.enqueue("collect", {"task": "t1"})
    await asyncio.wait_for(in_handler.wait(), 5)
    worker.stop.set()
    await asyncio.sleep(0.05)
    assert worker.task is not None and not worker.task.done()
    release.set()
    await asyncio.wait_for(worker.task, 5)
    assert await queue.job_state(job_id) == "done"
    assert await queue.pending_count() == 0


async def test_queue_gauges(make_queue: Callable[..., RedisJobQueue], redis_client: Redis) -> None:
    queue = make_queue(backoff_initial=30, backoff_max=30)
    for n in range(3):
        await queue.enqueue("collect", {"n": n})
    assert await queue.depth() == 3
    assert await queue.pending_count() == 0
    await asyncio.sleep(0.05)
    assert 0.04 < await queue.oldest_age_seconds() < 5

    async def fail(job: Job) -> None:
        raise RuntimeError("later")

    worker = Worker(queue, "w1", fail).start()
    await eventually(lambda: queue.counters.retries == 3)
    await worker.halt()
    assert await queue.depth() == 3, "retries waiting for their time still count"
    assert await redis_client.zcard(queue.delayed) == 3


async def test_keys_share_one_hash_tag_per_queue(make_queue: Callable[..., RedisJobQueue], redis_client: Redis) -> None:
    queue = make_queue(prefix="fb:", name="jobs", max_attempts=1)

    async def broken(job: Job) -> None:
        raise RuntimeError("x")

    worker = Worker(queue, "w1", broken).start()
    await queue.enqueue("collect", {}, job_id="j1")
    await eventually(lambda: queue.counters.dead == 1)
    await worker.halt()
    assert sorted(k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")) == [
        "fb:{jobs}:dead",
        "fb:{jobs}:job:j1",
        "fb:{jobs}:stats",
        "fb:{jobs}:stream",
    ]
    with pytest.raises(ValueError, match="braces"):
        RedisJobQueue(redis_client, name="{x}")


async def test_from_url_owns_and_closes_its_clients(redis_client: Redis, redis_url: str) -> None:
    queue = RedisJobQueue.from_url(redis_url, **FAST)
    worker = Worker(queue, "w1").start()
    await queue.enqueue("collect", {"task": "t1"})
    await eventually(lambda: queue.counters.processed == 1)
    await worker.halt()
    await queue.aclose()


WORKER_SCRIPT = """
import asyncio, sys
from fhir_bridge.adapters.queue import RedisJobQueue

async def main():
    queue = RedisJobQueue.from_url(sys.argv[1], block_ms=50, reclaim_idle_ms=60_000)
    async def handler(job):
        print("started", job.id, flush=True)
        await asyncio.sleep(60)
    await queue.run("doomed-process", handler, asyncio.Event())

asyncio.run(main())
"""


async def test_a_worker_process_killed_mid_job_loses_nothing(
    make_queue: Callable[..., RedisJobQueue], redis_url: str
) -> None:
    queue = make_queue(reclaim_idle_ms=200)
    job_id = await queue.enqueue("collect", {"task": "t1"}, job_id="collect:t1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER_SCRIPT, redis_url, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 15)
        assert line.decode().split() == ["started", job_id]
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert await queue.job_state(job_id) == "pending" and await queue.pending_count() == 1

    rescuer = Worker(queue, "rescuer").start()
    await eventually(lambda: queue.counters.processed == 1)
    await rescuer.halt()
    [job] = rescuer.seen
    assert (job.id, job.attempt, job.payload) == (job_id, 2, {"task": "t1"})
    assert await queue.job_state(job_id) == "done"

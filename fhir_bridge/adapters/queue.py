"""The job queue: Redis Streams with one consumer group, for ``fhir-bridge worker`` (ARCHITECTURE.md "Real parts").

Delivery is at least once, so handlers must be idempotent (the workflow's move a Task with If-Match). It
guarantees:

* a job given an id is enqueued once while it is pending or done (a state key, like SET NX with a TTL);
* a worker that dies mid-job (crash, SIGKILL, lost host) loses nothing: its entry stays pending in the group
  and another worker takes it over with XAUTOCLAIM once it has been idle ``reclaim_idle_ms``; a running
  job refreshes its claim (a heartbeat) so a long job is never taken from a live worker;
* attempts survive crashes: the entry carries the attempt it started at and the group's delivery count adds
  the deliveries lost to dead workers, so a job that kills its worker every time still ends in dead letters;
* a failed attempt is retried after an exponential backoff with jitter, waiting in a delayed zset until the
  first worker to see it due moves it back to the stream (one Lua script: it moves exactly once);
* a kind of job may have its own :class:`~fhir_bridge.adapters.queue_policy.KindPolicy` (attempts, backoff,
  errors that are permanent; ``fhir_bridge.adapters.queue_policy``): a delivery to a webhook that is down for
  hours is retried for hours, a collect job gives up sooner;
* after ``max_attempts``, or at once on :class:`~fhir_bridge.adapters.queue_policy.PermanentJobError`, the job
  goes to the dead-letter stream with the error's class and message (never into logs: messages may quote data)
  until retried or purged.

Keys share one hash tag (the queue name) because the Lua scripts (``fhir_bridge.adapters.queue_scripts``) move
a job between them atomically::

    P{jobs}:stream      ready and running jobs (stream, group "workers"); an entry is deleted once settled
    P{jobs}:delayed     retries waiting for their time (zset: the job as JSON, scored by due time, Redis clock)
    P{jobs}:dead        dead letters (stream: the job, its attempts, the error class and message)
    P{jobs}:job:<id>    the job's state: pending, done, or dead:<its dead-letter entry id> (string with a TTL)
    P{jobs}:stats       hash: <outcome>:<kind> → how many attempts ended so (done, retry, dead), every worker
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fhir_bridge.adapters import queue_scripts as scripts
from fhir_bridge.adapters.queue_policy import KindPolicy, QueueCounters
from fhir_bridge.errors import InvalidInput
from fhir_bridge.ports import Job, JobHandler

log = structlog.get_logger("fhir_bridge.queue")

GROUP = "workers"
_FIELDS = ("id", "kind", "payload", "attempt", "enqueued")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A job that will not be retried by itself; ``payload`` is left out of ``repr`` (it may reach logs)."""

    job_id: str
    kind: str
    attempts: int
    error_type: str
    error_message: str
    failed_at: datetime
    payload: dict[str, Any] = field(repr=False)


class RedisJobQueue:
    """:class:`~fhir_bridge.ports.JobQueuePort` and the worker loop, on one stream and consumer group.

    ``blocking_redis`` serves the blocking XREADGROUP; it should have ``socket_timeout=None`` (redis-py
    8 defaults to 5 s). :meth:`from_url` builds both clients; without one, reads block on ``redis``, which
    is safe only while ``block_ms`` stays well below that client's socket timeout.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        blocking_redis: Redis | None = None,
        name: str = "jobs",
        prefix: str = "fhir-bridge:",
        max_attempts: int = 5,
        reclaim_idle_ms: int = 30_000,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        block_ms: int = 1000,
        state_ttl_s: int = 7 * 24 * 3600,
        policies: dict[str, KindPolicy] | None = None,
    ) -> None:
        if max_attempts < 1 or reclaim_idle_ms < 1 or block_ms < 1 or "{" in prefix + name or "}" in prefix + name:
            raise ValueError("max_attempts, reclaim_idle_ms and block_ms must be positive; no braces in names")
        self._redis = redis
        self._blocking = blocking_redis or redis
        self._owned: list[Redis] = []
        self.max_attempts, self.reclaim_idle_ms, self.block_ms = max_attempts, reclaim_idle_ms, block_ms
        self.backoff_initial, self.backoff_max, self.state_ttl_s = backoff_initial, backoff_max, state_ttl_s
        self.policies = dict(policies or {})
        self.counters = QueueCounters()
        base = f"{prefix}{{{name}}}:"
        self.stream, self.delayed, self.dead, self.stats, self._state_prefix = (
            f"{base}{k}" for k in ("stream", "delayed", "dead", "stats", "job:")
        )
        self._enqueue, self._promote, self._settle = (
            redis.register_script(x) for x in (scripts.ENQUEUE, scripts.PROMOTE, scripts.SETTLE)
        )
        self._group_ready = False

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, **options: Any) -> RedisJobQueue:
        """A queue with its own two clients (the blocking one without socket timeout); close with :meth:`aclose`."""
        from fhir_bridge.adapters.redis_clients import connect

        main, blocking = connect(url, cluster=cluster), connect(url, cluster=cluster, socket_timeout=None)
        queue = cls(main, blocking_redis=blocking, **options)
        queue._owned = [queue._redis, queue._blocking]
        return queue

    async def aclose(self) -> None:
        """Close the clients :meth:`from_url` made; clients passed in belong to the caller."""
        for client in self._owned:
            await client.aclose()

    async def enqueue(self, kind: str, payload: dict[str, Any], *, job_id: str | None = None) -> str:
        """Add a job; with ``job_id``, a no-op while a job with that id is pending or done (and not dead)."""
        job_id = job_id or uuid.uuid4().hex
        if not 0 < len(job_id) <= 256:
            raise InvalidInput("a job id is 1 to 256 characters")
        try:
            body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            raise InvalidInput(f"the payload of a {kind} job is not JSON") from None
        await self._ensure_group()
        keys = [self._state_key(job_id), self.stream, self.dead]
        await self._enqueue(keys=keys, args=[self.state_ttl_s, job_id, kind, body])
        return job_id

    async def run(self, consumer_name: str, handler: JobHandler, stop_event: asyncio.Event) -> None:
        """Work until ``stop_event`` is set; the job in hand is finished first (graceful stop).

        Each turn moves due retries back, takes over a job idle past ``reclaim_idle_ms`` (a dead worker's)
        or else blocks up to ``block_ms`` for a new one. An unreachable Redis is waited out; cancelling
        the task leaves the job in hand to be reclaimed.
        """
        cursor, next_reclaim, outage = "0-0", 0.0, 0
        while not stop_event.is_set():
            try:
                await self._ensure_group()
                wait_ms = await self._promote(keys=[self.delayed, self.stream], args=[100])
                entry: _Delivery | None = None
                if time.monotonic() >= next_reclaim:
                    entry, cursor = await self._reclaim_one(consumer_name, cursor)
                    if entry is None and cursor == "0-0":
                        next_reclaim = time.monotonic() + self.reclaim_idle_ms / 2000
                if entry is None:
                    block = self.block_ms if wait_ms < 0 else max(1, min(self.block_ms, int(wait_ms)))
                    entry = await self._read_one(consumer_name, block)
                outage = 0
                if entry is not None:
                    await self._process(entry, handler)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                outage += 1
                log.warning("queue.redis_unavailable", error=type(exc).__name__, attempt=outage)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_event.wait(), min(5.0, 0.1 * 2**outage))
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False  # the stream was deleted (FLUSHALL): recreate the group

    async def depth(self) -> int:
        """Jobs waiting to run: ready in the stream and not yet taken, plus retries waiting for their time."""
        await self._ensure_group()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, GROUP)
            pipe.zcard(self.delayed)
            length, pending, delayed = await pipe.execute()
        return int(length) - int(pending["pending"]) + int(delayed)

    async def pending_count(self) -> int:
        """Jobs taken by a worker and not yet settled (running, or held by a dead worker until reclaimed)."""
        await self._ensure_group()
        summary: Any = await self._redis.xpending(self.stream, GROUP)
        return int(summary["pending"])

    async def oldest_age_seconds(self) -> float:
        """Seconds the oldest entry has been in the stream (ready or running), by the Redis clock; 0 if none."""
        first: Any = await self._redis.xrange(self.stream, count=1)
        if not first:
            return 0.0
        seconds, micros = await self._redis.time()
        return max(0.0, seconds + micros / 1e6 - _entry_ms(first[0][0]) / 1000)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        letters = []
        entries: Any = await self._redis.xrevrange(self.dead, count=limit)
        for entry_id, raw in entries:
            f = _decode(raw)
            when = datetime.fromtimestamp(_entry_ms(entry_id) / 1000, UTC)
            error_type, message, payload = f["error_type"], f["error_message"], json.loads(f["payload"])
            letters.append(DeadLetter(f["id"], f["kind"], int(f["attempt"]), error_type, message, when, payload))
        return letters

    async def retry_dead(self, job_id: str) -> bool:
        """Put a dead job back in the stream with a fresh set of attempts; False if it is not dead."""
        state = _text(await self._redis.get(self._state_key(job_id)) or "")
        dead = state.startswith("dead:")
        entries: Any = await self._redis.xrange(self.dead, state[5:], state[5:]) if dead else []
        if not entries:
            return False
        f, keys = _decode(entries[0][1]), [self._state_key(job_id), self.stream, self.dead]
        # the enqueue script takes a dead job back atomically, dropping its dead letter; a racing call is a no-op
        return bool(await self._enqueue(keys=keys, args=[self.state_ttl_s, job_id, f["kind"], f["payload"]]))

    async def purge_dead(self) -> int:
        """Drop every dead letter; returns how many. Their ids may be enqueued again afterwards."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xlen(self.dead)
            pipe.delete(self.dead)
            length, _ = await pipe.execute()
        return int(length)

    async def job_state(self, job_id: str) -> str | None:
        """``pending``, ``done`` or ``dead`` while the job's state is kept (``state_ttl_s``), else None."""
        state = await self._redis.get(self._state_key(job_id))
        return None if state is None else _text(state).split(":")[0]

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _read_one(self, consumer: str, block_ms: int) -> _Delivery | None:
        reply: Any = await self._blocking.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=1, block=block_ms)
        # redis-py answers [[stream, entries]], or {stream: [entries]} to a client made with protocol=3
        entries = next(iter(reply.values()), [[]])[0] if isinstance(reply, dict) else reply and reply[0][1]
        if not entries:
            return None
        entry_id, raw = entries[0]
        fields = _decode(raw)
        return _Delivery(_text(entry_id), fields, int(fields.get("attempt", "1")), consumer)

    async def _reclaim_one(self, consumer: str, cursor: str) -> tuple[_Delivery | None, str]:
        """Take over one entry idle past ``reclaim_idle_ms``; its attempt counts the deliveries lost since."""
        idle = self.reclaim_idle_ms
        reply: Any = await self._redis.xautoclaim(self.stream, GROUP, consumer, idle, start_id=cursor, count=1)
        if not reply[1]:
            return None, _text(reply[0])
        entry_id, fields = _text(reply[1][0][0]), _decode(reply[1][0][1])
        info: Any = await self._redis.xpending_range(self.stream, GROUP, min=entry_id, max=entry_id, count=1)
        deliveries = int(info[0]["times_delivered"]) if info else 2
        self.counters.reclaimed += 1
        log.info("job.reclaimed", job_id=fields.get("id"), kind=fields.get("kind"), deliveries=deliveries)
        attempt = int(fields.get("attempt", "1")) + deliveries - 1
        return _Delivery(entry_id, fields, attempt, consumer), _text(reply[0])

    async def _process(self, d: _Delivery, handler: JobHandler) -> None:
        f = d.fields
        try:
            meta = {"enqueued_ms": int(f["enqueued"]), "consumer": d.consumer}
            job = Job(f["id"], f["kind"], json.loads(f["payload"]), d.attempt, d.entry_id, meta)
        except (KeyError, ValueError) as exc:
            await self._bury(d, d.attempt, "MalformedJob", f"unreadable entry: {exc!r}")
            return
        policy = self._policy(job.kind)
        if d.attempt > policy.max_attempts:  # every earlier delivery died with its worker
            message = f"the worker running it stopped on each of its {d.attempt - 1} attempts"
            await self._bury(d, d.attempt - 1, "WorkerLost", message)
            return
        beat = asyncio.create_task(self._keep_claim(d))
        try:
            await handler(job)
        except Exception as exc:
            if policy.buries(d.attempt, exc):
                await self._bury(d, d.attempt, type(exc).__name__, str(exc))
            else:
                await self._retry_later(d, type(exc).__name__, policy)
        else:
            if await self._settle_entry(d, "done"):
                self.counters.processed += 1
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    def _policy(self, kind: str) -> KindPolicy:
        return self.policies.get(kind) or KindPolicy(self.max_attempts, self.backoff_initial, self.backoff_max)

    async def _retry_later(self, d: _Delivery, error: str, policy: KindPolicy) -> None:
        delay = policy.retry_delay(d.attempt)
        job = json.dumps({**{k: d.fields[k] for k in _FIELDS}, "attempt": str(d.attempt + 1)}, ensure_ascii=False)
        if await self._settle_entry(d, "retry", int(delay * 1000), job):
            self.counters.retries += 1
            log.info("job.retry", job_id=d.fields["id"], kind=d.fields["kind"], attempt=d.attempt, error=error)

    async def _bury(self, d: _Delivery, attempts: int, error: str, message: str) -> None:
        letter = {**{k: d.fields.get(k, "") for k in _FIELDS}, "attempt": str(attempts)}
        letter |= {"error_type": error, "error_message": message[:1000], "entry": d.entry_id}
        if await self._settle_entry(d, "dead", *(item for pair in letter.items() for item in pair)):
            self.counters.dead += 1
            log.warning("job.dead", job_id=letter["id"], kind=letter["kind"], attempts=attempts, error=error)

    async def _settle_entry(self, d: _Delivery, outcome: str, *extra: str | int) -> bool:
        job_id, kind = d.fields.get("id", ""), d.fields.get("kind", "")
        keys = [self.stream, self.delayed, self.dead, self._state_key(job_id), self.stats]
        args = [GROUP, d.consumer, d.entry_id, outcome, self.state_ttl_s, kind, *extra]
        if await self._settle(keys=keys, args=args):
            return True
        log.warning("job.taken_over", job_id=job_id, outcome=outcome)  # another worker reclaimed it meanwhile
        return False

    async def _keep_claim(self, d: _Delivery) -> None:
        """While a job runs, keep its entry fresh so it is not reclaimed from a live worker."""
        while True:
            await asyncio.sleep(self.reclaim_idle_ms / 3000)
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                if not await self._settle_entry(d, "beat"):
                    return

    def _state_key(self, job_id: str) -> str:
        return self._state_prefix + job_id


@dataclass(slots=True)
class _Delivery:
    """One stream entry handed to this worker, and the attempt it stands for."""

    entry_id: str
    fields: dict[str, str]
    attempt: int
    consumer: str


def _decode(raw: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _entry_ms(entry_id: Any) -> int:
    return int(_text(entry_id).split("-")[0])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

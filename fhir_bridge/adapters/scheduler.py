"""The scheduler inside every worker: each tick of a scheduled job runs exactly once across all workers.

Every worker watches the clock and, when a tick of a job (:mod:`fhir_bridge.schedule`) comes, tries to claim
it. The claim is one Lua script on keys sharing the ``{schedule}`` hash tag::

    P{schedule}:last:<job>          the newest tick claimed (ms since the epoch)
    P{schedule}:lease:<job>:<tick>  who claimed that tick (SET NX, expires after the grace window)
    P{schedule}:ticks               hash: <job> → ticks claimed, <job>:at → the newest one (seconds), for /metrics
    P{schedule}:runs:<job>          list: "<tick> <consumer>" each time the job's handler started (newest 1000)

A tick is claimed only if it is newer than the job's last claimed tick and its lease is free: so a worker that
starts late, or whose clock lags, never runs a tick another worker already ran, and a tick is never run
twice. The winner enqueues the job on the queue with the id ``schedule:<job>:<tick>`` (the queue's own
idempotency again), so the run itself gets the queue's guarantees: retries, another worker finishing it if
the winner dies, dead letters, ``fhir-bridge jobs``.

Missed ticks: a running worker claims every tick since it last looked (so one stalled for a few seconds still
runs each tick, unless another already did); a worker starting claims only the newest tick of the last
``grace`` seconds that nobody ran (so a short outage of every worker still runs the job once) and never
catches up older ones. A worker dying
between its claim and its enqueue loses that tick (the next one runs): a window of one Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fhir_bridge.ports import JobQueuePort
from fhir_bridge.schedule import ScheduledJob

log = structlog.get_logger("fhir_bridge.scheduler")

_RUNS_KEPT = 1000

# KEYS: last, lease, ticks. ARGV: tick ms, consumer, lease ttl s, job name, tick seconds.
_CLAIM = """
local last = tonumber(redis.call('GET', KEYS[1]) or '-1')
if tonumber(ARGV[1]) <= last then return 0 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
redis.call('HSET', KEYS[3], ARGV[4] .. ':at', ARGV[5])
return 1
"""


class RedisScheduler:
    """Claims and enqueues the ticks of ``jobs``; :meth:`run` is the loop a worker runs beside its queue loop."""

    def __init__(self, redis: Redis, queue: JobQueuePort, jobs: list[ScheduledJob], *, prefix: str = "fhir-bridge:",
                 grace_seconds: float = 60.0, clock: Callable[[], datetime] | None = None) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces: they would change the Cluster hash tag")
        self._redis = redis
        self._queue = queue
        self.jobs = jobs
        self._base = f"{prefix}{{schedule}}:"
        self.grace = timedelta(seconds=grace_seconds)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._claim = redis.register_script(_CLAIM)
        self._checked: dict[str, datetime] = {}

    async def step(self, consumer: str) -> float:
        """Claim and enqueue every tick due now; returns the seconds until the next tick of any job."""
        now = self._clock()
        wait = 3600.0
        for job in self.jobs:
            checked = self._checked.get(job.name)
            if checked is None:  # just started: only the newest tick of the grace window (no catching up)
                newest = job.latest_tick(now - self.grace, now)
                due = [newest] if newest is not None else []
            else:  # every tick since the last look, in order (a worker a little late still runs each one)
                due = job.ticks_between(max(checked, now - self.grace), now)
            self._checked[job.name] = now
            for tick in due:
                await self.claim(job, tick, consumer)
            wait = min(wait, (job.next_tick(now) - now).total_seconds())
        return max(0.0, wait)

    async def claim(self, job: ScheduledJob, tick: datetime, consumer: str) -> bool:
        """Take ``tick`` of ``job`` for this worker and enqueue its run; False when it was not ours to take."""
        ms = int(tick.timestamp() * 1000)
        keys = [self._key(f"last:{job.name}"), self._key(f"lease:{job.name}:{ms}"), self._key("ticks")]
        ttl = max(60, int(self.grace.total_seconds() * 2))
        if not await self._claim(keys=keys, args=[ms, consumer, ttl, job.name, ms // 1000]):
            return False
        await self._queue.enqueue(job.kind, {"job": job.name, "tick": ms}, job_id=f"schedule:{job.name}:{ms}")
        log.info("schedule.tick", job=job.name, tick=tick.astimezone(UTC).isoformat(), consumer=consumer)
        return True

    async def run(self, consumer: str, stop: asyncio.Event) -> None:
        """Watch the clock until ``stop``; an unreachable Redis is waited out like the queue loop does."""
        if not self.jobs:
            return
        while not stop.is_set():
            try:
                wait = await self.step(consumer)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("schedule.redis_unavailable", error=type(exc).__name__)
                wait = 1.0
            # wake at the tick, and at least every second (a clock that jumps, a stop asked for)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(max(wait, 0.01), 1.0))

    async def record_run(self, job: str, tick_ms: int, consumer: str) -> None:
        """Note that the handler of ``job`` started for ``tick_ms`` (what an operator, or a test, reads back)."""
        key = self._key(f"runs:{job}")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, f"{tick_ms} {consumer}")
            pipe.ltrim(key, 0, _RUNS_KEPT - 1)
            await pipe.execute()

    async def runs(self, job: str) -> list[tuple[int, str]]:
        """The recorded runs of ``job``, oldest first: (tick in ms, consumer)."""
        raw: Any = await self._redis.lrange(self._key(f"runs:{job}"), 0, -1)
        pairs = [(_text(item).split(" ", 1)) for item in reversed(raw)]
        return [(int(tick), who) for tick, who in pairs]

    async def tick_stats(self) -> dict[str, tuple[int, float]]:
        """Job name → (ticks claimed, time of the newest in seconds), for ``/metrics``."""
        raw: Any = await self._redis.hgetall(self._key("ticks"))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return {name: (int(count), float(fields.get(f"{name}:at", 0))) for name, count in fields.items()
                if not name.endswith(":at")}

    def _key(self, rest: str) -> str:
        return self._base + rest


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""What operators see and do with the job queue: ``fhir-bridge jobs``, ``sync deliver`` and ``/metrics``.

Reads the keys of :class:`~fhir_bridge.adapters.queue.RedisJobQueue` (same hash tag) without changing how the
queue works. A job is shown by its id, kind, state, attempts, age and, for a failed one, the class of its
last error, never its payload (it may name a patient) nor the error's message (it may quote data): only the
names of the payload's fields.

States: ``ready`` (in the stream, not yet taken), ``running`` (taken by a worker, not yet settled; a dead
worker's job stays running until another reclaims it), ``delayed`` (a retry waiting for its time), ``dead``
(in the dead letters), and ``done`` (kept only as the job id's state, for ``state_ttl_s``).

Listing reads at most ``scan_limit`` entries of each key, so a queue of a million jobs costs a bounded read.
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fhir_bridge.adapters.queue import GROUP, RedisJobQueue

__all__ = ["JobView", "QueueAdmin", "Redriven"]

STATES = ("ready", "running", "delayed", "dead")


@dataclass(frozen=True, slots=True)
class JobView:
    """One job as an operator may see it (no payload values, no error message)."""

    id: str
    kind: str
    state: str
    attempts: int
    age_seconds: float  # since it was first enqueued
    error_type: str = ""  # dead letters: the class of the last error
    consumer: str = ""  # running: the worker holding it
    due_in_seconds: float | None = None  # delayed: until its retry
    payload_fields: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": self.state, "attempts": self.attempts,
                                  "ageSeconds": round(self.age_seconds, 3)}
        if self.error_type:
            answer["errorType"] = self.error_type
        if self.consumer:
            answer["consumer"] = self.consumer
        if self.due_in_seconds is not None:
            answer["dueInSeconds"] = round(self.due_in_seconds, 3)
        if self.payload_fields:
            answer["payloadFields"] = list(self.payload_fields)
        return answer


@dataclass(frozen=True, slots=True)
class Redriven:
    """What ``sync deliver`` did: dead letters put back, waiting retries made due now."""

    from_dead: int
    made_due: int


class QueueAdmin:
    def __init__(self, queue: RedisJobQueue, *, scan_limit: int = 10_000) -> None:
        self.queue = queue
        self.redis: Any = queue._redis  # the queue's own client: same Redis, same hash tag
        self.scan_limit = scan_limit

    async def jobs(self, states: Iterable[str] = STATES, *, kind: str | None = None, limit: int = 100
                   ) -> list[JobView]:
        """Jobs in ``states`` (of ``kind`` when given, a glob pattern), oldest first, at most ``limit``."""
        wanted, now_ms = set(states), await self._now_ms()
        found: list[JobView] = []
        if wanted & {"ready", "running"}:
            found += [j for j in await self._stream_jobs(now_ms) if j.state in wanted]
        if "delayed" in wanted:
            found += await self._delayed_jobs(now_ms)
        if "dead" in wanted:
            found += await self._dead_jobs(now_ms)
        if kind:
            found = [j for j in found if fnmatch.fnmatchcase(j.kind, kind)]
        return sorted(found, key=lambda j: -j.age_seconds)[:limit]

    async def show(self, job_id: str) -> JobView | None:
        """One job by id, wherever it is; a finished job is known by its state only (kind unknown)."""
        for job in await self.jobs(limit=self.scan_limit * 3):
            if job.id == job_id:
                return job
        state = await self.queue.job_state(job_id)
        return JobView(job_id, "", state, 0, 0.0) if state == "done" else None

    async def retry(self, job_id: str) -> bool:
        """Put a dead job back in the queue with fresh attempts; False when it is not dead."""
        return await self.queue.retry_dead(job_id)

    async def purge_dead(self) -> int:
        return await self.queue.purge_dead()

    async def redrive(self, patterns: Iterable[str]) -> Redriven:
        """``sync deliver``: every dead job of a kind matching ``patterns`` goes back to the queue, and every
        retry of such a kind waiting for its backoff is made due now. Other kinds are left alone."""
        patterns = list(patterns)

        def matches(kind: str) -> bool:
            return any(fnmatch.fnmatchcase(kind, p) for p in patterns)

        from_dead = 0
        for job in await self._dead_jobs(await self._now_ms()):
            if matches(job.kind) and await self.queue.retry_dead(job.id):
                from_dead += 1
        made_due = 0
        now_ms = await self._now_ms()
        members: Any = await self.redis.zrange(self.queue.delayed, 0, self.scan_limit - 1)
        for member in members:
            if matches(str(_loads(member).get("kind", ""))):
                # XX: only while it is still waiting (a worker may have just moved it back to the stream)
                made_due += int(await self.redis.zadd(self.queue.delayed, {member: now_ms}, xx=True, ch=True))
        return Redriven(from_dead, made_due)

    async def counts(self) -> dict[tuple[str, str], int]:
        """(kind, state) → how many jobs, for ``/metrics``."""
        tally: Counter[tuple[str, str]] = Counter()
        for job in await self.jobs(limit=self.scan_limit * 3):
            tally[(job.kind, job.state)] += 1
        return dict(tally)

    async def outcomes(self) -> dict[tuple[str, str], int]:
        """(kind, outcome) → attempts ended so since the queue began (done, retry, dead), every worker."""
        raw: Any = await self.redis.hgetall(self.queue.stats)
        answer: dict[tuple[str, str], int] = {}
        for field, value in raw.items():
            outcome, _, kind = _text(field).partition(":")
            answer[(kind, outcome)] = int(value)
        return answer

    async def _stream_jobs(self, now_ms: int) -> list[JobView]:
        entries: Any = await self.redis.xrange(self.queue.stream, count=self.scan_limit)
        running: dict[str, tuple[str, int]] = {}
        if entries:
            await self.queue._ensure_group()
            pending: Any = await self.redis.xpending_range(self.queue.stream, GROUP, min="-", max="+",
                                                          count=self.scan_limit)
            running = {_text(p["message_id"]): (_text(p["consumer"]), int(p["times_delivered"])) for p in pending}
        views = []
        for entry_id, raw in entries:
            f = {_text(k): _text(v) for k, v in raw.items()}
            holder = running.get(_text(entry_id))
            attempts = int(f.get("attempt", "1")) - 1 + (holder[1] if holder else 0)  # attempts started
            views.append(JobView(f.get("id", ""), f.get("kind", ""), "running" if holder else "ready", attempts,
                                 _age(now_ms, f.get("enqueued")), consumer=holder[0] if holder else "",
                                 payload_fields=_fields(f.get("payload"))))
        return views

    async def _delayed_jobs(self, now_ms: int) -> list[JobView]:
        members: Any = await self.redis.zrange(self.queue.delayed, 0, self.scan_limit - 1, withscores=True)
        views = []
        for member, score in members:
            job = _loads(member)
            views.append(JobView(str(job.get("id", "")), str(job.get("kind", "")), "delayed",
                                 int(job.get("attempt", 1)) - 1, _age(now_ms, job.get("enqueued")),
                                 due_in_seconds=max(0.0, (score - now_ms) / 1000),
                                 payload_fields=_fields(job.get("payload"))))
        return views

    async def _dead_jobs(self, now_ms: int) -> list[JobView]:
        entries: Any = await self.redis.xrange(self.queue.dead, count=self.scan_limit)
        views = []
        for _, raw in entries:
            f = {_text(k): _text(v) for k, v in raw.items()}
            views.append(JobView(f.get("id", ""), f.get("kind", ""), "dead", int(f.get("attempt") or 0),
                                 _age(now_ms, f.get("enqueued")), error_type=f.get("error_type", ""),
                                 payload_fields=_fields(f.get("payload"))))
        return views

    async def _now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000


def _age(now_ms: int, enqueued: Any) -> float:
    try:
        return max(0.0, (now_ms - int(enqueued)) / 1000)
    except (TypeError, ValueError):
        return 0.0


def _fields(payload: Any) -> tuple[str, ...]:
    data = _loads(payload) if isinstance(payload, str | bytes) else {}
    return tuple(sorted(data))


def _loads(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

"""The audit log's keys in Redis and the reads of its chain: by seq, by recorded time, its end and checkpoints.

Its own module because two parts need exactly this and nothing more: the log itself
(:class:`~fhir_bridge.adapters.audit_log.RedisAuditLog`, which appends, verifies and purges on top of it and
subclasses :class:`AuditChainReader`) and the export (``fhir_bridge.adapters.audit_export``, which only reads).
With the reads here the export depends on them and not back on the log, which depends on the export.

Keys (``P`` is the configurable prefix, default ``fhir-bridge:``; ``<m>`` is an event's seq on 15 digits, so that
the lexical order of members is their seq order)::

    P{audit}:head            hash: seq, hash (the chain's end); cps, cpt (last checkpoint's seq and time in ms);
                             fseq, fhash, fcp (the retention floor: last purged seq, its hash, its signed checkpoint)
    P{audit}:ev              hash: <m> → the stored AuditEvent (canonical JSON, chain extension included)
    P{audit}:t               zset: <m> scored by ``recorded`` in ms since the epoch
    P{audit}:cp              hash: <m> → signed checkpoint JSON of the chain at that event
    P{audit}:ix:<param>=<v>  set: the <m> answering to a search token (``fhir_bridge.audit.events.index_terms``)

Every key shares the ``{audit}`` hash tag (Redis Cluster puts them in one slot), so the log's Lua scripts
(``fhir_bridge.adapters.audit_scripts``) can write an event, its indexes and the chain end at once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from fhir_bridge.audit.chain import GENESIS, Checkpoint

BATCH = 512  # events per round trip when streaming the chain
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STRAGGLERS = 1000  # how far out of time order an event may sit by seq at a date boundary (see seq_range)


@dataclass(frozen=True, slots=True)
class ChainState:
    """The chain's end (``seq`` 0 and the genesis hash when empty), the last checkpointed seq, the retention
    anchor (the signed link of the last purged event; None before any purge)."""

    seq: int
    hash: str
    checkpoint_seq: int
    floor: Checkpoint | None


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The head key as read (or as this process last wrote it): what an append chains on."""

    seq: int
    hash: str  # GENESIS before the first event
    stored_hash: str  # what the head key holds ('' when nothing): the compare-and-set expects it
    cps: int
    cpt: int
    floor: Checkpoint | None


class AuditChainReader:
    """Reads of the audit chain stored under ``prefix`` (see the module docstring for the keys)."""

    def __init__(self, redis: Redis, *, prefix: str = "fhir-bridge:") -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces: they would change the Cluster hash tag")
        self._redis = redis
        self._prefix = prefix
        self._head_key, self._events, self._time, self._cps = (self._key(k) for k in ("head", "ev", "t", "cp"))

    async def iter_range(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> AsyncIterator[tuple[int, bytes | None]]:
        """``(seq, stored bytes)`` in seq order for the contiguous slice of the chain recorded in
        [``since``, ``until``) (None: nothing is stored at that seq, which verification reports)."""
        span = await self.seq_range(since, until)
        if span is not None:
            async for item in self.read_range(*span):
                yield item

    async def state(self) -> ChainState:
        """Where the chain ends, its last checkpoint and its retention floor (for the auditor's status view)."""
        head = await self._head()
        return ChainState(head.seq, head.hash, head.cps, head.floor)

    async def checkpoints(self) -> list[Checkpoint]:
        """Every signed checkpoint above the retention floor, in seq order."""
        return sorted((Checkpoint.from_json(v) for v in (await self._redis.hgetall(self._cps)).values()),
                      key=lambda c: c.seq)  # fmt: skip

    async def read_range(self, first: int, last: int) -> AsyncIterator[tuple[int, bytes | None]]:
        """``(seq, stored bytes or None)`` for every seq from ``first`` to ``last``, in batches."""
        for low in range(first, last + 1, BATCH):
            seqs = range(low, min(low + BATCH - 1, last) + 1)
            bodies = await self._redis.hmget(self._events, [seq_member(s) for s in seqs])
            for seq, body in zip(seqs, bodies, strict=True):
                yield seq, as_bytes(body)

    async def seq_range(self, since: datetime | None, until: datetime | None) -> tuple[int, int] | None:
        """The seqs from the first event recorded at or after ``since`` to the last recorded before ``until``.

        An append stamps ``recorded`` just before its compare-and-set, so time order and seq order agree up to
        clock steps; the bounds take the extreme seq among the ``_STRAGGLERS`` events nearest each date."""
        head = await self._head()
        first, last = (head.floor.seq if head.floor else 0) + 1, head.seq
        if since is not None:
            found = await self._redis.zrangebyscore(self._time, ms_ceil(since), "+inf", start=0, num=_STRAGGLERS)
            first = max(first, min((int(as_text(m)) for m in found), default=last + 1))
        if until is not None:
            bound = f"({ms_ceil(until)}"
            found = await self._redis.zrevrangebyscore(self._time, bound, "-inf", start=0, num=_STRAGGLERS)
            last = min(last, max((int(as_text(m)) for m in found), default=0))
        return (first, last) if first <= last else None

    async def _head(self) -> ChainHead:
        seq, hash_, cps, cpt, fcp = await self._redis.hmget(self._head_key, ["seq", "hash", "cps", "cpt", "fcp"])
        stored = as_text(hash_) if hash_ is not None else ""
        floor = Checkpoint.from_json(fcp) if fcp else None
        return ChainHead(int(seq or 0), stored or GENESIS, stored, int(cps or 0), int(cpt or 0), floor)

    def _index_key(self, param: str, value: str) -> str:
        return self._key("ix", f"{param}={value}")

    def _key(self, kind: str, rest: str | None = None) -> str:
        return f"{self._prefix}{{audit}}:{kind}" + ("" if rest is None else f":{rest}")


def seq_member(seq: int) -> str:
    """The member naming ``seq`` in the audit keys: 15 digits, so that lexical order is seq order."""
    return f"{seq:015d}"


def as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ms(when: datetime) -> int:
    """``when`` in ms since the epoch, the score of ``P{audit}:t`` (a naive datetime is taken as UTC)."""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(milliseconds=1)


def ms_ceil(when: datetime) -> int:
    """The first whole ms at or after ``when``: the score bound of a date in a search or a purge."""
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return math.ceil((when - _EPOCH) / timedelta(microseconds=1) / 1000)

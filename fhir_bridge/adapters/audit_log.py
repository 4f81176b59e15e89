"""The audit log in Redis: AuditEvents hash-chained in one sequence, indexed for auditors, checkpointed, exportable.

The keys, and the reads of the chain that the export shares, are in ``fhir_bridge.adapters.audit_reader``
(:class:`~fhir_bridge.adapters.audit_reader.AuditChainReader`, which this log extends); the export of a slice
with its signed manifest in ``fhir_bridge.adapters.audit_export``.

Every key shares the ``{audit}`` hash tag: an append writes the event, its indexes and the new chain end in one
Lua script (``fhir_bridge.adapters.audit_scripts``), so a search or a verification never sees half an event.
The chain hash is SHA-256, which Redis Lua lacks (it has only SHA-1), so an append is a compare-and-set: read
the chain's end, seal the event in Python (``fhir_bridge.audit.chain.seal``), and let the script store it only
if the end has not moved; else retry.

Fail closed: :meth:`RedisAuditLog.append` raises :class:`~fhir_bridge.audit.events.AuditUnavailable` on any Redis or
network error, and the caller refuses the exchange. Durability is Redis's: the embedded server runs with
``appendfsync always`` for the audit (an append returns once it is on disk).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from fhir_bridge.adapters import audit_scripts as scripts
from fhir_bridge.adapters.audit_export import export_ndjson
from fhir_bridge.adapters.audit_reader import (
    BATCH,
    AuditChainReader,
    ChainHead,
    as_bytes,
    as_text,
    ms,
    ms_ceil,
    seq_member,
)
from fhir_bridge.audit.chain import (
    GENESIS,
    AuditIntegrityError,
    ChainLink,
    ChainVerifier,
    Checkpoint,
    Manifest,
    SignatureVerifier,
    Signer,
    VerifyResult,
    chain_link,
    seal,
    sign_checkpoint,
)
from fhir_bridge.audit.events import AuditUnavailable, index_terms
from fhir_bridge.errors import Conflict, InvalidInput
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource, dumps, loads

_APPEND_ATTEMPTS = 200  # compare-and-set rounds lost to other writers before the append is refused
_GROUP = 256  # appends sent in one pipeline at most


class RedisAuditLog(AuditChainReader):
    """The hash-chained AuditEvent log; see ``fhir_bridge.adapters.audit_reader`` for the keys and
    ``fhir_bridge.audit.chain`` for the chain. ``signer`` signs checkpoints (every ``checkpoint_every`` events or
    ``checkpoint_seconds``, whichever comes first) and export manifests; ``verifier`` checks them (default: the
    signer, which knows only its own key: pass a verifier holding the old public keys after a rotation)."""

    def __init__(
        self,
        redis: Redis,
        *,
        signer: Signer,
        prefix: str = "fhir-bridge:",
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        clock: Callable[[], datetime] | None = None,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        super().__init__(redis, prefix=prefix)
        if checkpoint_every < 1 or checkpoint_seconds <= 0:
            raise ValueError("checkpoints need a positive interval")
        self._signer = signer
        self._verifier: SignatureVerifier = verifier or signer
        self._every = checkpoint_every
        self._interval_ms = int(checkpoint_seconds * 1000)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._append = redis.register_script(scripts.APPEND)
        self._write_checkpoint = redis.register_script(scripts.CHECKPOINT)
        self._purge = redis.register_script(scripts.PURGE)
        self._search = redis.register_script(scripts.SEARCH)
        self._waiting: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
        self._known: ChainHead | None = None  # the chain end as this process last wrote it

    async def append(self, event: Resource) -> Resource:
        """Store ``event`` at the end of the chain and return it as stored (``id`` = its seq, ``recorded`` = now
        by the log's clock: the log is the recorder, R4 ``AuditEvent.recorded``; chain extension added).

        Atomic, ordered across every process sharing the Redis, and fail closed: any failure raises
        :class:`AuditUnavailable` and the event is then certainly not stored... or stored whole, if the
        connection broke after Redis applied it (the chain stays valid either way).

        Group commit: the appends waiting in this process when a write goes out are sealed one after the other
        and sent together in one pipeline of compare-and-set scripts (one round trip, one fsync under
        ``appendfsync always``); each caller still returns only once its own event is stored. This process's
        last known chain end is used without reading it again; another process having moved it makes the
        script answer ``stale`` and the end is read afresh. (BENCHMARKS.md part 3: concurrent writers in one
        process used to lose most compare-and-set rounds to each other.)
        """
        if not isinstance(event, dict) or event.get("resourceType") != "AuditEvent":
            raise InvalidInput("only AuditEvents go into the audit log")
        keys = [self._head_key, self._events, self._time, self._cps]
        keys += [self._index_key(param, value) for param, values in index_terms(event).items() for value in values]
        loop = asyncio.get_running_loop()
        waiting = _Waiting(event, keys, loop.create_future())
        self._waiting.append(waiting)
        if self._writer is not None and self._writer.get_loop() is not loop:
            self._waiting, self._writer, self._known = [waiting], None, None  # left by a loop that is gone
        if self._writer is None or self._writer.done():
            # its own task: a caller cancelled while its batch is out must not leave the others waiting
            self._writer = loop.create_task(self._write_waiting())
        return await waiting.future

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:_GROUP], self._waiting[_GROUP:]
            try:
                await self._write_group(batch)
            except (RedisError, OSError) as exc:
                self._known = None
                error = AuditUnavailable(f"the audit log cannot be written ({type(exc).__name__})")
                error.__cause__ = exc
                _fail(batch, error)
            except BaseException as exc:  # never leave a caller waiting for a writer that is gone
                self._known = None
                _fail(batch, exc if isinstance(exc, Exception) else AuditUnavailable("the audit writer stopped"))
                _fail(self._waiting, AuditUnavailable("the audit writer stopped"))
                self._waiting = []
                raise

    async def _write_group(self, batch: list[_Waiting]) -> None:
        """Seal ``batch`` in order after the chain end and store it in one pipeline; settle each caller."""
        pending = batch
        for attempt in range(_APPEND_ATTEMPTS):
            head = self._known or await self._head()
            seq, hash_, stored_hash, cps, cpt = head.seq, head.hash, head.stored_hash, head.cps, head.cpt
            sealed: list[tuple[Resource, ChainLink, int, int]] = []  # event, link, checkpoint seq and ms after it
            pipe = self._redis.pipeline(transaction=False)
            for waiting in pending:
                now = self._clock()
                stored, link = seal({**waiting.event, "recorded": instant(now)}, seq + 1, hash_)
                score = ms(now)
                checkpoint = ""
                if link.seq - cps >= self._every or score - cpt >= self._interval_ms:
                    checkpoint = sign_checkpoint(link, instant(now), self._signer).to_json()
                    cps, cpt = link.seq, score
                args: list[str | int | bytes] = [str(seq), stored_hash, seq_member(link.seq),
                                                 dumps(stored, canonical=True), score, link.hash, checkpoint, link.seq]
                pipe.evalsha(self._append.sha, len(waiting.keys), *waiting.keys, *args)
                sealed.append((stored, link, cps, cpt))
                seq, hash_, stored_hash = link.seq, link.hash, link.hash
            answers = await pipe.execute(raise_on_error=False)
            for n, answer in enumerate(answers):
                if isinstance(answer, NoScriptError):  # a restarted or flushed Redis: load it, send the rest again
                    await self._redis.script_load(scripts.APPEND)
                    break
                if isinstance(answer, Exception):
                    raise answer
                status = as_text(answer)
                if status == "stale":  # another process moved the chain end: the rest chained on ours, stale too
                    break
                if status != "ok":
                    error = AuditUnavailable(f"the audit log already holds event {sealed[n][1].seq}: its chain end "
                                             "is damaged")
                    self._known = None
                    _fail(pending[n:], error)
                    return
                stored, link, after_cps, after_cpt = sealed[n]
                self._known = ChainHead(link.seq, link.hash, link.hash, after_cps, after_cpt, head.floor)
                if not pending[n].future.done():
                    pending[n].future.set_result(stored)
            else:
                return
            self._known = None
            pending = pending[n:]
            if attempt >= 3:  # a crowd of writers: spread them out a little
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
        _fail(pending, AuditUnavailable("the audit log is contended by too many writers; the exchange is refused"))

    async def checkpoint(self) -> Checkpoint | None:
        """Sign the chain's end now unless a checkpoint already covers it. Appends checkpoint as they go; call
        this on a timer and at shutdown so that the last events of a quiet period are signed too."""
        head = await self._head()
        if head.seq == 0 or head.seq <= head.cps:
            return None
        now = self._clock()
        checkpoint = sign_checkpoint(ChainLink(head.seq, head.hash), instant(now), self._signer)
        args: list[str | int] = [seq_member(head.seq), checkpoint.to_json(), head.seq, ms(now)]
        await self._write_checkpoint(keys=[self._head_key, self._cps], args=args)
        return checkpoint

    async def search(
        self,
        *,
        date_ge: datetime | None = None,
        date_lt: datetime | None = None,
        patient: str | Sequence[str] | None = None,
        agent: str | Sequence[str] | None = None,
        subtype: str | Sequence[str] | None = None,
        outcome: str | Sequence[str] | None = None,
        entity: str | Sequence[str] | None = None,
        count: int = 50,
        offset: int = 0,
    ) -> tuple[list[Resource], int]:
        """Stored events matching every given filter (AND) with any of its values (OR), newest first, and the
        total. ``patient`` is an identifier token ``system|value``; ``agent`` a client id; ``subtype`` a
        ``system|code`` or bare code; ``outcome`` 0/4/8/12; ``entity`` a reference (``Task/1``). Dates bound
        ``recorded``: ``date_ge`` ≤ recorded < ``date_lt``. Cost grows with the smallest candidate set (the
        date window or one filter's events), so the API should bound a search by date or by a selective filter.
        """
        if count < 0 or offset < 0:
            raise InvalidInput("count and offset must not be negative")
        keys, sizes = [self._time, self._events], []
        filters = {"patient": patient, "agent": agent, "subtype": subtype, "outcome": outcome, "entity": entity}
        for param, given in filters.items():
            if given is None:
                continue
            values = list(dict.fromkeys([given] if isinstance(given, str) else given))
            if not values:
                return [], 0
            keys += [self._index_key(param, value) for value in values]
            sizes.append(len(values))
        low = ms_ceil(date_ge) if date_ge else -(2**53)
        high = ms_ceil(date_lt) - 1 if date_lt else 2**53
        if low > high:
            return [], 0
        try:
            out = await self._search(keys=keys, args=[low, high, offset, count, len(sizes), *sizes])
        except (RedisError, OSError) as exc:
            raise AuditUnavailable(f"the audit log cannot be read ({type(exc).__name__})") from exc
        return [loads(body) for body in out[1:] if body], int(out[0])

    async def verify(self) -> VerifyResult:
        """Verify the whole chain from the retention floor to its end, every checkpoint's signature and hash,
        and that nothing is stored outside the chain; report the first broken seq."""
        try:
            head = await self._head()
            start = ChainLink(0, GENESIS)
            if head.floor is not None:
                if not head.floor.verify(self._verifier):
                    return VerifyResult(False, 0, head.floor.seq, "the retention anchor's signature is invalid")
                start = ChainLink(head.floor.seq, head.floor.hash)
            checkpoints = {c.seq: c for c in await self.checkpoints() if c.seq > start.seq}
            checker = ChainVerifier(start, checkpoints, self._verifier)
            async for seq, body in self.read_range(start.seq + 1, head.seq):
                if not checker.feed(seq, body):
                    break
            result = checker.finish(ChainLink(head.seq, head.hash) if head.seq else None)
            stored = int(await self._redis.hlen(self._events))
        except (RedisError, OSError) as exc:
            raise AuditUnavailable(f"the audit log cannot be read ({type(exc).__name__})") from exc
        if result.ok and stored != head.seq - start.seq:
            return replace(result, ok=False, first_broken_seq=head.seq + 1,
                           reason=f"{stored} events are stored for a chain of {head.seq - start.seq}")  # fmt: skip
        return result

    async def export_ndjson(
        self,
        path: Path,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        manifest_path: Path | None = None,
    ) -> Manifest:
        """Write the events recorded in [``since``, ``until``) as NDJSON with a signed manifest; see
        :func:`fhir_bridge.adapters.audit_export.export_ndjson`."""
        return await export_ndjson(self, path, signer=self._signer, verifier=self._verifier, created=self._clock(),
                                   since=since, until=until, manifest_path=manifest_path)  # fmt: skip

    async def purge_before(self, when: datetime) -> int:
        """Retention: remove the oldest events, those recorded before ``when`` (a prefix of the chain: it stops
        at the first younger event), and return how many. Each batch is verified before it goes, and the last
        removed link is kept as a signed anchor so the rest of the chain still verifies from there."""
        cutoff = ms_ceil(when)
        head = await self._head()
        floor = head.floor.seq if head.floor else 0
        end = floor
        while end < head.seq:
            members = [seq_member(s) for s in range(end + 1, min(end + BATCH, head.seq) + 1)]
            scores = await self._redis.zmscore(self._time, members)
            old = next((i for i, score in enumerate(scores) if score is None or score >= cutoff), len(members))
            end += old
            if old < len(members):
                break
        if end == floor:
            return 0
        if head.floor is not None and not head.floor.verify(self._verifier):
            raise AuditIntegrityError(f"the retention anchor at {floor} has an invalid signature; nothing was purged")
        start = ChainLink(floor, head.floor.hash if head.floor else GENESIS)
        checker = ChainVerifier(start, {c.seq: c for c in await self.checkpoints() if floor < c.seq <= end},
                                self._verifier)  # fmt: skip
        for low in range(floor + 1, end + 1, BATCH):
            high = min(low + BATCH - 1, end)
            members = [seq_member(s) for s in range(low, high + 1)]
            bodies = [as_bytes(b) for b in await self._redis.hmget(self._events, members)]
            leaving: dict[str, list[str]] = {}
            for seq, body in zip(range(low, high + 1), bodies, strict=True):
                if not checker.feed(seq, body):
                    result = checker.finish()
                    raise AuditIntegrityError(f"the audit chain is broken at {result.first_broken_seq}: "
                                              f"{result.reason}; the purge stopped before it")  # fmt: skip
                for param, values in index_terms(loads(body or b"")).items():
                    for value in values:
                        leaving.setdefault(self._index_key(param, value), []).append(seq_member(seq))
            link = chain_link(loads(bodies[-1] or b""))
            assert link is not None  # the checker has just accepted it
            anchor = sign_checkpoint(link, instant(self._clock()), self._signer)
            keys = [self._head_key, self._events, self._time, self._cps, *leaving]
            args: list[str | int] = [str(low - 1), high, link.hash, anchor.to_json(),
                    json.dumps(list(leaving.values())), *members]  # fmt: skip
            if as_text(await self._purge(keys=keys, args=args)) != "ok":
                raise Conflict("another purge of the audit log is running")
        return end - floor


@dataclass(slots=True)
class _Waiting:
    """An append waiting for the group commit: the event, its keys, the caller's future."""

    event: Resource
    keys: list[str]
    future: asyncio.Future[Resource]


def _fail(waiting: list[_Waiting], error: BaseException) -> None:
    for item in waiting:
        if not item.future.done():
            item.future.set_exception(error)

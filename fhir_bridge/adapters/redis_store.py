"""Versioned FHIR resources in Redis: the :class:`~fhir_bridge.ports.ResourceStorePort` of the bridge.

It keeps (FHIR R4 http.html §3.1.0) every version (vread, history), ``meta.versionId`` (a string integer
from "1"), ``meta.lastUpdated`` (a UTC instant with milliseconds), tombstones (read answers Gone, history
keeps the versions), the token indexes the core computes, and each type's order by lastUpdated. Bodies are
:func:`fhir_bridge.fhir.resources.dumps` bytes read back with ``loads``, so a FHIR decimal ``1.50`` stays ``1.50``.

Keys (``P`` is the configurable prefix, default ``fhir-bridge:``)::

    P{Task}:r:<id>              hash: cur (current version), del ("1" once deleted), idx (JSON [[param, value]]),
                                uq (its unique key), v<n> (body of version n), t<n> (time of the deletion n)
    P{Task}:updated             zset: id scored by lastUpdated in ms since the epoch
    P{Task}:ix:<param>=<value>  set: the ids answering to that search token
    P{Task}:uq:<unique key>     string: the id created under that If-None-Exist key

Atomicity decides the hash tag. A write changes the resource, its index sets, the order and the unique key
together (a search must never see half a write), so every write is one Lua script over keys of one slot:
the tag is the resource *type*. Tagging ``{Task/123}`` would spread a type over a Cluster, but each write
would then span slots and need per-key steps plus repair at search time; the per-type tag stays valid on a
Cluster (a type per shard) at no cost today.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from fhir_bridge.adapters.lua_search import SELECT_PAGE
from fhir_bridge.errors import Conflict, Gone, InvalidInput, NotFound, PreconditionFailed
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource, dumps, loads
from fhir_bridge.ports import SearchPage

_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 datatypes "id"
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NO_LOWER, _NO_UPPER = -(2**53), 2**53  # scores are exact integers in a double up to 2^53
_WRITE_ATTEMPTS = 20  # compare-and-set rounds lost to other writers before giving up with a Conflict

# KEYS: resource, updated zset, unique key (the resource key again when there is none), index sets.
# ARGV: id, body, score, index JSON, '1' when there is a unique key, resource key prefix.
_CREATE = """
if ARGV[5] == '1' then
  local other = redis.call('GET', KEYS[3])
  local key = other and ARGV[6] .. other
  local cur = key and redis.call('HGET', key, 'cur')
  if cur and redis.call('HGET', key, 'del') ~= '1' then return {'exists', redis.call('HGET', key, 'v' .. cur)} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'conflict'} end
redis.call('HSET', KEYS[1], 'cur', '1', 'v1', ARGV[2], 'idx', ARGV[4], 'del', '0')
if ARGV[5] == '1' then
  redis.call('SET', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'uq', KEYS[3])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
for i = 4, #KEYS do redis.call('SADD', KEYS[i], ARGV[1]) end
return {'created'}
"""

# A new version v<n>, or a deletion t<n> (a tombstone: out of the ordering, its unique key released).
# KEYS: resource, updated zset, index sets to add (ARGV[8] of them), then index sets to leave.
# ARGV: expected version, new version, field letter (v or t), its value, score or '', index JSON, id, adds.
_WRITE = """
local cur = redis.call('HGET', KEYS[1], 'cur')
if not cur then return 'missing' end
if redis.call('HGET', KEYS[1], 'del') == '1' then return 'gone' end
if cur ~= ARGV[1] then return 'stale' end
local deleting = ARGV[3] == 't'
redis.call('HSET', KEYS[1], 'cur', ARGV[2], ARGV[3] .. ARGV[2], ARGV[4], 'idx', ARGV[6], 'del', deleting and '1' or '0')
if not deleting then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[7])
else
  redis.call('ZREM', KEYS[2], ARGV[7])
  local uq = redis.call('HGET', KEYS[1], 'uq')
  if uq and redis.call('GET', uq) == ARGV[7] then redis.call('DEL', uq) end
end
local adds = tonumber(ARGV[8])
for i = 3, 2 + adds do redis.call('SADD', KEYS[i], ARGV[7]) end
for i = 3 + adds, #KEYS do redis.call('SREM', KEYS[i], ARGV[7]) end
return 'ok'
"""

# KEYS: updated zset, then each parameter's index sets. ARGV: lowest and highest score, offset, count, resource
# key prefix, number of parameters, then each one's number of sets. Read-only: the total, then the page's bodies.
_SEARCH = SELECT_PAGE + """
local prefix, sizes = ARGV[5], {}
for p = 1, tonumber(ARGV[6]) do sizes[p] = tonumber(ARGV[6 + p]) end
local total, ids = select_page(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                               tonumber(ARGV[4]), 2, sizes)
local out = {total}
for _, id in ipairs(ids) do
  local key = prefix .. id
  out[#out + 1] = redis.call('HGET', key, 'v' .. redis.call('HGET', key, 'cur'))
end
return out
"""


class RedisResourceStore:
    """FHIR resources in Redis, versioned and indexed; see the module docstring for the key layout.

    ``clock`` gives the time stamped into ``meta.lastUpdated`` (pass ``clock.now`` for a
    :class:`~fhir_bridge.ports.Clock`); ``new_id`` the id of a resource created without one.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "fhir-bridge:",
        clock: Callable[[], datetime] | None = None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces: they would change the Cluster hash tag")
        self._redis = redis
        self._prefix = prefix
        self._clock = clock or (lambda: datetime.now(UTC))
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._create = redis.register_script(_CREATE)
        self._write = redis.register_script(_WRITE)
        self._search = redis.register_script(_SEARCH)

    async def create(
        self, resource: Resource, *, index: Mapping[str, list[str]], unique_key: str | None = None
    ) -> tuple[Resource, bool]:
        """Store version "1" (FHIR create, http.html §3.1.0.8), or with ``unique_key`` return the resource
        already created under it and ``False`` (conditional create, If-None-Exist); atomic either way. A given
        id is kept (the core chooses some); one already used, even by a deleted resource, is a Conflict.
        """
        rtype = _resource_type(resource)
        rid = _check_id(resource.get("id") or self._new_id())
        body, score = self._stamp(resource, rid, 1)
        pairs = _index_pairs(index)
        res_key = self._key(rtype, "r", rid)
        unique = self._key(rtype, "uq", unique_key) if unique_key is not None else res_key
        keys = [res_key, self._key(rtype, "updated"), unique, *(self._index_key(rtype, p) for p in pairs)]
        has_unique = "1" if unique_key is not None else "0"
        args: list[str | bytes | int] = [rid, body, score, json.dumps(pairs), has_unique, self._key(rtype, "r", "")]
        outcome = await self._create(keys=keys, args=args)
        status = _text(outcome[0])
        if status == "exists":
            return _load(outcome[1]), False
        if status == "conflict":
            raise Conflict(f"{rtype}/{rid} already exists")
        return _load(body), True

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """The current version (FHIR read, http.html §3.1.0.2); NotFound when unknown, Gone when deleted."""
        key = self._resource_key(resource_type, resource_id)
        cur, _ = await self._current(resource_type, resource_id)
        return _load(await self._redis.hget(key, f"v{cur}"))  # versions never change: no race with a writer

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> Resource:
        """One version (FHIR vread, http.html §3.1.0.3); Gone for the version that recorded the deletion."""
        key = self._resource_key(resource_type, resource_id)
        cur, body, deleted_at = await self._redis.hmget(key, ["cur", f"v{version_id}", f"t{version_id}"])
        if cur is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        if body is not None:
            return _load(body)
        if deleted_at is not None:
            raise Gone(f"version {version_id} of {resource_type}/{resource_id} is its deletion")
        raise NotFound(f"{resource_type}/{resource_id} has no version {version_id}")

    async def history(self, resource_type: str, resource_id: str) -> list[Resource]:
        """Every version with a body, newest first (FHIR history, http.html §3.1.0.12), even once deleted."""
        key = self._resource_key(resource_type, resource_id)
        cur = await self._redis.hget(key, "cur")
        if cur is None:
            raise NotFound(f"{resource_type}/{resource_id} is not known")
        bodies = await self._redis.hmget(key, [f"v{n}" for n in range(int(cur), 0, -1)])
        return [_load(body) for body in bodies if body is not None]

    async def update(
        self, resource: Resource, *, index: Mapping[str, list[str]], if_match: str | None = None
    ) -> Resource:
        """Store a new version (FHIR update, http.html §3.1.0.4) and replace the resource's index entries.

        ``if_match`` is the versionId the caller last saw (the API strips ``W/"..."``): any other current
        version is :class:`PreconditionFailed` (http.html §3.1.0.5 managing contention). No update-as-create:
        an unknown id is :class:`NotFound`, a deleted one :class:`Gone`.
        """
        rtype = _resource_type(resource)
        rid = _check_id(resource.get("id"))  # an update names its resource: no id is as bad as a malformed one
        pairs = _index_pairs(index)
        return _load(await self._new_version(rtype, rid, pairs, if_match, lambda v: self._stamp(resource, rid, v)))

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """Delete (FHIR delete, http.html §3.1.0.7): a tombstone version, out of every index and search.

        Read then answers Gone, history still lists the versions, and the resource's unique key (its
        If-None-Exist key) is released so a new conditional create can succeed. Deleting twice is a no-op.
        """
        self._resource_key(resource_type, resource_id)
        with contextlib.suppress(Gone):
            await self._new_version(resource_type, resource_id, [], None, lambda _: (_instant(self._clock())[0], None))

    async def _new_version(
        self,
        rtype: str,
        rid: str,
        pairs: list[tuple[str, str]],
        if_match: str | None,
        content: Callable[[int], tuple[str | bytes, int | None]],
    ) -> str | bytes:
        """Compare-and-set the next version, built before the write since the body holds its versionId:
        ``content(version)`` gives a body and score, or a deletion time and no score. A lost race is retried
        unless ``if_match`` pinned the version: then it is :class:`PreconditionFailed`."""
        for _ in range(_WRITE_ATTEMPTS):
            cur, old_pairs = await self._current(rtype, rid)
            if if_match is not None and if_match != cur:
                raise PreconditionFailed(f"{rtype}/{rid} is at version {cur}, not {if_match}")
            version = int(cur) + 1
            value, score = content(version)
            adds = [p for p in pairs if p not in old_pairs]
            leaves = [p for p in old_pairs if p not in pairs]
            keys = [self._key(rtype, "r", rid), self._key(rtype, "updated")]
            keys += [self._index_key(rtype, p) for p in [*adds, *leaves]]
            field, ordering = ("v", score) if score is not None else ("t", "")
            args: list[str | bytes | int] = [cur, version, field, value, ordering, json.dumps(pairs), rid, len(adds)]
            status = _text(await self._write(keys=keys, args=args))
            if status == "ok":
                return value
            if status == "missing":
                raise NotFound(f"{rtype}/{rid} is not known")
            if status == "gone":
                raise Gone(f"{rtype}/{rid} has been deleted")
            if if_match is not None:
                raise PreconditionFailed(f"{rtype}/{rid} changed while it was being updated")
        raise Conflict(f"{rtype}/{rid} is being updated by too many writers at once; try again")

    async def search(
        self, resource_type: str, criteria: Mapping[str, list[str]], *, count: int, offset: int = 0
    ) -> SearchPage:
        """Resources matching every parameter (AND) with any of its values (OR), newest first; a parameter
        with no values matches nothing. ``_lastUpdated`` (prefixes eq, gt, ge, lt, le) uses the ordering, and
        its values are ANDed: the only useful combination of date bounds is a window (ge…&lt…).
        """
        _check_type(resource_type)
        if count < 0 or offset < 0:
            raise InvalidInput("count and offset must not be negative")
        low, high = _NO_LOWER, _NO_UPPER
        keys = [self._key(resource_type, "updated")]
        sizes: list[int] = []
        for param, values in criteria.items():
            if not values:
                return SearchPage(resources=[], total=0)
            if param == "_lastUpdated":
                for value in values:
                    lo, hi = _last_updated_bounds(value)
                    low, high = max(low, lo), min(high, hi)
                continue
            distinct = list(dict.fromkeys(values))
            keys += [self._index_key(resource_type, (param, v)) for v in distinct]
            sizes.append(len(distinct))
        if low > high:
            return SearchPage(resources=[], total=0)
        args: list[str | int] = [low, high, offset, count, self._key(resource_type, "r", ""), len(sizes), *sizes]
        outcome = await self._search(keys=keys, args=args)
        return SearchPage(resources=[_load(body) for body in outcome[1:]], total=int(outcome[0]))

    async def _current(self, rtype: str, rid: str) -> tuple[str, list[tuple[str, str]]]:
        cur, deleted, idx = await self._redis.hmget(self._key(rtype, "r", rid), ["cur", "del", "idx"])
        if cur is None:
            raise NotFound(f"{rtype}/{rid} is not known")
        if _text(deleted) == "1":
            raise Gone(f"{rtype}/{rid} has been deleted")
        return _text(cur), [(str(p), str(v)) for p, v in json.loads(idx or "[]")]

    def _stamp(self, resource: Resource, rid: str, version: int) -> tuple[bytes, int]:
        """The body to store, with id and meta set, and its ordering score (lastUpdated in ms)."""
        when, score = _instant(self._clock())
        meta = resource.get("meta") or {}
        if not isinstance(meta, dict):
            raise InvalidInput("meta must be an object", expression=["meta"])
        stored = {"resourceType": resource["resourceType"], "id": rid}
        stored["meta"] = {**meta, "versionId": str(version), "lastUpdated": when}
        stored.update((k, v) for k, v in resource.items() if k not in stored)
        return dumps(stored), score

    def _resource_key(self, rtype: str, rid: str) -> str:
        _check_type(rtype)
        if not _ID.fullmatch(rid):
            raise NotFound(f"{rtype}/{rid} is not known")  # not even a valid id: certainly not stored
        return self._key(rtype, "r", rid)

    def _index_key(self, rtype: str, pair: tuple[str, str]) -> str:
        return self._key(rtype, "ix", f"{pair[0]}={pair[1]}")

    def _key(self, rtype: str, kind: str, rest: str | None = None) -> str:
        return f"{self._prefix}{{{rtype}}}:{kind}" + ("" if rest is None else f":{rest}")


def _resource_type(resource: Resource) -> str:
    rtype = resource.get("resourceType") if isinstance(resource, dict) else None
    _check_type(rtype)
    return str(rtype)


def _check_type(rtype: Any) -> None:
    if not isinstance(rtype, str) or not _TYPE.fullmatch(rtype):
        raise InvalidInput(f"{rtype!r} is not a resource type name", expression=["resourceType"])


def _check_id(rid: Any) -> str:
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise InvalidInput("id must be 1 to 64 letters, digits, '-' or '.' (FHIR id)", expression=["id"])
    return rid


def _index_pairs(index: Mapping[str, list[str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((param, value) for param, values in index.items() for value in values))


def _load(body: bytes | str | None) -> Resource:
    if body is None:
        raise NotFound("no such version")
    resource: Resource = loads(body)
    return resource


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _instant(when: datetime) -> tuple[str, int]:
    """A FHIR instant in UTC with milliseconds, and the same moment in ms since the epoch."""
    when = (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC)
    return instant(when), _micros(when) // 1000


_DATE = re.compile(
    r"(eq|gt|ge|lt|le)?(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def _last_updated_bounds(value: str) -> tuple[int, int]:
    """Inclusive bounds in ms since the epoch for one ``_lastUpdated`` value (search.html §3.1.1.4.6): a value
    is the whole range of its precision (``2026-01`` is January), in UTC when it has no zone (server's choice)."""
    match = _DATE.fullmatch(value)
    try:
        if match is None:
            raise ValueError(value)
        prefix, year, month, day, hour, minute, second, fraction, zone = match.groups()
        tz = UTC if zone in (None, "Z") else datetime.strptime(zone.replace(":", ""), "%z").tzinfo
        start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         int(second or 0), int((fraction or "0").ljust(6, "0")[:6]), tzinfo=tz)  # fmt: skip
    except ValueError:
        raise InvalidInput(f"_lastUpdated {value!r} is not a valid date", expression=["_lastUpdated"]) from None
    if not month:
        end = start.replace(year=start.year + 1)
    elif not day:
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    elif fraction:
        end = start + timedelta(microseconds=10 ** max(0, 6 - len(fraction)))
    else:
        end = start + (timedelta(seconds=1) if second else timedelta(minutes=1) if minute else timedelta(days=1))
    lo, hi = math.ceil(_micros(start) / 1000), math.ceil(_micros(end) / 1000) - 1  # [start, end) in whole ms
    bounds = {"eq": (lo, hi), "ge": (lo, _NO_UPPER), "gt": (hi + 1, _NO_UPPER), "le": (_NO_LOWER, hi)}
    return {**bounds, "lt": (_NO_LOWER, lo - 1)}[prefix or "eq"]


def _micros(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)

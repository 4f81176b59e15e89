"""The Redis resource store against a real redis-server: versions, history, tombstones, indexes, search."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from fhir_bridge.adapters.redis_store import RedisResourceStore
from fhir_bridge.errors import Conflict, Gone, InvalidInput, NotFound, PreconditionFailed
from fhir_bridge.ports import ResourceStorePort

T0 = datetime(2026, 11, 21, 23, 59, 1, 123456, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand, so lastUpdated and the ordering are known in advance."""

    def __init__(self, now: datetime = T0) -> None:
        self.current = now

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        self.current += timedelta(**delta)
        return self.current


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=[None, 3], ids=["default-replies", "resp3-replies"])
async def store(
    redis_client: Redis, redis_url: str, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[RedisResourceStore]:
    """A store on the flushed test database, through a client with redis-py's default replies and with
    ``protocol=3`` replies."""
    client = Redis.from_url(redis_url, protocol=request.param)
    yield RedisResourceStore(client, clock=clock)
    await client.aclose()


def task(status: str = "requested", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Task", "status": status, "intent": "order", **extra}


def test_redis_resource_store_implements_the_port(redis_client: Redis) -> None:
    port: ResourceStorePort = RedisResourceStore(redis_client)
    assert port is not None


async def test_create_assigns_an_id_version_1_and_a_millisecond_utc_instant(store: RedisResourceStore) -> None:
    created, was_created = await store.create(task(), index={"status": ["requested"]})
    assert was_created
    assert created["meta"] == {"versionId": "1", "lastUpdated": "2026-11-21T23:59:01.123Z"}
    assert len(created["id"]) <= 64
    assert created == {**task(), "id": created["id"], "meta": created["meta"]}
    assert await store.read("Task", created["id"]) == created


async def test_stored_resources_come_back_exactly_with_decimals_and_existing_meta(store: RedisResourceStore) -> None:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "weight-1",
        "meta": {"profile": ["https://example.org/StructureDefinition/w"], "versionId": "99"},
        "status": "final",
        "valueQuantity": {"value": Decimal("71.50"), "unit": "kg"},
        "note": [{"text": "précision conservée"}],
    }
    created, _ = await store.create(observation, index={})
    assert created["meta"] == {
        "profile": ["https://example.org/StructureDefinition/w"],
        "versionId": "1",
        "lastUpdated": "2026-11-21T23:59:01.123Z",
    }
    read = await store.read("Observation", "weight-1")
    assert read == created
    assert str(read["valueQuantity"]["value"]) == "71.50"
    assert observation["meta"]["versionId"] == "99", "the caller's dict is not modified"


async def test_last_updated_is_converted_to_utc(redis_client: Redis) -> None:
    paris = timezone(timedelta(hours=1))
    store = RedisResourceStore(redis_client, clock=lambda: datetime(2026, 1, 2, 0, 30, 0, 5000, tzinfo=paris))
    created, _ = await store.create(task(), index={})
    assert created["meta"]["lastUpdated"] == "2026-01-01T23:30:00.005Z"


async def test_a_given_id_is_kept_and_cannot_be_created_twice(store: RedisResourceStore) -> None:
    created, _ = await store.create(task(id="case-1.a"), index={})
    assert created["id"] == "case-1.a"
    with pytest.raises(Conflict):
        await store.create(task(id="case-1.a"), index={})


@pytest.mark.parametrize("bad_id", ["", "a/b", "x" * 65, "é", "a b"])
async def test_ids_outside_the_fhir_id_syntax_are_refused(store: RedisResourceStore, bad_id: str) -> None:
    with pytest.raises(InvalidInput):
        await store.create(task(id=bad_id) if bad_id else {**task(), "id": 5}, index={})


async def test_conditional_create_returns_the_existing_resource(store: RedisResourceStore) -> None:
    first, created = await store.create(task(), index={}, unique_key="ServiceRequest|urn:x|42")
    again, created_again = await store.create(task(status="draft"), index={}, unique_key="ServiceRequest|urn:x|42")
    assert created and not created_again
    assert again == first
    assert (await store.search("Task", {}, count=10)).total == 1


async def test_concurrent_conditional_creates_store_exactly_one(store: RedisResourceStore) -> None:
    results = await asyncio.gather(
        *(store.create(task(), index={"status": ["requested"]}, unique_key="same") for _ in range(20))
    )
    assert sum(created for _, created in results) == 1
    assert len({resource["id"] for resource, _ in results}) == 1
    assert (await store.search("Task", {"status": ["requested"]}, count=50)).total == 1


async def test_update_keeps_every_version_and_history_is_newest_first(store: RedisResourceStore, clock: Clock) -> None:
    v1, _ = await store.create(task(), index={})
    clock.advance(seconds=1)
    v2 = await store.update({**v1, "status": "in-progress"}, index={})
    clock.advance(seconds=1)
    v3 = await store.update({**v2, "status": "completed"}, index={}, if_match="2")
    assert [v["meta"]["versionId"] for v in (v1, v2, v3)] == ["1", "2", "3"]
    assert v3["meta"]["lastUpdated"] == "2026-11-21T23:59:03.123Z"
    assert await store.history("Task", v1["id"]) == [v3, v2, v1]
    assert await store.vread("Task", v1["id"], "2") == v2
    assert await store.read("Task", v1["id"]) == v3
    with pytest.raises(NotFound):
        await store.vread("Task", v1["id"], "4")
    with pytest.raises(NotFound):
        await store.vread("Task", v1["id"], "two")


async def test_update_with_a_stale_if_match_is_a_failed_precondition(store: RedisResourceStore) -> None:
    v1, _ = await store.create(task(), index={})
    await store.update(v1, index={})
    with pytest.raises(PreconditionFailed):
        await store.update(v1, index={}, if_match="1")
    assert (await store.read("Task", v1["id"]))["meta"]["versionId"] == "2"


async def test_update_of_an_unknown_resource_is_not_found(store: RedisResourceStore) -> None:
    with pytest.raises(NotFound):
        await store.update(task(id="nobody"), index={})
    with pytest.raises(InvalidInput):
        await store.update(task(), index={})


async def test_concurrent_updates_each_get_their_own_version(store: RedisResourceStore) -> None:
    v1, _ = await store.create(task(), index={})
    updated = await asyncio.gather(*(store.update({**v1, "priority": f"p{i}"}, index={}) for i in range(15)))
    assert sorted(int(r["meta"]["versionId"]) for r in updated) == list(range(2, 17))
    assert len(await store.history("Task", v1["id"])) == 16


async def test_concurrent_updates_with_the_same_if_match_let_exactly_one_win(store: RedisResourceStore) -> None:
    v1, _ = await store.create(task(), index={})
    results = await asyncio.gather(
        *(store.update(v1, index={}, if_match="1") for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, dict) for r in results) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if not isinstance(r, dict))


async def test_update_replaces_the_index_entries(store: RedisResourceStore) -> None:
    v1, _ = await store.create(task(), index={"status": ["requested"], "owner": ["Practitioner/a"]})
    await store.update({**v1, "status": "accepted"}, index={"status": ["accepted"], "owner": ["Practitioner/a"]})
    assert (await store.search("Task", {"status": ["requested"]}, count=10)).total == 0
    found = await store.search("Task", {"status": ["accepted"], "owner": ["Practitioner/a"]}, count=10)
    assert [r["status"] for r in found.resources] == ["accepted"]


async def test_a_deleted_resource_is_gone_but_its_history_remains(store: RedisResourceStore) -> None:
    v1, _ = await store.create(task(), index={"status": ["requested"]}, unique_key="k")
    v2 = await store.update(v1, index={"status": ["requested"]})
    await store.delete("Task", v1["id"])
    await store.delete("Task", v1["id"])  # deleting twice is harmless
    with pytest.raises(Gone):
        await store.read("Task", v1["id"])
    with pytest.raises(Gone):
        await store.vread("Task", v1["id"], "3")
    with pytest.raises(Gone):
        await store.update(v2, index={})
    assert await store.vread("Task", v1["id"], "1") == v1
    assert await store.history("Task", v1["id"]) == [v2, v1]
    assert (await store.search("Task", {"status": ["requested"]}, count=10)).total == 0
    assert (await store.search("Task", {}, count=10)).total == 0
    with pytest.raises(Conflict):
        await store.create(task(id=v1["id"]), index={})
    _, created = await store.create(task(), index={}, unique_key="k")
    assert created, "the deleted resource's If-None-Exist key is free again"


async def test_unknown_resources_are_not_found(store: RedisResourceStore) -> None:
    for call in (
        store.read("Task", "missing"),
        store.read("Task", "../../etc"),
        store.vread("Task", "missing", "1"),
        store.history("Task", "missing"),
        store.delete("Task", "missing"),
    ):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(InvalidInput):
        await store.read("task}:x", "1")


async def test_search_ands_parameters_ors_values_and_pages_newest_first(
    store: RedisResourceStore, clock: Clock
) -> None:
    ids = []
    for i, (status, owner) in enumerate(
        [("requested", "a"), ("accepted", "a"), ("requested", "b"), ("rejected", "a"), ("requested", "a")]
    ):
        clock.advance(seconds=1)
        created, _ = await store.create(task(status, id=f"t{i}"), index={"status": [status], "owner": [owner]})
        ids.append(created["id"])

    async def found(criteria: dict[str, list[str]], count: int = 10, offset: int = 0) -> tuple[list[str], int]:
        page = await store.search("Task", criteria, count=count, offset=offset)
        return [r["id"] for r in page.resources], page.total

    assert await found({}) == (["t4", "t3", "t2", "t1", "t0"], 5)
    assert await found({"status": ["requested"]}) == (["t4", "t2", "t0"], 3)
    assert await found({"status": ["requested", "accepted"], "owner": ["a"]}) == (["t4", "t1", "t0"], 3)
    assert await found({"status": ["requested"], "owner": ["a"]}, count=1, offset=1) == (["t0"], 2)
    assert await found({}, count=2, offset=2) == (["t2", "t1"], 5)
    assert await found({"status": ["requested"]}, count=0) == ([], 3)
    assert await found({"status": ["requested"]}, offset=10) == ([], 3)
    assert await found({"status": ["cancelled"]}) == ([], 0)
    assert await found({"unknown-param": ["x"]}) == ([], 0)
    assert await found({"status": []}) == ([], 0)
    assert await found({}, count=0) == ([], 5)
    with pytest.raises(InvalidInput):
        await store.search("Task", {}, count=-1)


async def test_search_by_last_updated_prefixes_and_precision(store: RedisResourceStore, clock: Clock) -> None:
    stamps = {}
    for rid, when in [
        ("dec31", datetime(2025, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
        ("jan1", datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)),
        ("jan1-noon", datetime(2026, 1, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("feb", datetime(2026, 2, 14, 8, 0, tzinfo=UTC)),
    ]:
        clock.current = when
        stamps[rid] = (await store.create(task(id=rid), index={"status": ["requested"]}))[0]["meta"]["lastUpdated"]

    async def found(*values: str, **extra: list[str]) -> list[str]:
        page = await store.search("Task", {"_lastUpdated": list(values), **extra}, count=10)
        return [r["id"] for r in page.resources]

    assert await found("ge2026-01-01T00:00:00Z") == ["feb", "jan1-noon", "jan1"]
    assert await found("gt2026-01-01T00:00:00Z") == ["feb", "jan1-noon"]
    assert await found("lt2026-01-01T00:00:00Z") == ["dec31"]
    assert await found("le2026-01-01T00:00:00Z") == ["jan1", "dec31"]
    assert await found("2026-01-01") == ["jan1-noon", "jan1"]
    assert await found("eq2026-01") == ["jan1-noon", "jan1"]
    assert await found("2026") == ["feb", "jan1-noon", "jan1"]
    assert await found("gt2026-01-01") == ["feb"]
    assert await found("le2025") == ["dec31"]
    assert await found(stamps["jan1-noon"]) == ["jan1-noon"]
    assert await found("2026-01-01T13:00:00.500+01:00") == ["jan1-noon"]
    assert await found("ge2026-01-01", "lt2026-02-01") == ["jan1-noon", "jan1"], "a window: values are ANDed"
    assert await found("ge2026-02-01", "lt2026-01-01") == []
    assert await found("ge2026-01-01", status=["requested"]) == ["feb", "jan1-noon", "jan1"]
    assert await found("ge2026-01-01T12:00", status=["requested"]) == ["feb", "jan1-noon"]
    for bad in ("yesterday", "ne2026-01-01", "2026-13-01", "2026-02-30", "2026-01-01T25:00:00Z"):
        with pytest.raises(InvalidInput):
            await found(bad)


async def test_keys_carry_the_prefix_and_one_hash_tag_per_resource_type(redis_client: Redis, clock: Clock) -> None:
    store = RedisResourceStore(redis_client, prefix="fb:", clock=clock)
    await store.create(task(id="t1"), index={"status": ["requested"]}, unique_key="sr|1")
    await store.create({"resourceType": "DiagnosticReport", "id": "r1", "status": "final"}, index={})
    keys = sorted(_text(k) for k in await redis_client.keys("*"))
    assert keys == [
        "fb:{DiagnosticReport}:r:r1",
        "fb:{DiagnosticReport}:updated",
        "fb:{Task}:ix:status=requested",
        "fb:{Task}:r:t1",
        "fb:{Task}:updated",
        "fb:{Task}:uq:sr|1",
    ]
    assert len({key_slot(k.encode()) for k in keys if k.startswith("fb:{Task}")}) == 1
    with pytest.raises(ValueError, match="braces"):
        RedisResourceStore(redis_client, prefix="fb:{x}:")


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key

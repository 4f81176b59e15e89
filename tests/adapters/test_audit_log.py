"""The audit log against a real redis-server: one chain, tamper found at the right seq, search, export, retention,
concurrent writers, fail-closed appends, and no acknowledged event lost when Redis is SIGKILLed.

``redis_client``/``redis_url`` come from ``tests/redis_fixture.py`` through this folder's conftest."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.signing import Es384Signer, JwsVerifier
from fhir_bridge.audit.chain import AuditIntegrityError, Checkpoint, chain_link, verify_export
from fhir_bridge.audit.events import AuditUnavailable, Party, rest_event, source_event
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.fhir.resources import dumps, validate

T0 = datetime(2026, 5, 4, 8, 0, 0, tzinfo=UTC)
EV, HEAD, CP = "fhir-bridge:{audit}:ev", "fhir-bridge:{audit}:head", "fhir-bridge:{audit}:cp"
PATIENTS = [PatientIdentifier(INS_NIR_TEST, "295109912611193"), PatientIdentifier(INS_NIR_TEST, "253072B07300470")]
BRIDGE = Party("https://bridge.test/fhir", address="https://bridge.test/fhir")
SOURCE = Party("https://source.test/fhir", address="https://source.test/fhir")


class Clock:
    """A clock the test moves by hand, so ``recorded`` and the date filters are known in advance."""

    def __init__(self) -> None:
        self.current = T0

    def __call__(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        self.current += timedelta(**delta)


@pytest.fixture(scope="module")
def signer() -> Es384Signer:
    return Es384Signer.generate()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=[None, 3], ids=["default-replies", "resp3-replies"])
async def log(
    redis_client: Redis, redis_url: str, signer: Es384Signer, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[RedisAuditLog]:
    """A log on the flushed test database, through redis-py's default replies and through RESP3 replies."""
    client = Redis.from_url(redis_url, protocol=request.param)
    yield RedisAuditLog(client, signer=signer, clock=clock, checkpoint_every=100, checkpoint_seconds=3600)
    await client.aclose()


def read(n: int, *, client: str = "platform-a", patient: int | None = 0, status: int = 200) -> dict[str, Any]:
    return rest_event(interaction="read", resource_type="Task", resource_id=f"t{n}", status=status,
                      client=Party(client, jti=f"jti-{n}", address="10.0.0.7"), bridge=BRIDGE,
                      patient=PATIENTS[patient] if patient is not None else None, request_id=f"req-{n}")  # fmt: skip


async def fill(log: RedisAuditLog, n: int) -> list[dict[str, Any]]:
    return [await log.append(read(i)) for i in range(1, n + 1)]


async def test_a_thousand_appends_make_one_valid_checkpointed_chain(log: RedisAuditLog, redis_client: Redis) -> None:
    stored = await fill(log, 1000)
    assert [e["id"] for e in stored] == [str(i) for i in range(1, 1001)]
    validate(stored[-1])
    result = await log.verify()
    assert result.ok, result.reason
    assert result.count == 1000 and result.head is not None and result.head.hash == chain_link(stored[-1]).hash  # type: ignore[union-attr]
    assert [c.seq for c in await log.checkpoints()] == [1, *range(101, 1001, 100)]
    state = await log.state()
    assert (state.seq, state.checkpoint_seq, state.floor) == (1000, 901, None)
    assert await redis_client.hget(EV, "000000000000017") == dumps(stored[16], canonical=True)


async def test_the_log_records_the_time_by_its_own_clock(log: RedisAuditLog, clock: Clock) -> None:
    clock.advance(milliseconds=1234.5)
    stored = await log.append({**read(1), "recorded": "1999-01-01T00:00:00Z", "id": "mine"})
    assert (stored["recorded"], stored["id"]) == ("2026-05-04T08:00:01.234Z", "1")


@pytest.mark.parametrize("seq", [1, 37, 120])
async def test_a_changed_stored_event_is_reported_at_its_seq(log: RedisAuditLog, redis_client: Redis, seq: int) -> None:
    await fill(log, 120)
    member = f"{seq:015d}"
    event = json.loads(await redis_client.hget(EV, member))  # type: ignore[arg-type]
    event["outcome"] = "4"
    await redis_client.hset(EV, member, dumps(event, canonical=True))
    result = await log.verify()
    assert (result.ok, result.first_broken_seq) == (False, seq)


async def test_a_deleted_event_is_reported_where_it_was(log: RedisAuditLog, redis_client: Redis) -> None:
    await fill(log, 120)
    await redis_client.hdel(EV, f"{57:015d}")
    assert (await log.verify()).first_broken_seq == 57
    await redis_client.hdel(EV, f"{120:015d}")  # the last one too: the head still says 120
    assert (await log.verify()).first_broken_seq == 57


async def test_a_deleted_last_event_is_found_against_the_chain_end(log: RedisAuditLog, redis_client: Redis) -> None:
    await fill(log, 30)
    await redis_client.hdel(EV, f"{30:015d}")
    assert (await log.verify()).first_broken_seq == 30


async def test_two_swapped_events_are_reported_at_the_first(log: RedisAuditLog, redis_client: Redis) -> None:
    await fill(log, 120)
    a, b = f"{44:015d}", f"{91:015d}"
    body_a, body_b = await redis_client.hmget(EV, [a, b])
    await redis_client.hset(EV, mapping={a: body_b, b: body_a})  # type: ignore[dict-item]
    result = await log.verify()
    assert result.first_broken_seq == 44 and "reordered" in result.reason


async def test_an_event_slipped_in_outside_the_chain_is_found(log: RedisAuditLog, redis_client: Redis) -> None:
    await fill(log, 30)
    await redis_client.hset(EV, f"{31:015d}", b"{}")
    assert (await log.verify()).first_broken_seq == 31


async def test_a_tampered_checkpoint_signature_is_reported_at_its_seq(
    log: RedisAuditLog, redis_client: Redis, signer: Es384Signer
) -> None:
    await fill(log, 250)
    member = f"{201:015d}"
    checkpoint = Checkpoint.from_json(await redis_client.hget(CP, member))  # type: ignore[arg-type]
    forged = replace(checkpoint, signature=Es384Signer.generate().sign(checkpoint.payload()))
    await redis_client.hset(CP, member, forged.to_json())
    result = await log.verify()
    assert (result.first_broken_seq, result.reason) == (201, "checkpoint 201 has an invalid signature")


async def test_a_checkpoint_is_signed_after_the_interval_and_on_demand(log: RedisAuditLog, clock: Clock) -> None:
    await fill(log, 3)
    assert [c.seq for c in await log.checkpoints()] == [1]
    clock.advance(seconds=3600)
    await log.append(read(4))
    await log.append(read(5))
    assert [c.seq for c in await log.checkpoints()] == [1, 4]
    made = await log.checkpoint()
    assert made is not None and made.seq == 5 and await log.checkpoint() is None
    assert (await log.verify()).ok


async def test_concurrent_writers_keep_a_single_valid_chain(
    log: RedisAuditLog, redis_url: str, signer: Es384Signer, clock: Clock
) -> None:
    clients = [Redis.from_url(redis_url) for _ in range(4)]
    logs = [RedisAuditLog(c, signer=signer, clock=clock, checkpoint_every=50) for c in clients]

    async def writer(w: int) -> list[int]:
        return [int((await logs[w].append(read(w * 1000 + i, client=f"client-{w}")))["id"]) for i in range(100)]

    seqs = await asyncio.gather(*(writer(w) for w in range(4)))
    for c in clients:
        await c.aclose()
    assert sorted(s for per_writer in seqs for s in per_writer) == list(range(1, 401))
    assert all(per_writer == sorted(per_writer) for per_writer in seqs)
    result = await log.verify()
    assert result.ok and result.count == 400
    for w in range(4):
        assert (await log.search(agent=f"client-{w}", count=0))[1] == 100


async def test_concurrent_appends_in_one_process_are_group_committed_into_one_chain(
    log: RedisAuditLog, redis_client: Redis
) -> None:
    """Appends waiting together go out in one pipeline; each caller still gets its own stored event, and an
    event written by another process in between (a stale chain end) is chained after, not overwritten."""
    first = await asyncio.gather(*(log.append(read(n)) for n in range(1, 301)))
    assert sorted(int(e["id"]) for e in first) == list(range(1, 301))
    assert all(f'"Task/t{n}"'.encode() in dumps(e) for n, e in zip(range(1, 301), first, strict=True))
    other = RedisAuditLog(redis_client, signer=log._signer, checkpoint_every=100)  # another process's log
    await other.append(read(1000, client="someone-else"))
    second = await asyncio.gather(*(log.append(read(n)) for n in range(301, 351)))
    assert sorted(int(e["id"]) for e in second) == list(range(302, 352))
    result = await log.verify()
    assert result.ok and result.count == 351
    assert len(await log.checkpoints()) >= 3  # every 100 events, batch or not


async def test_a_cancelled_append_does_not_stall_the_others(log: RedisAuditLog) -> None:
    tasks = [asyncio.create_task(log.append(read(n))) for n in range(1, 41)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    done = await asyncio.gather(*tasks[1:])
    assert len(done) == 39 and (await log.verify()).ok


async def test_search_filters_by_date_patient_agent_subtype_and_outcome_with_paging(
    log: RedisAuditLog, clock: Clock
) -> None:
    made: list[dict[str, Any]] = []
    for i in range(30):  # event i+1 recorded at T0 + i minutes
        if i % 3 == 2:
            query = f"GET https://source.test/fhir/DocumentReference?patient=p{i}&status=current"
            event = source_event(transaction="ITI-67", status=200, bridge=BRIDGE, source=SOURCE,
                                 patient=PATIENTS[i % 2], query=query)  # fmt: skip
        else:
            event = read(i, client=f"client-{i % 2}", patient=i % 2, status=404 if i % 5 == 0 else 200)
        made.append(await log.append(event))
        clock.advance(minutes=1)

    def ids(events: list[dict[str, Any]]) -> list[int]:
        return [int(e["id"]) for e in events]

    def expect(keep: Any) -> list[int]:
        return [i + 1 for i in reversed(range(30)) if keep(i)]  # newest first

    everything, total = await log.search(count=100)
    assert total == 30 and ids(everything) == expect(lambda i: True)
    window, total = await log.search(date_ge=T0 + timedelta(minutes=5), date_lt=T0 + timedelta(minutes=10))
    assert (ids(window), total) == (expect(lambda i: 5 <= i < 10), 5)
    # a window smaller than every filter's set: candidates come from the window (event 11, i=10, was a 404)
    narrow, total = await log.search(date_ge=T0 + timedelta(minutes=9), date_lt=T0 + timedelta(minutes=12), outcome="0")
    assert (ids(narrow), total) == ([12, 10], 2)  # event 11 (i=10) was a 404
    by_patient, total = await log.search(patient=PATIENTS[1].token, count=100)
    assert (ids(by_patient), total) == (expect(lambda i: i % 2 == 1), 15)
    by_agent, _ = await log.search(agent="client-0", count=100)
    assert ids(by_agent) == expect(lambda i: i % 3 != 2 and i % 2 == 0)
    iti67, total = await log.search(subtype="urn:ihe:event-type-code|ITI-67", count=100)
    assert (ids(iti67), total) == (expect(lambda i: i % 3 == 2), 10)
    assert (await log.search(subtype="ITI-67", count=0))[1] == 10
    failed, _ = await log.search(outcome="4", count=100)
    assert ids(failed) == expect(lambda i: i % 3 != 2 and i % 5 == 0)
    both, total = await log.search(outcome=["0", "4"], agent="client-1", date_ge=T0 + timedelta(minutes=20))
    assert (ids(both), total) == (expect(lambda i: i >= 20 and i % 3 != 2 and i % 2 == 1), 3)
    pages = [ids((await log.search(patient=PATIENTS[0].token, count=4, offset=o))[0]) for o in range(0, 16, 4)]
    assert [s for page in pages for s in page] == expect(lambda i: i % 2 == 0)
    assert (await log.search(patient=PATIENTS[0].token, count=4, offset=4))[1] == 15
    assert await log.search(agent="nobody") == ([], 0)
    assert await log.search(agent=[]) == ([], 0)
    assert await log.search(entity="Task/t3", count=5) == ([made[3]], 1)


async def test_an_export_verifies_offline_and_a_changed_line_is_found(
    log: RedisAuditLog, clock: Clock, signer: Es384Signer, tmp_path: Path
) -> None:
    for i in range(1, 301):
        await log.append(read(i))
        clock.advance(seconds=1)
    out = tmp_path / "audit.ndjson"
    manifest = await log.export_ndjson(out, since=T0 + timedelta(seconds=50), until=T0 + timedelta(seconds=250))
    assert (manifest.first_seq, manifest.last_seq, manifest.count) == (51, 250, 200)
    assert [c.seq for c in manifest.checkpoints] == [101, 201]
    manifest_path = tmp_path / "audit.ndjson.manifest.json"
    public = JwsVerifier([json.loads(json.dumps(signer.public_jwk()))])
    result = verify_export(out, manifest_path, public)
    assert result.ok and result.count == 200, result.reason

    lines = out.read_bytes().splitlines(keepends=True)
    event = json.loads(lines[76])  # seq 127
    event["entity"][0]["what"]["identifier"]["value"] = "253072B07300470"
    out.write_bytes(b"".join([*lines[:76], dumps(event, canonical=True) + b"\n", *lines[77:]]))
    changed = verify_export(out, manifest_path, public)
    assert (changed.ok, changed.first_broken_seq) == (False, 127)

    out.write_bytes(b"".join(lines[:-1]))  # the last line dropped
    assert verify_export(out, manifest_path, public).first_broken_seq == 250
    out.write_bytes(b"".join(lines))
    data = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**data, "count": 199}))
    assert "signature" in verify_export(out, manifest_path, public).reason
    manifest_path.write_text(json.dumps(data))
    assert verify_export(out, manifest_path, JwsVerifier([Es384Signer.generate().public_jwk()])).ok is False
    assert verify_export(out, manifest_path, public).ok


async def test_an_empty_export_is_still_a_signed_statement(
    log: RedisAuditLog, signer: Es384Signer, tmp_path: Path
) -> None:
    await fill(log, 5)
    manifest = await log.export_ndjson(tmp_path / "none.ndjson", since=T0 + timedelta(days=1))
    assert (manifest.count, manifest.first_seq) == (0, None)
    result = verify_export(tmp_path / "none.ndjson", tmp_path / "none.ndjson.manifest.json", signer)
    assert result.ok and result.count == 0


async def test_a_broken_chain_is_not_exported(log: RedisAuditLog, redis_client: Redis, tmp_path: Path) -> None:
    await fill(log, 20)
    await redis_client.hdel(EV, f"{12:015d}")
    with pytest.raises(AuditIntegrityError, match="broken at 12"):
        await log.export_ndjson(tmp_path / "x.ndjson")
    assert list(tmp_path.iterdir()) == []


async def test_retention_purges_the_oldest_events_and_the_rest_still_verifies(
    log: RedisAuditLog, clock: Clock, redis_client: Redis, tmp_path: Path, signer: Es384Signer
) -> None:
    for i in range(1, 1201):  # one event per second
        await log.append(read(i, patient=i % 2))
        clock.advance(seconds=1)
    assert await log.purge_before(T0 + timedelta(seconds=700)) == 700
    result = await log.verify()
    assert result.ok and result.count == 500, result.reason
    state = await log.state()
    assert state.floor is not None and state.floor.seq == 700 and state.floor.verify(signer)
    assert await redis_client.hlen(EV) == 500
    assert min(c.seq for c in await log.checkpoints()) == 701
    assert (await log.search(patient=PATIENTS[0].token, count=0))[1] == 250
    assert (await log.search(date_lt=T0 + timedelta(seconds=700), count=0))[1] == 0
    assert await log.purge_before(T0 + timedelta(seconds=700)) == 0
    manifest = await log.export_ndjson(tmp_path / "rest.ndjson")
    assert (manifest.first_seq, manifest.count) == (701, 500)
    assert verify_export(tmp_path / "rest.ndjson", tmp_path / "rest.ndjson.manifest.json", signer).ok
    await log.append(read(9999))
    assert (await log.verify()).count == 501


async def test_retention_refuses_to_bless_a_broken_chain(log: RedisAuditLog, clock: Clock, redis_client: Redis) -> None:
    for i in range(1, 50):
        await log.append(read(i))
        clock.advance(seconds=1)
    await redis_client.hdel(EV, f"{20:015d}")
    with pytest.raises(AuditIntegrityError, match="broken at 20"):
        await log.purge_before(T0 + timedelta(seconds=40))
    state = await log.state()
    assert state.floor is None  # the batch holding the break was not removed
    assert (await log.verify()).first_broken_seq == 20


async def test_a_tampered_retention_anchor_is_reported(log: RedisAuditLog, clock: Clock, redis_client: Redis) -> None:
    for i in range(1, 20):
        await log.append(read(i))
        clock.advance(seconds=1)
    await log.purge_before(T0 + timedelta(seconds=10))
    anchor = Checkpoint.from_json(await redis_client.hget(HEAD, "fcp"))  # type: ignore[arg-type]
    await redis_client.hset(HEAD, "fcp", replace(anchor, hash="0" * 64).to_json())
    assert (await log.verify()).first_broken_seq == 10


async def test_append_fails_closed_when_redis_is_unreachable(signer: Es384Signer) -> None:
    client = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)  # discard port: nothing listens
    try:
        with pytest.raises(AuditUnavailable, match="cannot be written"):
            await RedisAuditLog(client, signer=signer).append(read(1))
    finally:
        await client.aclose()


async def test_acknowledged_events_survive_a_sigkill_of_redis(tmp_path: Path, signer: Es384Signer) -> None:
    server = EmbeddedRedis(tmp_path, appendfsync="always").start()
    client = Redis.from_url(server.url)
    log = RedisAuditLog(client, signer=signer, checkpoint_every=50)
    acknowledged: dict[int, str] = {}
    under_load = asyncio.Event()

    async def load(writer: int) -> None:
        for n in range(100_000):
            try:
                stored = await log.append(read(writer * 100_000 + n, client=f"client-{writer}"))
            except AuditUnavailable:
                return
            link = chain_link(stored)
            assert link is not None
            acknowledged[link.seq] = link.hash
            if len(acknowledged) >= 400:
                under_load.set()

    try:
        writers = [asyncio.create_task(load(w)) for w in range(4)]
        await asyncio.wait_for(under_load.wait(), timeout=60)
        pid = int((server.directory / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)  # mid-load: appends are in flight on four connections
        await asyncio.wait_for(asyncio.gather(*writers), timeout=30)
    finally:
        server.stop()  # reaps the killed process (or stops a live one if the test failed early)
        await client.aclose()
    assert not server.running

    with EmbeddedRedis(tmp_path, appendfsync="always") as again:
        reopened = Redis.from_url(again.url)
        try:
            result = await RedisAuditLog(reopened, signer=signer).verify()
            assert result.ok, result.reason
            assert result.head is not None and result.head.seq >= max(acknowledged)
            bodies = await reopened.hmget(EV, [f"{s:015d}" for s in sorted(acknowledged)])
            found = {s: chain_link(json.loads(b)) for s, b in zip(sorted(acknowledged), bodies, strict=True) if b}
            assert {s: link.hash for s, link in found.items() if link} == acknowledged
        finally:
            await reopened.aclose()

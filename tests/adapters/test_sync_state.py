"""Per-patient sync marks in a real redis-server: the watermark only moves forward, keys name no patient."""

from __future__ import annotations

from redis.asyncio import Redis

from fhir_bridge.adapters.sync_state import RedisSyncState
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.ports import SyncMark

PATIENT = PatientIdentifier(INS_NIR_TEST, "295109912611193")


async def test_the_watermark_moves_forward_only_and_keeps_the_source_text(redis_client: Redis) -> None:
    marks = RedisSyncState(redis_client)
    assert await marks.get(PATIENT) == SyncMark(None, None)
    await marks.advance(PATIENT, patient_id="pat-1", watermark="2026-11-01T10:00:00.345+02:00")
    await marks.advance(PATIENT, watermark="2026-11-01T07:59:59Z")  # older (08:00:00.345Z): ignored
    assert await marks.get(PATIENT) == SyncMark("pat-1", "2026-11-01T10:00:00.345+02:00")
    await marks.advance(PATIENT, watermark="2026-11-01T08:00:00.346Z")
    await marks.advance(PATIENT, patient_id=None)
    assert await marks.get(PATIENT) == SyncMark("pat-1", "2026-11-01T08:00:00.346Z")
    keys = [k.decode() for k in await redis_client.keys("*")]
    assert len(keys) == 1 and PATIENT.value not in keys[0] and "{" not in keys[0]
    assert 0 < await redis_client.ttl(keys[0]) <= 400 * 86_400

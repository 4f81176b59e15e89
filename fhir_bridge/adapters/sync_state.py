"""Per-patient sync marks in Redis (:class:`~fhir_bridge.ports.SyncStatePort`, issue 8 ``sync refresh``).

One hash per patient, ``P sync:patient:<SHA-256 of SYSTEM|VALUE>`` (no patient identifier in key names):
``pid`` the source's Patient id, ``wm`` the watermark as the source wrote it, ``wmus`` its start in
microseconds since the epoch (what the forward-only comparison uses: texts of different precisions do not
sort). Every operation touches one key, so the keys need no hash tag and spread over a Redis Cluster. A mark
not advanced for ``ttl_days`` expires (the patient's cases are long closed).
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.asyncio import Redis

from fhir_bridge.case.watermarks import instant_micros
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.ports import SyncMark

# KEYS: the mark. ARGV: patient id or '', watermark or '', its microseconds, ttl seconds.
_ADVANCE = """
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'pid', ARGV[1]) end
if ARGV[2] ~= '' then
  local old = tonumber(redis.call('HGET', KEYS[1], 'wmus'))
  if not old or tonumber(ARGV[3]) > old then redis.call('HSET', KEYS[1], 'wm', ARGV[2], 'wmus', ARGV[3]) end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
return 1
"""


class RedisSyncState:
    def __init__(self, redis: Redis, *, prefix: str = "fhir-bridge:", ttl_days: int = 400) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces: they would change the Cluster hash tag")
        self._redis = redis
        self._prefix = prefix
        self._ttl = ttl_days * 86_400
        self._advance = redis.register_script(_ADVANCE)

    async def get(self, patient: PatientIdentifier) -> SyncMark:
        pid, wm = await self._redis.hmget(self._key(patient), ["pid", "wm"])
        return SyncMark(_text(pid), _text(wm))

    async def advance(self, patient: PatientIdentifier, *, patient_id: str | None = None,
                      watermark: str | None = None) -> None:
        try:
            micros = instant_micros(watermark) if watermark else 0
        except ValueError:
            raise InvalidInput("a watermark must be a FHIR instant") from None
        await self._advance(keys=[self._key(patient)], args=[patient_id or "", watermark or "", micros, self._ttl])

    def _key(self, patient: PatientIdentifier) -> str:
        return f"{self._prefix}sync:patient:{hashlib.sha256(patient.token.encode()).hexdigest()}"


def _text(value: Any) -> str | None:
    return None if value is None else value.decode() if isinstance(value, bytes) else str(value)

"""Part 3b: audit appends per second with the hash chain, against a bare Redis write in the same run.

Every inbound call and every exchange with the source appends one AuditEvent, so the append rate bounds the
API's throughput. :meth:`RedisAuditLog.append` is timed in a loop against a private ``redis-server`` (started
here on a free port) with a realistic event (a DiagnosticReport read, as the API's middleware records it),
by one writer and by 8 and 64 concurrent writers (the API under load: every request in flight appends;
appends waiting together are group-committed, see ``RedisAuditLog.append``). The
baseline, in the same run and on the same server: a bare ``XADD`` of the same stored bytes, the cheapest
durable append Redis offers, so the ratio is the cost of the chain (SHA-256 seal, compare-and-set script,
index sets).

Both persistence policies of the private Redis are measured: ``appendfsync always`` (the bridge's default:
an event is on disk before the answer leaves) and ``everysec``. The chain is verified afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.common import Report, Row
from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.signing import load_or_create_signer
from fhir_bridge.audit.events import Party, rest_event
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import dumps

SIZES = {"full": (20_000, 8.0), "quick": (200, 0.3)}  # appends at most, seconds at most, per measurement
TARGET = 5000.0
WRITERS = (1, 8, 64)  # one caller; the API's default concurrency; a busy API (every request in flight appends)


def sample_event() -> dict[str, Any]:
    """A DiagnosticReport read by a platform, as the API's audit middleware records it (synthetic patient)."""
    return rest_event(
        interaction="read", resource_type="DiagnosticReport", status=200,
        client=Party("platform-a", system="https://bridge.example/auth", address="10.0.0.7", jti="jti-bench"),
        bridge=Party("https://bridge.example/fhir", address="bridge-1", name="fhir-bridge api"),
        resource_id="dr-0001", version_id="1", request_id="req-bench",
        patient=PatientIdentifier(system="urn:oid:1.2.250.1.213.1.4.10", value="165113523882658"),
        recorded=datetime.now(UTC),
    )


async def rate(operation: Callable[[], Awaitable[Any]], count: int, seconds: float, writers: int) -> float:
    """Operations per second: ``writers`` tasks calling ``operation`` until ``count`` are done or time is up."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal done
        while done < count and time.perf_counter() < deadline:
            done += 1
            await operation()

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return done / (time.perf_counter() - started)


async def _measure(url: str, keys: Path, count: int, seconds: float) -> dict[str, Any]:
    redis = Redis.from_url(url)
    try:
        log = RedisAuditLog(redis, signer=load_or_create_signer(keys), prefix="bench:")
        event = sample_event()
        body = dumps(event, canonical=True)

        async def append() -> None:
            await log.append(event)

        async def xadd() -> None:
            await redis.xadd("bench:xadd", {"e": body})

        out: dict[str, Any] = {}
        for writers in WRITERS:
            out[f"xadd{writers}"] = await rate(xadd, count, seconds, writers)
            out[f"chain{writers}"] = await rate(append, count, seconds, writers)
        verified = await log.verify()
        out["verified"] = verified.ok
        out["events"] = verified.count
        return out
    finally:
        await redis.aclose()


def run_audit(report: Report, mode: str, work: Path) -> None:
    """Part 3b; see the module docstring."""
    count, seconds = SIZES[mode]
    for policy in ("always", "everysec"):
        with EmbeddedRedis(work / policy, appendfsync=policy) as server:
            got = asyncio.run(_measure(server.url, work / "keys", count, seconds))
        best = max(got[f"chain{w}"] for w in WRITERS)
        per_writers = "; ".join(
            f"{w} writer{'s' if w > 1 else ''}: chain {got[f'chain{w}']:,.0f}/s, XADD {got[f'xadd{w}']:,.0f}/s "
            f"(chain/XADD {got[f'chain{w}'] / got[f'xadd{w}']:.2f})" for w in WRITERS)
        report.add(Row(
            "3 audit", f"chained appends/s, appendfsync {policy}", best, "/s",
            f"{per_writers}; {got['events']} events, chain {'verified' if got['verified'] else 'BROKEN'}",
            f">= {TARGET:,.0f}/s", best >= TARGET and got["verified"]))

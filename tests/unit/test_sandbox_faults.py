"""Injected faults, latency and the request log of the sandbox."""

from __future__ import annotations

import time
from typing import Any

import httpx

from fhir_bridge.sandbox.app import SandboxConfig, create_app

BASE = "http://sandbox.test"


def _client(**config: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(SandboxConfig(**config))), base_url=BASE)


async def test_fault_rate_one_answers_every_fhir_request_with_503_or_429_and_retry_after() -> None:
    async with _client(fault_rate=1.0) as client:
        statuses = set()
        for _ in range(30):
            response = await client.get("/fhir/metadata")
            assert response.status_code in (503, 429)
            assert response.headers["retry-after"] in ("0", "1")
            assert response.headers["content-type"].startswith("application/fhir+json")
            assert response.json()["resourceType"] == "OperationOutcome"
            statuses.add(response.status_code)
        assert statuses == {503, 429}
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/_sandbox/world")).status_code == 200
        assert (await client.get("/_sandbox/requests")).status_code == 200


async def test_faults_are_deterministic_for_a_seed() -> None:
    async def sequence(seed: int) -> list[int]:
        async with _client(seed=seed, fault_rate=0.5) as client:
            return [(await client.get("/fhir/metadata")).status_code for _ in range(40)]

    first = await sequence(3)
    assert first == await sequence(3)
    assert 200 in first and {503, 429} & set(first)


async def test_latency_is_added_to_fhir_requests_only() -> None:
    async with _client(latency_ms=60) as client:
        started = time.perf_counter()
        await client.get("/fhir/metadata")
        assert time.perf_counter() - started >= 0.06
        started = time.perf_counter()
        await client.get("/healthz")
        assert time.perf_counter() - started < 0.06


async def test_request_log_records_fhir_requests_and_can_be_cleared() -> None:
    async with _client(fault_rate=0.0) as client:
        await client.get("/fhir/metadata")
        await client.get("/fhir/Patient", params={"_id": "nobody"})
        await client.get("/fhir/Patient/nobody")
        log = (await client.get("/_sandbox/requests")).json()
        assert [(r["method"], r["path"], r["status"]) for r in log] == [
            ("GET", "/fhir/metadata", 200), ("GET", "/fhir/Patient", 200), ("GET", "/fhir/Patient/nobody", 404)]
        assert log[1]["query"] == "_id=nobody" and "time" in log[0] and log[0]["fault"] is False
        assert (await client.delete("/_sandbox/requests")).status_code == 204
        assert (await client.get("/_sandbox/requests")).json() == []

"""The auditor page in process (issue 7 item 4): fail closed, the role seam, escaping. On a real RedisAuditLog;
the page in a real browser against real processes is tests/e2e/test_audit_page.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.settings import Settings
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.api import audit_page
from fhir_bridge.api.app import create_app
from fhir_bridge.audit import Party, rest_event
from fhir_bridge.errors import AuditUnavailable, Forbidden
from fhir_bridge.identity import INS_NIR_TEST, PatientIdentifier
from tests.redis_fixture import redis_client, redis_server, redis_url

__all__ = ["redis_client", "redis_server", "redis_url"]  # the real-Redis fixtures, used by name

BRIDGE = Party("fhir-bridge", name="fhir-bridge api")
PATIENT = PatientIdentifier(INS_NIR_TEST, "279035121518989")


class Log(RedisAuditLog):
    """The real log, whose appends can be made to fail as a Redis outage would."""

    down = False

    async def append(self, event: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise AuditUnavailable("the audit log cannot be written (ConnectionError)")
        return await super().append(event)


@pytest.fixture
async def page(redis_client: Redis) -> AsyncIterator[tuple[httpx.AsyncClient, Log]]:
    log = Log(redis_client, signer=Es384Signer.generate())
    await log.append(rest_event(interaction="read", resource_type="Task", resource_id="t1", status=200,
                                client=Party("platform-a\u202egnp.exe", address="10.0.0.7"), bridge=BRIDGE,
                                patient=PATIENT, request_id="<i>req</i>"))  # fmt: skip
    app = create_app(Settings(), None, audit=log, audit_bridge=BRIDGE)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
        yield client, log


async def events(log: RedisAuditLog) -> list[dict[str, Any]]:
    return (await log.search(count=100))[0]


async def test_a_view_is_recorded_before_the_page_and_names_the_patient_shown(page: Any) -> None:
    client, log = page
    answer = await client.get("/audit/1", headers={"X-Request-Id": "view-1"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "view-1"
    [view, _] = await events(log)
    assert [c["code"] for c in view["subtype"]] == ["read"]
    assert any(e["what"].get("reference") == "AuditEvent/1" for e in view["entity"])
    assert any(e["what"].get("identifier", {}).get("value") == PATIENT.value for e in view["entity"])
    assert view["agent"][0]["network"]["address"] == "10.1.2.3"
    assert view["agent"][1]["network"]["address"] == "http://bridge.test/audit"


async def test_no_audit_no_page(page: Any) -> None:
    client, log = page
    log.down = True
    for path in ("/audit", "/audit/1", f"/audit?patient={PATIENT.token}"):
        answer = await client.get(path)
        assert answer.status_code == 503
        assert PATIENT.value not in answer.text and "chain-status" not in answer.text
        assert answer.headers["cache-control"] == "no-store"
    log.down = False
    assert len(await events(log)) == 1


async def test_the_role_seam_refuses_and_the_refusal_is_recorded(page: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    client, log = page
    assert audit_page.require_auditor is not None  # the seam exists and, for now, lets everyone in

    def not_an_auditor(request: Any) -> None:
        raise Forbidden("the auditor role is needed")

    monkeypatch.setattr(audit_page, "require_auditor", not_an_auditor)
    answer = await client.get("/audit/1")
    assert answer.status_code == 403
    assert PATIENT.value not in answer.text and "chain-status" not in answer.text and "platform-a" not in answer.text
    refused = (await events(log))[0]
    assert refused["outcome"] == "4" and refused["outcomeDesc"] == "the auditor role is needed"


async def test_values_are_escaped_and_invisible_characters_shown(page: Any) -> None:
    client, _ = page
    listed, detail = (await client.get("/audit")).text, (await client.get("/audit/1")).text
    assert "<i>" not in listed + detail and "&lt;i&gt;req&lt;/i&gt;" in detail
    for text in (listed, detail):
        assert "\u202e" not in text and "platform-a\\u202egnp.exe" in text
    assert audit_page.text("\"'<>&\x00\u2066") == "&quot;&#x27;&lt;&gt;&amp;\\u0000\\u2066"


async def test_a_bad_filter_or_seq_is_an_html_answer_on_the_record(page: Any) -> None:
    client, log = page
    bad = await client.get("/audit", params={"from": "yesterday"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("text/html")
    assert "chain-status" in bad.text  # the chain's status is on every page
    assert (await client.get("/audit/0")).status_code == 404
    assert (await client.get("/audit/12345678901234567890")).status_code == 404
    recorded = await events(log)
    assert [e["outcome"] for e in recorded[:3]] == ["4", "4", "4"]

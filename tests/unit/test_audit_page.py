"""The auditor page in process (issue 7 item 4): fail closed, the role seam, escaping, the auditor's session. On
a real RedisAuditLog, with access tokens issued and verified by the bridge's own key (the token endpoint itself
is tests/e2e/test_token_endpoint.py); the page in a real browser against real processes is
tests/e2e/test_audit_page.py."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from fhir_bridge.access.scopes import AccessContext, Role
from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.auth import BridgeKeys, RedisReplayCache, issue_access_token, verify_access_token
from fhir_bridge.adapters.clients import Client, ClientRegistry
from fhir_bridge.adapters.reference_data import load_profiles, load_role_ceilings
from fhir_bridge.adapters.settings import Settings
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.api import audit_page
from fhir_bridge.api.app import create_app
from fhir_bridge.api.auth_routes import AuthServer
from fhir_bridge.audit.events import JTI_PREFIX, Party, rest_event
from fhir_bridge.errors import AuditUnavailable, Forbidden
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from tests.redis_fixture import redis_client, redis_server, redis_url

__all__ = ["redis_client", "redis_server", "redis_url"]  # the real-Redis fixtures, used by name

BRIDGE = Party("fhir-bridge", name="fhir-bridge api")
PATIENT = PatientIdentifier(INS_NIR_TEST, "279035121518989")
FHIR_BASE = "http://bridge.test/fhir"  # the token audience: this app's own base
CEILINGS = load_role_ceilings()
SIGN_IN = 'action="/audit/session"'


class Log(RedisAuditLog):
    """The real log, whose appends can be made to fail as a Redis outage would."""

    down = False

    async def append(self, event: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise AuditUnavailable("the audit log cannot be written (ConnectionError)")
        return await super().append(event)


class Tokens:
    """Access tokens of this app's bridge key, as ``/auth/token`` would issue them."""

    def __init__(self, keys: BridgeKeys) -> None:
        self.keys = keys

    def issue(self, client_id: str, role: Role, tenant: str) -> str:
        client = Client(id=client_id, role=role, tenant=tenant, scopes=CEILINGS[role], jwks={"keys": []})
        answer = issue_access_token(client, " ".join(CEILINGS[role]), signing_key=self.keys,
                                    issuer="http://bridge.test/auth/token", audience=FHIR_BASE, now=time.time())
        return str(answer["access_token"])

    def context(self, token: str) -> AccessContext:
        return verify_access_token(token, keys=self.keys, audience=FHIR_BASE, now=time.time())


@pytest.fixture
async def page(redis_client: Redis, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Log]]:
    """The page as auditor ``auditor-1`` (its bearer token on every call unless a test removes it)."""
    client, log, _ = await _open(redis_client, tmp_path)
    async with client:
        yield client, log


@pytest.fixture
async def session(redis_client: Redis, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Log, Tokens]]:
    """The page with no credentials at all, and the token maker."""
    client, log, tokens = await _open(redis_client, tmp_path)
    client.headers.pop("Authorization")
    async with client:
        yield client, log, tokens


async def _open(redis: Redis, tmp_path: Path) -> tuple[httpx.AsyncClient, Log, Tokens]:
    log = Log(redis, signer=Es384Signer.generate())
    await log.append(rest_event(interaction="read", resource_type="Task", resource_id="t1", status=200,
                                client=Party("platform-a\u202egnp.exe", address="10.0.0.7"), bridge=BRIDGE,
                                patient=PATIENT, request_id="<i>req</i>"))  # fmt: skip
    app = create_app(Settings(), None, audit=log, audit_bridge=BRIDGE, profiles=load_profiles())
    tokens = Tokens(BridgeKeys.load_or_create(tmp_path / "keys"))
    app.state.auth = AuthServer(registry=ClientRegistry(), keys=tokens.keys, replay_cache=RedisReplayCache(redis),
                                ceilings=CEILINGS)
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    auditor = tokens.issue("auditor-1", "auditor", "audit")
    client = httpx.AsyncClient(transport=transport, base_url="http://bridge.test",
                               headers={"Authorization": f"Bearer {auditor}"})
    return client, log, tokens


def claims(authorization: str) -> dict[str, Any]:
    """The claims of a ``Bearer`` JWT, unverified (the test only reads back what it was given)."""
    payload = authorization.split()[1].split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


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
    # the viewer is the auditor the token names, with the token's jti (BALP OAUTHaccessTokenUse)
    assert view["agent"][0]["who"]["identifier"]["value"] == "auditor-1"
    assert view["agent"][0]["policy"] == [JTI_PREFIX + claims(client.headers["Authorization"])["jti"]]


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
    assert audit_page.require_auditor is not None  # the one seam the security layer decides through

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


# -- who may see the page ----------------------------------------------------------------------------------


async def test_without_a_session_the_page_answers_401_with_the_sign_in_form_and_shows_nothing(session: Any) -> None:
    client, log, _ = session
    for path in ("/audit", "/audit/1"):
        answer = await client.get(path)
        assert answer.status_code == 401 and SIGN_IN in answer.text
        assert PATIENT.value not in answer.text and "chain-status" not in answer.text
        assert "platform-a" not in answer.text and answer.headers["cache-control"] == "no-store"
    refused = (await events(log))[0]  # the refusal is on the record, by an anonymous client
    assert refused["outcome"] == "4" and refused["agent"][0]["who"]["identifier"]["value"] == "anonymous"


@pytest.mark.parametrize(("role", "tenant"), [("platform", "platform-a"), ("operator", "operations"),
                                              ("reviewer", "reviewers")])  # fmt: skip
async def test_a_token_of_another_role_is_refused_403(session: Any, role: Role, tenant: str) -> None:
    client, log, tokens = session
    token = tokens.issue(f"{role}-1", role, tenant)
    answer = await client.get("/audit/1", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 403 and SIGN_IN in answer.text
    assert PATIENT.value not in answer.text and "chain-status" not in answer.text
    refused = (await events(log))[0]
    assert refused["outcome"] == "4" and refused["agent"][0]["who"]["identifier"]["value"] == f"{role}-1"
    opened = await client.post("/audit/session", data={"access_token": token})
    assert opened.status_code == 403 and "set-cookie" not in opened.headers and SIGN_IN in opened.text


async def test_a_forged_or_absent_session_token_is_401_and_opens_no_session(session: Any) -> None:
    client, _, tokens = session
    auditor = tokens.issue("auditor-1", "auditor", "audit")
    forged = auditor[:-4] + ("AAAA" if not auditor.endswith("AAAA") else "BBBB")
    for form in ({"access_token": forged}, {"access_token": ""}, {"token": auditor}):
        answer = await client.post("/audit/session", data=form)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers and SIGN_IN in answer.text
    answer = await client.get("/audit", headers={"Authorization": f"Bearer {forged}"})
    assert answer.status_code == 401 and "chain-status" not in answer.text


async def test_an_auditor_token_opens_a_browser_session_kept_in_an_httponly_lax_cookie(session: Any) -> None:
    client, log, tokens = session
    token = tokens.issue("auditor-1", "auditor", "audit")
    opened = await client.post("/audit/session", data={"access_token": token})
    assert opened.status_code == 303 and opened.headers["location"] == "/audit"
    assert opened.headers["cache-control"] == "no-store" and token not in opened.text
    cookie = opened.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "max-age"} <= attributes and "secure" not in attributes  # plain http here
    assert "samesite=lax" in cookie.lower() and "path=/audit" in cookie.lower()
    max_age = int(next(p.split("=")[1] for p in cookie.split(";") if p.strip().lower().startswith("max-age")))
    assert 0 < max_age <= 300  # no longer than the token
    # the cookie alone (no Authorization header) now shows the page, as the auditor
    listed = await client.get("/audit")
    detail = await client.get("/audit/1")
    assert listed.status_code == detail.status_code == 200 and "chain-status" in listed.text
    assert PATIENT.value in detail.text
    viewer = (await events(log))[0]["agent"][0]
    assert viewer["who"]["identifier"]["value"] == "auditor-1"
    assert viewer["policy"] == [JTI_PREFIX + tokens.context(token).jti]

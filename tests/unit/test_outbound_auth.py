"""Outbound authentication of the source client (STANDARDS.md §8), against scripted HTTP answers.

SMART Backend Services tokens from the source's token endpoint: fetched once and shared, renewed near expiry
and once after a 401 ``invalid_token``, sent to the source's origin only; the assertion is one the bridge's own
verifier accepts. The same flow over real HTTP (and real TLS) is in tests/e2e/test_outbound_auth.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from fhir_bridge.adapters.auth import ClientRegistry, verify_client_assertion
from fhir_bridge.adapters.clients import Client, generate_client_keypair
from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.source_auth import StaticBearer
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.adapters.token_client import TokenRequestFailed
from fhir_bridge.errors import InvalidInput, SourceRejected

BASE = "https://source.test/fhir"
TOKEN_URL = "https://auth.source.test/token"
ELSEWHERE = "https://repository.elsewhere.test/docs/1"


class SmartSource:
    """A scripted SMART source: a token endpoint handing out ``t1``, ``t2``… and a FHIR server accepting
    the tokens in ``accepted`` (all of them when None)."""

    def __init__(self, expires_in: int = 300, accepted: set[str] | None = None, refuse_client: bool = False):
        self.expires_in, self.accepted, self.refuse_client = expires_in, accepted, refuse_client
        self.token_forms: list[dict[str, str]] = []
        self.seen: list[tuple[str, str | None]] = []  # (url without query, Authorization)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url.copy_with(query=None))
        self.seen.append((url, request.headers.get("Authorization")))
        if url == TOKEN_URL:
            self.token_forms.append(dict(parse_qsl(request.content.decode())))
            if self.refuse_client:
                return httpx.Response(401, json={"error": "invalid_client", "error_description": "unknown kid"})
            return httpx.Response(200, json={"access_token": f"t{len(self.token_forms)}", "token_type": "bearer",
                                             "expires_in": self.expires_in, "scope": self.token_forms[-1]["scope"]})
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ")
        if url.startswith(BASE) and (not token or (self.accepted is not None and token not in self.accepted)):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                                  json={"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "login"}]})
        if url == ELSEWHERE:
            return httpx.Response(200, content=b"%PDF-1.7 document")
        return httpx.Response(200, headers={"Content-Type": "application/fhir+json"},
                              content=json.dumps({"resourceType": "Bundle", "type": "searchset"}).encode())

    @property
    def tokens_fetched(self) -> int:
        return len(self.token_forms)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_client_keypair(tmp_path / "keys")


def settings(private_key: Path, **changes: Any) -> SourceSettings:
    base: dict[str, Any] = {"token_url": TOKEN_URL, "client_id": "bridge-1", "private_key_jwk": str(private_key),
                            "max_retries": 0, "total_deadline": 5}
    return SourceSettings(**{**base, **changes})


def source(handler: Callable[[httpx.Request], httpx.Response], config: SourceSettings) -> SourceClient:
    return SourceClient(BASE, config, transport=httpx.MockTransport(handler))


async def test_one_token_serves_concurrent_requests_and_its_assertion_verifies(keys: tuple[Path, Path]) -> None:
    smart = SmartSource()
    async with source(smart, settings(keys[0])) as client:
        await asyncio.gather(*(client.search("DocumentReference", {"patient": f"p{i}"}) for i in range(6)))
        await client.search("ImagingStudy", {"patient": "p0"})
    assert smart.tokens_fetched == 1
    assert {auth for url, auth in smart.seen if url.startswith(BASE)} == {"Bearer t1"}
    form = smart.token_forms[0]
    assert form["grant_type"] == "client_credentials" and form["scope"] == SourceSettings().scope
    registry = ClientRegistry([Client.from_dict({"id": "bridge-1", "role": "operator", "tenant": "bridge",
                                                 "scopes": ["system/Task.u"],
                                                 "jwks": json.loads(keys[1].read_text())})])

    class Once:
        async def remember(self, jti: str, ttl_s: int) -> bool:
            return True

    client_seen = await verify_client_assertion(form["client_assertion"], token_url=TOKEN_URL, registry=registry,
                                                replay_cache=Once(), now=time.time())
    assert client_seen.id == "bridge-1"


async def test_a_token_about_to_expire_is_renewed_before_it_is_used(keys: tuple[Path, Path]) -> None:
    smart = SmartSource(expires_in=30)  # within the 30 s margin from the start: never reused
    async with source(smart, settings(keys[0])) as client:
        await client.search("DocumentReference", {"patient": "p1"})
        await client.search("DocumentReference", {"patient": "p2"})
    assert smart.tokens_fetched == 2
    assert [auth for url, auth in smart.seen if url.startswith(BASE)] == ["Bearer t1", "Bearer t2"]


async def test_a_refused_token_is_renewed_once_then_the_request_goes_through(keys: tuple[Path, Path]) -> None:
    smart = SmartSource(accepted={"t2"})  # the source "restarted": t1 is no longer good
    async with source(smart, settings(keys[0])) as client:
        await client.search("DocumentReference", {"patient": "p1"})
    assert smart.tokens_fetched == 2
    assert [auth for url, auth in smart.seen if url.startswith(BASE)] == ["Bearer t1", "Bearer t2"]


async def test_a_source_refusing_every_token_is_asked_twice_not_forever(keys: tuple[Path, Path]) -> None:
    smart = SmartSource(accepted=set())
    async with source(smart, settings(keys[0])) as client:
        with pytest.raises(SourceRejected) as refused:
            await client.search("DocumentReference", {"patient": "p1"})
    assert refused.value.status == 401
    assert smart.tokens_fetched == 2 and len([u for u, _ in smart.seen if u.startswith(BASE)]) == 2


async def test_the_token_goes_to_the_source_origin_only(keys: tuple[Path, Path], tmp_path: Path) -> None:
    smart = SmartSource()
    body = b"%PDF-1.7 document"
    async with source(smart, settings(keys[0])) as client:
        await client.search("DocumentReference", {"patient": "p1"})
        await client.retrieve(ELSEWHERE, tmp_path / "doc.pdf", expected_size=len(body),
                              expected_sha1_b64=base64.b64encode(hashlib.sha1(body).digest()).decode())
    sent = dict(smart.seen)
    assert sent[f"{BASE}/DocumentReference"] == "Bearer t1"
    assert sent[ELSEWHERE] is None  # another origin: no token
    assert sent[TOKEN_URL] is None  # the token endpoint gets the signed assertion, never an access token


async def test_a_refusal_of_the_token_endpoint_names_its_error_not_the_assertion(keys: tuple[Path, Path]) -> None:
    smart = SmartSource(refuse_client=True)
    async with source(smart, settings(keys[0])) as client:
        with pytest.raises(TokenRequestFailed) as refused:
            await client.search("DocumentReference", {"patient": "p1"})
    assert refused.value.error == "invalid_client"
    assert "unknown kid" in str(refused.value)
    assert smart.token_forms[0]["client_assertion"] not in str(refused.value)
    assert not [u for u, _ in smart.seen if u.startswith(BASE)]  # no FHIR request without a token


async def test_a_static_bearer_refused_is_not_sent_again() -> None:
    calls: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("Authorization"))
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async with SourceClient(BASE, SourceSettings(max_retries=0), auth=StaticBearer("fixed"),
                            transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(SourceRejected):
            await client.search("DocumentReference", {"patient": "p1"})
    assert calls == ["Bearer fixed"]


@pytest.mark.parametrize("changes, complaint", [
    ({"client_id": ""}, "client_id"),
    ({"private_key_jwk": ""}, "private_key_jwk"),
    ({"private_key_jwk": "/nowhere/key.json"}, "private JWK"),
    ({"bearer_token": "static"}, "not both"),
    ({"token_url": "ftp://auth.test/token"}, "token_url"),
    ({"client_cert": "/nowhere/cert.pem"}, "client_cert"),
])
def test_half_configured_outbound_auth_is_refused_at_start(keys: tuple[Path, Path], changes: dict[str, Any],
                                                            complaint: str) -> None:
    with pytest.raises(InvalidInput, match=complaint):
        SourceClient(BASE, settings(keys[0], **changes))

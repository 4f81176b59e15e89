"""SMART Backend Services token endpoint over real HTTP: a client made with `fhir-bridge clients keygen|add` gets
a token; forged, replayed or mis-addressed assertions are refused (STANDARDS.md §8); the token it gets opens the
FHIR routes its scopes name and no others (the full route-by-route rules are tests/e2e/test_security.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.auth import BridgeKeys, verify_access_token
from fhir_bridge.adapters.clients import make_client_assertion
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge

pytestmark = pytest.mark.e2e
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def cli(data_dir: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "FHIR_BRIDGE_DATA_DIR": str(data_dir)}
    done = subprocess.run([sys.executable, "-m", "fhir_bridge", *args], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def auth_bridge(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[tuple[Bridge, dict]]:
    data_dir = tmp_path_factory.mktemp("auth")
    keys = cli(data_dir, "clients", "keygen", "--out", str(data_dir / "client-keys"))
    cli(data_dir, "clients", "add", "--id", "platform-a", "--role", "platform", "--jwks", keys["public"],
        "--scope", "system/ServiceRequest.c", "--scope", "system/DiagnosticReport.rs")
    with EmbeddedRedis(data_dir) as redis, ProcessGroup(data_dir / "logs") as group:
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "auth")
        yield bridge, json.loads(Path(keys["private"]).read_text())


def token_url(bridge: Bridge) -> str:
    return bridge.api.removesuffix("/fhir") + "/auth/token"


def ask(bridge: Bridge, assertion: str, scope: str = "system/ServiceRequest.c system/DiagnosticReport.read",
        **extra: str) -> httpx.Response:
    form = {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion, **extra}
    return httpx.post(token_url(bridge), data=form, timeout=30)


def test_a_registered_client_gets_a_short_lived_token_with_its_granted_scopes(auth_bridge: tuple[Bridge, dict]) -> None:
    bridge, private = auth_bridge
    assertion = make_client_assertion(private, client_id="platform-a", token_url=token_url(bridge), now=time.time())
    answer = ask(bridge, assertion)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert body["token_type"].lower() == "bearer" and 0 < body["expires_in"] <= 300
    assert set(body["scope"].split()) == {"system/ServiceRequest.c", "system/DiagnosticReport.rs"}
    assert "refresh_token" not in body
    context = verify_access_token(body["access_token"], keys=BridgeKeys.load_or_create(bridge.data_dir / "keys"),
                                  audience=bridge.api, now=time.time())
    assert context.client_id == "platform-a" and context.role == "platform"

    replayed = ask(bridge, assertion)  # the same jti again
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_client"


def test_the_token_opens_the_routes_of_its_scopes_only(auth_bridge: tuple[Bridge, dict]) -> None:
    bridge, private = auth_bridge
    assertion = make_client_assertion(private, client_id="platform-a", token_url=token_url(bridge), now=time.time())
    token = ask(bridge, assertion).raise_for_status().json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    found = httpx.get(f"{bridge.api}/DiagnosticReport", headers=bearer, timeout=30)  # system/DiagnosticReport.rs
    assert found.status_code == 200 and found.json()["total"] == 0  # its tenant has no case yet
    assert httpx.get(f"{bridge.api}/Task", headers=bearer, timeout=30).status_code == 403  # no Task scope
    refused = httpx.get(f"{bridge.api}/DiagnosticReport", timeout=30)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    bad = httpx.get(f"{bridge.api}/DiagnosticReport", headers={"Authorization": f"Bearer {tampered}"}, timeout=30)
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["WWW-Authenticate"]
    assert token not in bad.text


def _b64(obj: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("case", ["wrong aud", "alg none", "unknown client", "expired", "garbage"])
def test_bad_assertions_are_invalid_client(case: str, auth_bridge: tuple[Bridge, dict]) -> None:
    bridge, private = auth_bridge
    now = time.time()
    if case == "wrong aud":
        assertion = make_client_assertion(private, client_id="platform-a", token_url="https://elsewhere/token", now=now)
    elif case == "alg none":
        claims = {"iss": "platform-a", "sub": "platform-a", "aud": token_url(bridge), "exp": int(now) + 60,
                  "jti": "none-1"}
        assertion = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    elif case == "unknown client":
        assertion = make_client_assertion(private, client_id="nobody", token_url=token_url(bridge), now=now)
    elif case == "expired":
        assertion = make_client_assertion(private, client_id="platform-a", token_url=token_url(bridge),
                                          now=now - 600)
    else:
        assertion = "not-a-jwt"
    answer = ask(bridge, assertion)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "invalid_client"


def test_scope_and_grant_errors(auth_bridge: tuple[Bridge, dict]) -> None:
    bridge, private = auth_bridge
    fresh = make_client_assertion(private, client_id="platform-a", token_url=token_url(bridge), now=time.time())
    assert ask(bridge, fresh, scope="system/AuditEvent.rs").json()["error"] == "invalid_scope"
    other = make_client_assertion(private, client_id="platform-a", token_url=token_url(bridge), now=time.time())
    wrong = ask(bridge, other, grant_type="password")
    assert wrong.status_code == 400 and wrong.json()["error"] == "unsupported_grant_type"


def test_discovery_names_the_token_endpoint_and_keys(auth_bridge: tuple[Bridge, dict]) -> None:
    bridge, _ = auth_bridge
    document = httpx.get(f"{bridge.api}/.well-known/smart-configuration").json()
    assert document["token_endpoint"] == token_url(bridge)
    assert document["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert document["grant_types_supported"] == ["client_credentials"]
    keys = httpx.get(document["jwks_uri"]).json()
    assert keys["keys"] and all("d" not in k for k in keys["keys"])  # public keys only

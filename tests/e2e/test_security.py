"""Issue 6, "Done when", over real HTTP against a real bridge (API + worker + Redis + sandbox as processes).

Each refusal is checked for its status, its OperationOutcome / RFC 6750 challenge, and for leaving nothing behind
(counts seen by the rightful owner do not move, the audit records the refusal). Tokens are forged with the bridge's
own key where a test needs a token the bridge would never issue (expired, other audience, alg none, HS256 keyed
with the public key, unknown kid).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey

from fhir_bridge.adapters.auth import BridgeKeys
from fhir_bridge.adapters.clients import make_client_assertion
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.test_exchange import FHIR

pytestmark = pytest.mark.e2e
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.fixture(scope="module")
def case(bridge: Bridge, sandbox: Sandbox) -> Iterator[dict[str, Any]]:
    """A ready case of the platform tenant, routed to a reviewer: its request, Task and the patient."""
    patient = next(p for p in sandbox.world()["patients"] if p.get("specialty") == "oncology")
    with bridge.client("platform") as platform:
        request = second_opinion_request(patient, f"SEC-{uuid.uuid4()}")
        sr = platform.post(f"{bridge.api}/ServiceRequest", json=request, headers=FHIR).raise_for_status().json()
        deadline, task = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            found = platform.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).json()
            task = found["entry"][0]["resource"] if found.get("entry") else {}
            if task.get("status") in ("ready", "failed", "on-hold"):
                break
            time.sleep(0.2)
        assert task.get("status") == "ready", task.get("status")
        yield {"sr": sr, "task": task, "patient": patient}


def hs256_with(secret: bytes, header: dict[str, Any], payload_b64: str) -> str:
    """An HS256 JWT keyed with ``secret`` (written by hand: JOSE libraries rightly refuse a public key as secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{payload_b64}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def bridge_keys(bridge: Bridge) -> BridgeKeys:
    return BridgeKeys.load_or_create(bridge.data_dir / "keys")


def forged(bridge: Bridge, *, header: dict[str, Any] | None = None, **claims: Any) -> str:
    """An access token signed by the bridge key with these claims over a valid platform token's claims."""
    keys = bridge_keys(bridge)
    now = int(time.time())
    body = {"iss": bridge.api.removesuffix("/fhir") + "/auth/token", "sub": "platform", "client_id": "platform",
            "aud": bridge.api, "iat": now, "exp": now + 120, "jti": str(uuid.uuid4()), "role": "platform",
            "tenant": "demo-platform", "scope": "system/ServiceRequest.crs system/Task.rus system/DiagnosticReport.rs"}
    body.update(claims)
    head = {"alg": "ES384", "kid": keys.kid, "typ": "at+jwt", **(header or {})}
    return jwt.encode(head, body, keys.signing_key, algorithms=["ES384"])


def counts(bridge: Bridge) -> dict[str, int]:
    with bridge.client("platform") as platform:
        return {t: platform.get(f"{bridge.api}/{t}", params={"_count": "0"}).raise_for_status().json()["total"]
                for t in ("ServiceRequest", "Task", "DiagnosticReport")}


def post_request(bridge: Bridge, token: str | None, patient: dict[str, Any]) -> httpx.Response:
    headers = {**FHIR, **({"Authorization": f"Bearer {token}"} if token is not None else {})}
    return httpx.post(f"{bridge.api}/ServiceRequest", json=second_opinion_request(patient, f"X-{uuid.uuid4()}"),
                      headers=headers, timeout=30)


def assert_refused(answer: httpx.Response, status: int, challenge: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text[:400]
    outcome = answer.json()
    assert outcome["resourceType"] == "OperationOutcome"
    if challenge is not None:
        assert challenge in answer.headers.get("WWW-Authenticate", "")
    return dict(outcome)


# ------------------------------------------------------------------------------------------------ tokens


def test_no_token_is_401_with_a_bearer_challenge_and_stores_nothing(bridge: Bridge, case: dict[str, Any]) -> None:
    before = counts(bridge)
    answer = post_request(bridge, None, case["patient"])
    assert_refused(answer, 401, 'Bearer realm="fhir-bridge"')
    assert "error=" not in answer.headers["WWW-Authenticate"]  # RFC 6750 §3.1: no error code without a token
    assert httpx.get(f"{bridge.api}/Task/{case['task']['id']}", timeout=30).status_code == 401
    assert httpx.get(f"{bridge.api}/AuditEvent", timeout=30).status_code == 401
    assert counts(bridge) == before


@pytest.mark.parametrize("kind", ["expired", "wrong-aud", "alg-none", "hs256-public-key", "unknown-kid",
                                  "other-issuer-key", "garbage", "basic-scheme"])
def test_a_bad_access_token_is_401_invalid_token_and_stores_nothing(bridge: Bridge, case: dict[str, Any],
                                                                    kind: str) -> None:
    keys = bridge_keys(bridge)
    if kind == "expired":
        token = forged(bridge, iat=int(time.time()) - 900, exp=int(time.time()) - 600)
    elif kind == "wrong-aud":
        token = forged(bridge, aud="https://another-server.example/fhir")
    elif kind == "alg-none":
        valid = forged(bridge).split(".")
        header = b64(json.dumps({"alg": "none", "kid": keys.kid, "typ": "at+jwt"}).encode())
        token = f"{header}.{valid[1]}."
    elif kind == "hs256-public-key":
        # the classic confusion: an HMAC keyed with the verifier's *public* key, hoping it is used as a secret
        token = hs256_with(keys.public_key.as_pem(private=False), {"alg": "HS256", "kid": keys.kid, "typ": "at+jwt"},
                           forged(bridge).split(".")[1])
    elif kind == "unknown-kid":
        token = forged(bridge, header={"kid": "not-a-key-of-this-bridge"})
    elif kind == "other-issuer-key":
        stranger = ECKey.generate_key("P-384")
        token = jwt.encode({"alg": "ES384", "kid": keys.kid, "typ": "at+jwt"},
                           json.loads(base64.urlsafe_b64decode(forged(bridge).split(".")[1] + "==")), stranger,
                           algorithms=["ES384"])
    elif kind == "garbage":
        token = "not.a.jwt"
    else:
        token = ""
    before = counts(bridge)
    if kind == "basic-scheme":
        answer = httpx.post(f"{bridge.api}/ServiceRequest", json={}, timeout=30,
                            headers={**FHIR, "Authorization": "Basic cGxhdGZvcm06c2VjcmV0"})
        assert_refused(answer, 401, "Bearer")
    else:
        answer = post_request(bridge, token, case["patient"])
        assert_refused(answer, 401, 'error="invalid_token"')
        assert token not in answer.text or not token
        read = httpx.get(f"{bridge.api}/Task/{case['task']['id']}", headers={"Authorization": f"Bearer {token}"},
                         timeout=30)
        assert read.status_code == 401
    assert counts(bridge) == before


def test_a_forged_but_well_signed_token_shows_the_forgery_test_is_sound(bridge: Bridge, case: dict[str, Any]) -> None:
    """The forging helper itself yields accepted tokens: the refusals above are due to the one thing changed."""
    answer = httpx.get(f"{bridge.api}/Task/{case['task']['id']}", headers={"Authorization": f"Bearer {forged(bridge)}"},
                       timeout=30)
    assert answer.status_code == 200


def _assertion_form(assertion: str, scope: str = "system/Task.rs") -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": scope, "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion}


@pytest.mark.parametrize("kind", ["replayed-jti", "unknown-kid", "alg-none", "hs256-public-key", "wrong-aud",
                                  "expired"])
def test_a_bad_client_assertion_gets_no_token(bridge: Bridge, kind: str) -> None:
    client = bridge.clients.clients["platform"]
    token_url = bridge.api.removesuffix("/fhir") + "/auth/token"
    now = time.time()
    assertion = make_client_assertion(client.private_jwk, client_id="platform", token_url=token_url, now=now)
    if kind == "replayed-jti":
        first = httpx.post(token_url, data=_assertion_form(assertion), timeout=30)
        assert first.status_code == 200, first.text
    elif kind == "unknown-kid":
        assertion = make_client_assertion({**client.private_jwk, "kid": "no-such-kid"}, client_id="platform",
                                          token_url=token_url, now=now)
    elif kind == "alg-none":
        parts = assertion.split(".")
        assertion = f"{b64(json.dumps({'alg': 'none', 'kid': client.private_jwk['kid']}).encode())}.{parts[1]}."
    elif kind == "hs256-public-key":
        public = ECKey.import_key(client.private_jwk).as_pem(private=False)
        assertion = hs256_with(public, {"alg": "HS256", "kid": client.private_jwk["kid"]}, assertion.split(".")[1])
    elif kind == "wrong-aud":
        assertion = make_client_assertion(client.private_jwk, client_id="platform", now=now,
                                          token_url="https://elsewhere.example/auth/token")
    else:
        assertion = make_client_assertion(client.private_jwk, client_id="platform", token_url=token_url,
                                          now=now - 600)
    answer = httpx.post(token_url, data=_assertion_form(assertion), timeout=30)
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"] == "invalid_client"
    assert "access_token" not in answer.json()


# ------------------------------------------------------------------------------------------------ scopes


def test_a_missing_scope_is_403_insufficient_scope(bridge: Bridge, case: dict[str, Any]) -> None:
    before = counts(bridge)
    with httpx.Client(auth=bridge.auth("platform", scope="system/Task.rs"), timeout=30) as narrow:
        answer = narrow.post(f"{bridge.api}/ServiceRequest", headers=FHIR,
                             json=second_opinion_request(case["patient"], f"N-{uuid.uuid4()}"))
        assert_refused(answer, 403, 'error="insufficient_scope"')
        assert narrow.get(f"{bridge.api}/Task/{case['task']['id']}").status_code == 200  # what it holds still works
        assert narrow.get(f"{bridge.api}/DiagnosticReport", params={"_count": "1"}).status_code == 403
    assert counts(bridge) == before


def test_a_client_can_not_be_granted_more_than_its_role_allows(bridge: Bridge) -> None:
    auth = bridge.auth("auditor", scope="system/AuditEvent.rs system/ServiceRequest.c system/*.cruds")
    with httpx.Client(auth=auth, timeout=30) as auditor:
        assert auditor.get(f"{bridge.api}/AuditEvent", params={"_count": "1"}).status_code == 200
    assert auth.granted_scope == "system/AuditEvent.rs"


# ------------------------------------------------------------------------------------------------ tenants


def test_another_tenants_case_and_report_answer_404(bridge: Bridge, case: dict[str, Any]) -> None:
    sr, task = case["sr"], case["task"]
    reviewer = bridge.reviewer_of(task)
    with bridge.client(reviewer) as rev:
        report = rev.post(f"{bridge.api}/DiagnosticReport", headers=FHIR,
                          json={**reviewer_opinion(sr["id"], case["patient"]), "status": "preliminary"})
        assert report.status_code == 201, report.text
        report_id = report.json()["id"]
    with bridge.client("platform-other") as other, bridge.client("platform") as owner:
        for path in (f"ServiceRequest/{sr['id']}", f"Task/{task['id']}", f"DiagnosticReport/{report_id}",
                     f"Task/{task['id']}/_history", f"ServiceRequest/{sr['id']}/_history/1"):
            assert owner.get(f"{bridge.api}/{path}").status_code == 200, path
            hidden = other.get(f"{bridge.api}/{path}")
            assert_refused(hidden, 404)
            missing = str(uuid.uuid4())
            unknown = other.get(f"{bridge.api}/{path.split('/')[0]}/{missing}")
            said = hidden.json()["issue"][0]["diagnostics"].replace(path.split("/")[1], missing)
            assert said == unknown.json()["issue"][0]["diagnostics"]  # word for word an unknown id's answer
        for rtype, params in (("ServiceRequest", {}), ("Task", {"focus": f"ServiceRequest/{sr['id']}"}),
                              ("DiagnosticReport", {"based-on": f"ServiceRequest/{sr['id']}"})):
            assert other.get(f"{bridge.api}/{rtype}", params=params).json()["total"] == 0
            assert owner.get(f"{bridge.api}/{rtype}", params=params).json()["total"] >= 1
        refresh = other.post(f"{bridge.api}/Task/{task['id']}/$refresh", headers=FHIR)
        assert_refused(refresh, 404)
        # a conditional create names the owner's identifier: it neither finds nor collides with the other tenant's
        identifier = sr["identifier"][0]
        again = other.post(f"{bridge.api}/ServiceRequest", headers={
            **FHIR, "If-None-Exist": f"identifier={identifier['system']}|{identifier['value']}"},
            json=second_opinion_request(case["patient"], identifier["value"]))
        assert again.status_code == 201 and again.json()["id"] != sr["id"]


def test_a_reviewer_sees_only_assigned_cases_and_can_not_post_for_others(bridge: Bridge, sandbox: Sandbox,
                                                                        case: dict[str, Any]) -> None:
    sr, task = case["sr"], case["task"]
    assigned = bridge.reviewer_of(task)
    members = {f"reviewer-{m}" for p in bridge.clients.registry.panels.values() for m in p.members
               if f"CareTeam/{p.id}" == task["owner"]["reference"]}
    stranger = next(c for c in sorted(bridge.clients.clients) if c.startswith("reviewer-") and c != assigned
                    and c not in members)
    before = counts(bridge)
    with bridge.client("platform") as owner:
        version = owner.get(f"{bridge.api}/Task/{task['id']}").json()["meta"]["versionId"]
    with bridge.client(stranger) as rev:
        for path in (f"Task/{task['id']}", f"ServiceRequest/{sr['id']}"):
            assert_refused(rev.get(f"{bridge.api}/{path}"), 404)
        bundle_ref = next(o["valueReference"]["reference"] for o in task["output"]
                          if o["type"]["coding"][0]["code"] == "case-bundle")
        assert_refused(rev.get(f"{bridge.api}/{bundle_ref}"), 404)
        assert rev.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).json()["total"] == 0
        posted = rev.post(f"{bridge.api}/DiagnosticReport", headers=FHIR,
                          json=reviewer_opinion(sr["id"], case["patient"]))
        assert_refused(posted, 403)
        declined = rev.post(f"{bridge.api}/Task/{task['id']}/$decline", headers=FHIR,
                            json={"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "x"}]})
        assert_refused(declined, 404)
        assert_refused(rev.get(f"{bridge.api}/DiagnosticReport", params={"_count": "1"}), 403)
    with bridge.client(assigned) as rev:
        assert rev.get(f"{bridge.api}/Task/{task['id']}").status_code == 200
        assert rev.get(f"{bridge.api}/{bundle_ref}").status_code == 200
        # a reviewer acts as the PractitionerRole of its token, never as another one named in Parameters
        spoof = rev.post(f"{bridge.api}/Task/{task['id']}/$request-documents", headers=FHIR, json={
            "resourceType": "Parameters", "parameter": [{"name": "reviewer", "valueString": stranger[9:]},
                                                        {"name": "text", "valueString": "x"}]})
        assert_refused(spoof, 403)
    after = counts(bridge)
    assert after == before
    with bridge.client("platform") as owner:
        assert owner.get(f"{bridge.api}/Task/{task['id']}").json()["meta"]["versionId"] == version


def test_an_auditor_can_not_write_and_others_can_not_read_the_audit(bridge: Bridge, case: dict[str, Any]) -> None:
    before = counts(bridge)
    with bridge.client("auditor") as auditor:
        for method, path, body in (("POST", "ServiceRequest", second_opinion_request(case["patient"], "A-1")),
                                   ("POST", "DiagnosticReport", reviewer_opinion(case["sr"]["id"], case["patient"])),
                                   ("POST", f"Task/{case['task']['id']}/$refresh", None),
                                   ("GET", f"Task/{case['task']['id']}", None)):
            answer = auditor.request(method, f"{bridge.api}/{path}", json=body, headers=FHIR)
            assert_refused(answer, 403)
        assert auditor.get(f"{bridge.api}/AuditEvent", params={"_count": "1"}).status_code == 200
    with bridge.client("platform") as platform, bridge.client(bridge.reviewer_of(case["task"])) as rev:
        assert_refused(platform.get(f"{bridge.api}/AuditEvent"), 403)
        assert_refused(rev.get(f"{bridge.api}/AuditEvent/$verify"), 403)
        assert platform.get(f"{bridge.api.removesuffix('/fhir')}/audit").status_code == 403
    assert counts(bridge) == before


def test_an_operator_refreshes_any_case_but_reads_nothing(bridge: Bridge, case: dict[str, Any]) -> None:
    with bridge.client("operator") as operator:
        assert_refused(operator.get(f"{bridge.api}/Task/{case['task']['id']}"), 403)
        assert_refused(operator.get(f"{bridge.api}/ServiceRequest"), 403)


def test_refusals_are_on_the_audit_trail_with_the_client(bridge: Bridge, case: dict[str, Any]) -> None:
    with bridge.client("platform-other") as other:
        assert other.get(f"{bridge.api}/Task/{case['task']['id']}").status_code == 404
    with bridge.client("auditor") as auditor:
        events = auditor.get(f"{bridge.api}/AuditEvent", params={"_count": "50"}).json()["entry"]
    mine = [e["resource"] for e in events if any(a.get("who", {}).get("identifier", {}).get("value") == "platform-other"
                                                 for a in e["resource"].get("agent", []))]
    assert any(e["outcome"] == "4" for e in mine), "the 404 to the other tenant is recorded, with its client id"


# ------------------------------------------------------------------------------------------------ limits


def test_an_oversized_body_is_413_even_with_a_valid_token(bridge: Bridge, case: dict[str, Any]) -> None:
    before = counts(bridge)
    with bridge.client("platform") as platform:
        big = b'{"resourceType":"ServiceRequest","note":[{"text":"' + b"x" * (11 * 1024 * 1024) + b'"}]}'
        answer = platform.post(f"{bridge.api}/ServiceRequest", content=big, headers=FHIR)
        assert_refused(answer, 413)
    assert counts(bridge) == before


def test_clients_token_prints_a_token_the_api_takes(bridge: Bridge) -> None:
    key = bridge.data_dir / "client-keys" / "auditor" / "client-private.jwk.json"
    env = {**os.environ, "FHIR_BRIDGE_DATA_DIR": str(bridge.data_dir)}
    done = subprocess.run([sys.executable, "-m", "fhir_bridge", "clients", "token", "--id", "auditor", "--key",
                           str(key), "--scope", "system/AuditEvent.rs", "--url", bridge.api],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)["access_token"]
    answer = httpx.get(f"{bridge.api}/AuditEvent", params={"_count": "1"}, timeout=30,
                       headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
    wrong = subprocess.run([sys.executable, "-m", "fhir_bridge", "clients", "token", "--id", "platform", "--key",
                            str(key), "--scope", "system/Task.rs", "--url", bridge.api],
                           capture_output=True, text=True, timeout=60, env=env)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().count("\n") == 0 and "invalid_client" in wrong.stderr


@pytest.mark.parametrize("odd", ["³", "١٢", "²³⁴", "1e3", "-1", "0"])
def test_unicode_or_odd_digits_in_ids_are_404_not_500(bridge: Bridge, odd: str) -> None:
    """Found by schemathesis: ``"³".isdigit()`` is True but ``int("³")`` raises; ids are ASCII digits only."""
    with bridge.client("auditor") as auditor:
        assert_refused(auditor.get(f"{bridge.api}/AuditEvent/{odd}"), 404)
        assert auditor.get(f"{bridge.api.removesuffix('/fhir')}/audit/{odd}").status_code == 404

"""SMART Backend Services at the bridge: each refusal the issue lists, and the grants that must still work.

Client assertions are checked against the real :class:`RedisReplayCache` on the test redis-server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, RSAKey
from redis.asyncio import Redis

from fhir_bridge.access.scopes import AccessContext, grant_scopes, has_scope, parse_scope
from fhir_bridge.adapters.auth import (
    BridgeKeys,
    Client,
    ClientRegistry,
    InvalidClient,
    InvalidScope,
    InvalidToken,
    RedisReplayCache,
    UnsupportedGrantType,
    add_client,
    certificate_thumbprint,
    generate_client_keypair,
    issue_access_token,
    make_client_assertion,
    oauth_error_body,
    read_token_request,
    smart_configuration,
    verify_access_token,
    verify_client_assertion,
)
from fhir_bridge.errors import Conflict, InvalidInput
from tests.redis_fixture import redis_client, redis_server, redis_url

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()

__all__ = ["redis_client", "redis_server", "redis_url"]  # the real-Redis fixtures, used by name

TOKEN_URL = "https://bridge.test/auth/token"
FHIR_BASE = "https://bridge.test/fhir"
NOW = time.time()

EC_KEY = ECKey.generate_key("P-384", parameters={"kid": "ec-1", "alg": "ES384"})
RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "alg": "RS384"})
OTHER_EC = ECKey.generate_key("P-384", parameters={"kid": "ec-1", "alg": "ES384"})  # same kid, other key
with warnings.catch_warnings():
    warnings.simplefilter("ignore", SecurityWarning)  # joserfc warns about the weak key we mean to refuse
    WEAK_RSA = RSAKey.generate_key(1024, parameters={"kid": "weak"}).as_dict(private=False)


def entry(client_id: str, *keys: ECKey | RSAKey, role: str = "platform", scopes: list[str] | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"id": client_id, "role": role, "tenant": "hospital-a",
            "scopes": scopes or ["system/ServiceRequest.cr", "system/DiagnosticReport.rs", "system/Task.rs"],
            "jwks": {"keys": [k.as_dict(private=False) for k in keys]}, **extra}


REGISTRY = ClientRegistry([
    Client.from_dict(entry("platform-a", EC_KEY, RSA_KEY)),
    Client.from_dict(entry("platform-b", OTHER_EC)),
])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def claims(**changes: Any) -> dict[str, Any]:
    base = {"iss": "platform-a", "sub": "platform-a", "aud": TOKEN_URL, "exp": int(NOW) + 240,
            "jti": f"jti-{time.perf_counter_ns()}"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def assertion(key: ECKey | RSAKey = EC_KEY, alg: str = "ES384", header: dict[str, Any] | None = None,
              **changes: Any) -> str:
    head = {"alg": alg, "kid": key.kid, "typ": "JWT", **(header or {})}
    return jwt.encode({k: v for k, v in head.items() if v is not None}, claims(**changes), key, algorithms=[alg])


def unsigned(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}.{b64(signature)}"


@pytest.fixture
def replay(redis_client: Redis) -> RedisReplayCache:
    return RedisReplayCache(redis_client)


async def verify(token: str, replay: RedisReplayCache, now: float = NOW) -> Client:
    return await verify_client_assertion(token, token_url=TOKEN_URL, registry=REGISTRY, replay_cache=replay, now=now)


# --- client assertions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg"), [(EC_KEY, "ES384"), (RSA_KEY, "RS384")])
async def test_a_well_formed_assertion_authenticates_its_client(
    replay: RedisReplayCache, key: ECKey | RSAKey, alg: str
) -> None:
    client = await verify(assertion(key, alg), replay)
    assert client.id == "platform-a"
    assert client.role == "platform"


@pytest.mark.parametrize(
    "form",
    [{"grant_type": "client_credentials", "scope": "system/Task.rs"},
     {"grant_type": "client_credentials", "scope": "system/Task.rs", "client_assertion": "x.y.z"},
     {"grant_type": "client_credentials", "scope": "system/Task.rs", "client_assertion_type": "secret",
      "client_assertion": "x.y.z"}],
)
def test_a_token_request_without_an_assertion_is_invalid_client(form: dict[str, str]) -> None:
    with pytest.raises(InvalidClient) as refused:
        read_token_request(form)
    assert oauth_error_body(refused.value)["error"] == "invalid_client"


def test_a_token_request_of_another_grant_type_or_without_scope_is_refused() -> None:
    with pytest.raises(UnsupportedGrantType):
        read_token_request({"grant_type": "password", "client_assertion": "x"})
    with pytest.raises(InvalidScope):
        read_token_request({"grant_type": "client_credentials", "client_assertion": "a.b.c",
                            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})


async def test_no_assertion_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="no client assertion"):
        await verify("", replay)


@pytest.mark.parametrize("garbage", ["not-a-jwt", "a.b.c", "é.é.é", "x" * 9000])
async def test_garbage_is_refused(replay: RedisReplayCache, garbage: str) -> None:
    with pytest.raises(InvalidClient):
        await verify(garbage, replay)


async def test_an_expired_assertion_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="expired"):
        await verify(assertion(exp=int(NOW) - 1), replay)


async def test_an_assertion_without_exp_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="no exp"):
        await verify(assertion(exp=None), replay)


async def test_exp_more_than_five_minutes_ahead_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="five minutes"):
        await verify(assertion(exp=int(NOW) + 400), replay)
    assert (await verify(assertion(exp=int(NOW) + 300), replay)).id == "platform-a"


@pytest.mark.parametrize("aud", ["https://bridge.test/fhir", "https://evil.test/auth/token", ["https://x.test"], None])
async def test_a_wrong_audience_is_refused(replay: RedisReplayCache, aud: object) -> None:
    with pytest.raises(InvalidClient, match="aud"):
        await verify(assertion(aud=aud), replay)


async def test_alg_none_is_refused(replay: RedisReplayCache) -> None:
    for alg in ("none", "None", "NONE"):
        token = unsigned({"alg": alg, "kid": "ec-1", "typ": "JWT"}, claims())
        with pytest.raises(InvalidClient, match="RS384 or ES384"):
            await verify(token, replay)


async def test_an_hs256_token_signed_with_the_public_key_is_refused(replay: RedisReplayCache) -> None:
    for secret in (EC_KEY.as_pem(private=False), json.dumps(EC_KEY.as_dict(private=False)).encode(),
                   RSA_KEY.as_pem(private=False)):
        for alg, digest in (("HS256", hashlib.sha256), ("HS384", hashlib.sha384)):
            head = {"alg": alg, "kid": "ec-1", "typ": "JWT"}
            signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(claims()).encode())}"
            mac = hmac.new(secret, signing_input.encode(), digest).digest()
            with pytest.raises(InvalidClient, match="RS384 or ES384"):
                await verify(f"{signing_input}.{b64(mac)}", replay)


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS384", "EdDSA"])
async def test_other_asymmetric_algorithms_are_refused(replay: RedisReplayCache, alg: str) -> None:
    token = unsigned({"alg": alg, "kid": "ec-1", "typ": "JWT"}, claims(), b"sig")
    with pytest.raises(InvalidClient, match="RS384 or ES384"):
        await verify(token, replay)


async def test_a_replayed_jti_is_refused(replay: RedisReplayCache, redis_client: Redis) -> None:
    token = assertion(jti="once-only")
    await verify(token, replay)
    with pytest.raises(InvalidClient, match="replayed"):
        await verify(token, replay)
    with pytest.raises(InvalidClient, match="replayed"):  # a new assertion reusing the jti is a replay too
        await verify(assertion(jti="once-only"), replay)
    keys = await redis_client.keys("fhir-bridge:auth:jti:*")
    assert len(keys) == 1
    assert 0 < await redis_client.ttl(keys[0]) <= 240 + 30


async def test_the_same_jti_from_another_client_is_not_a_replay(replay: RedisReplayCache) -> None:
    await verify(assertion(jti="shared"), replay)
    other = assertion(OTHER_EC, iss="platform-b", sub="platform-b", jti="shared")
    assert (await verify(other, replay)).id == "platform-b"


async def test_a_refused_assertion_does_not_use_up_its_jti(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient):
        await verify(assertion(jti="kept", aud="https://elsewhere.test/token"), replay)
    assert (await verify(assertion(jti="kept"), replay)).id == "platform-a"


async def test_an_assertion_without_jti_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="jti"):
        await verify(assertion(jti=None), replay)


@pytest.mark.parametrize("kid", ["unknown-kid", None, "rsa-1"])  # rsa-1 exists, but not as an EC key
async def test_an_unknown_kid_is_refused(replay: RedisReplayCache, kid: str | None) -> None:
    with pytest.raises(InvalidClient, match="kid"):
        await verify(assertion(header={"kid": kid}), replay)


async def test_a_jku_header_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="jku"):
        await verify(assertion(header={"jku": "https://evil.test/jwks.json"}), replay)


@pytest.mark.parametrize(
    "changes",
    [{"iss": "someone-else", "sub": "someone-else"}, {"sub": "platform-b"}, {"iss": None},
     {"iss": "platform-b", "sub": "platform-b"}],  # platform-b exists, but this is platform-a's key
)
async def test_a_wrong_iss_or_sub_is_refused(replay: RedisReplayCache, changes: dict[str, Any]) -> None:
    with pytest.raises(InvalidClient):
        await verify(assertion(**changes), replay)


async def test_a_signature_by_another_key_under_a_registered_kid_is_refused(replay: RedisReplayCache) -> None:
    with pytest.raises(InvalidClient, match="signature"):
        await verify(assertion(OTHER_EC), replay)


async def test_a_tampered_assertion_is_refused(replay: RedisReplayCache) -> None:
    head, _, signature = assertion().split(".")
    forged = f"{head}.{b64(json.dumps(claims(exp=int(NOW) + 299)).encode())}.{signature}"
    with pytest.raises(InvalidClient, match="signature"):
        await verify(forged, replay)


async def test_refusals_do_not_echo_the_assertion(replay: RedisReplayCache) -> None:
    token = assertion(aud="https://elsewhere.test/token")
    with pytest.raises(InvalidClient) as refused:
        await verify(token, replay)
    assert token.split(".")[1] not in refused.value.message and "elsewhere" not in refused.value.message


# --- scopes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "allowed", "granted"),
    [
        ("system/DiagnosticReport.rs", ["system/DiagnosticReport.rs"], ("system/DiagnosticReport.rs",)),
        ("system/DiagnosticReport.cruds", ["system/DiagnosticReport.rs"], ("system/DiagnosticReport.rs",)),
        ("system/DiagnosticReport.r", ["system/*.cruds"], ("system/DiagnosticReport.r",)),
        ("system/*.rs", ["system/Task.r", "system/Bundle.rs"], ("system/Bundle.rs", "system/Task.r")),
        ("system/*.read", ["system/*.cruds"], ("system/*.rs",)),
        ("system/Task.write", ["system/Task.cruds"], ("system/Task.cud",)),
        ("system/Task.*", ["system/Task.read"], ("system/Task.rs",)),
        ("system/*.cruds", ["system/*.rs", "system/ServiceRequest.c"],
         ("system/*.rs", "system/ServiceRequest.c")),
        ("system/Task.sr", ["system/Task.cruds"], ()),  # letters out of order: not a SMART scope
        ("patient/Task.rs user/Task.rs openid launch", ["system/*.cruds"], ()),
        ("system/Observation.rs?category=vital-signs", ["system/*.cruds"], ()),
        ("system/AuditEvent.rs", ["system/DiagnosticReport.rs"], ()),
    ],
)
def test_granted_scopes_are_the_requested_ones_cut_to_the_registered_ones(
    requested: str, allowed: list[str], granted: tuple[str, ...]
) -> None:
    assert grant_scopes(requested, allowed) == granted


def context(*scopes: str) -> AccessContext:
    return AccessContext("c", "platform", "t", frozenset(scopes), "j")


def test_has_scope_follows_smart_v2_and_v1_semantics() -> None:
    report = context("system/DiagnosticReport.rs")
    assert has_scope(report, "DiagnosticReport", "r") and has_scope(report, "DiagnosticReport", "s")
    assert not has_scope(report, "DiagnosticReport", "c")
    assert not has_scope(report, "ServiceRequest", "r")
    everything = context("system/*.cruds")
    assert all(has_scope(everything, "AuditEvent", i) for i in "cruds")  # type: ignore[arg-type]
    v1 = context("system/Task.read", "system/ServiceRequest.write")
    assert has_scope(v1, "Task", "s") and not has_scope(v1, "Task", "u")
    assert has_scope(v1, "ServiceRequest", "c") and not has_scope(v1, "ServiceRequest", "r")
    assert parse_scope("patient/Task.rs") is None and parse_scope("system/Task.") is None


# --- access tokens -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> BridgeKeys:
    return BridgeKeys.load_or_create(tmp_path_factory.mktemp("data") / "keys")


def token_for(bridge: BridgeKeys, client: Client | None = None, scope: str = "system/*.rs", **kw: Any) -> str:
    client = client or REGISTRY.get("platform-a")
    assert client is not None
    response = issue_access_token(client, scope, signing_key=bridge, issuer="https://bridge.test",
                                  audience=FHIR_BASE, now=kw.pop("now", NOW), **kw)
    return str(response["access_token"])


def check(token: str, bridge: BridgeKeys, now: float = NOW, **kw: Any) -> AccessContext:
    return verify_access_token(token, keys=bridge, audience=kw.pop("audience", FHIR_BASE), now=now, **kw)


def test_an_access_token_carries_the_client_role_tenant_and_granted_scopes(bridge: BridgeKeys) -> None:
    client = REGISTRY.get("platform-a")
    assert client is not None
    response = issue_access_token(client, "system/*.rs system/ServiceRequest.c", signing_key=bridge,
                                  issuer="https://bridge.test", audience=FHIR_BASE, now=NOW)
    assert response["token_type"] == "bearer" and response["expires_in"] == 300
    assert response["scope"] == "system/DiagnosticReport.rs system/ServiceRequest.cr system/Task.rs"
    assert "refresh_token" not in response
    seen = check(response["access_token"], bridge)
    assert (seen.client_id, seen.role, seen.tenant, seen.reviewer) == ("platform-a", "platform", "hospital-a", None)
    assert seen.scopes == frozenset(response["scope"].split())
    header = json.loads(base64.urlsafe_b64decode(response["access_token"].split(".")[0] + "=="))
    assert header == {"alg": "ES384", "kid": bridge.kid, "typ": "at+jwt"}


def test_a_token_request_for_no_registered_scope_is_invalid_scope(bridge: BridgeKeys) -> None:
    with pytest.raises(InvalidScope):
        token_for(bridge, scope="system/AuditEvent.rs")


def test_an_access_token_lives_at_most_300_seconds(bridge: BridgeKeys) -> None:
    with pytest.raises(InvalidInput):
        token_for(bridge, lifetime_s=301)
    token = token_for(bridge, lifetime_s=60)
    check(token, bridge, now=NOW + 59)
    with pytest.raises(InvalidToken, match="expired"):
        check(token, bridge, now=NOW + 60)


def test_an_expired_access_token_is_refused(bridge: BridgeKeys) -> None:
    with pytest.raises(InvalidToken, match="expired"):
        check(token_for(bridge), bridge, now=NOW + 301)


def test_an_access_token_for_another_audience_is_refused(bridge: BridgeKeys) -> None:
    with pytest.raises(InvalidToken, match="not for this server"):
        check(token_for(bridge), bridge, audience="https://other.test/fhir")


def test_a_tampered_access_token_is_refused(bridge: BridgeKeys) -> None:
    head, body, signature = token_for(bridge).split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload.update(role="operator", scope="system/*.cruds", tenant="hospital-b")
    with pytest.raises(InvalidToken):
        check(f"{head}.{b64(json.dumps(payload).encode())}.{signature}", bridge)


def test_tokens_not_signed_es384_by_the_bridge_are_refused(bridge: BridgeKeys, tmp_path: Path) -> None:
    elsewhere = BridgeKeys.load_or_create(tmp_path / "keys")
    with pytest.raises(InvalidToken):
        check(token_for(elsewhere), bridge)
    body = json.loads(base64.urlsafe_b64decode(token_for(bridge).split(".")[1] + "=="))
    with pytest.raises(InvalidToken):
        check(unsigned({"alg": "none", "kid": bridge.kid, "typ": "at+jwt"}, body), bridge)
    head = {"alg": "HS256", "kid": bridge.kid, "typ": "at+jwt"}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}"
    mac = hmac.new(bridge.public_key.as_pem(), signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        check(f"{signing_input}.{b64(mac)}", bridge)


def test_a_client_assertion_is_not_an_access_token(bridge: BridgeKeys) -> None:
    with pytest.raises(InvalidToken):
        check(assertion(aud=FHIR_BASE), bridge)


@pytest.mark.parametrize("header", [{"typ": "JWT"}, {"typ": None}, {"kid": "another-key"}])
def test_a_jwt_the_bridge_signed_for_another_purpose_is_not_an_access_token(
    bridge: BridgeKeys, header: dict[str, Any]
) -> None:
    body = json.loads(base64.urlsafe_b64decode(token_for(bridge).split(".")[1] + "=="))
    head = {k: v for k, v in {"alg": "ES384", "kid": bridge.kid, "typ": "at+jwt", **header}.items() if v}
    other_use = jwt.encode(head, body, bridge.signing_key, algorithms=["ES384"], default_type=None)
    with pytest.raises(InvalidToken, match="not an access token"):
        check(other_use, bridge)


def test_a_certificate_bound_token_is_accepted_only_over_its_certificate(bridge: BridgeKeys) -> None:
    cert, other_cert = b"DER of the client certificate", b"DER of another certificate"
    bound = Client.from_dict(entry("platform-m", EC_KEY, cert_thumbprint=certificate_thumbprint(cert)))
    token = token_for(bridge, bound)
    assert check(token, bridge, cert_thumbprint=certificate_thumbprint(cert)).client_id == "platform-m"
    for presented in (None, certificate_thumbprint(other_cert)):
        with pytest.raises(InvalidToken, match="bound to a client certificate"):
            check(token, bridge, cert_thumbprint=presented)
    # an unbound client's token is fine over any connection
    assert check(token_for(bridge), bridge, cert_thumbprint=certificate_thumbprint(cert)).client_id == "platform-a"


def test_a_verified_token_is_remembered_but_every_other_check_still_runs(bridge: BridgeKeys) -> None:
    token = token_for(bridge, lifetime_s=60)
    assert check(token, bridge).client_id == "platform-a"
    assert bridge.verified_claims(token) is not None  # the next request skips only the ES384 verify
    with pytest.raises(InvalidToken, match="not for this server"):
        check(token, bridge, audience="https://other.test/fhir")
    head, body, signature = token.split(".")
    middle = len(signature) // 2
    forged = f"{head}.{body}.{signature[:middle]}{'A' if signature[middle] != 'A' else 'B'}{signature[middle + 1:]}"
    with pytest.raises(InvalidToken, match="does not verify"):
        check(forged, bridge)
    with pytest.raises(InvalidToken, match="expired"):
        check(token, bridge, now=NOW + 60)
    assert bridge.verified_claims(token) is None


def test_the_verified_tokens_memory_is_bounded(bridge: BridgeKeys) -> None:
    for n in range(10_050):
        bridge.remember_verified(f"token-{n}", {"exp": NOW + 300}, NOW)
    assert bridge.verified_claims("token-10049") is not None
    assert len(bridge._verified) <= 10_000


def test_a_reviewer_token_names_its_practitioner_role(bridge: BridgeKeys) -> None:
    reviewer = Client.from_dict(entry("dr-x", EC_KEY, role="reviewer", reviewer="pr-42",
                                      scopes=["system/Task.rs", "system/DiagnosticReport.c"]))
    seen = check(token_for(bridge, reviewer, scope="system/Task.rs system/DiagnosticReport.c"), bridge)
    assert (seen.role, seen.reviewer) == ("reviewer", "pr-42")
    assert has_scope(seen, "DiagnosticReport", "c") and not has_scope(seen, "DiagnosticReport", "r")


# --- keys, registry, discovery -----------------------------------------------------------------------------


def test_the_bridge_key_is_created_once_private_and_published_public(tmp_path: Path) -> None:
    keys = BridgeKeys.load_or_create(tmp_path / "keys")
    path = tmp_path / "keys" / BridgeKeys.FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert BridgeKeys.load_or_create(tmp_path / "keys").kid == keys.kid == keys.public_key.thumbprint()
    (published,) = keys.jwks()["keys"]
    assert "d" not in published
    assert published["kid"] == keys.kid and published["crv"] == "P-384" and published["alg"] == "ES384"


def test_smart_configuration_advertises_backend_services() -> None:
    document = smart_configuration(TOKEN_URL, jwks_uri=f"{FHIR_BASE}/.well-known/jwks.json",
                                   scopes_supported=("system/*.rs",))
    assert document["token_endpoint"] == TOKEN_URL
    assert document["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert document["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert document["grant_types_supported"] == ["client_credentials"]
    assert "client-confidential-asymmetric" in document["capabilities"]
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["scopes_supported"] == ["system/*.rs"]


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_keygen_then_add_then_authenticate(tmp_path: Path, replay: RedisReplayCache, alg: str) -> None:
    private_path, public_path = generate_client_keypair(tmp_path / "client", alg)  # type: ignore[arg-type]
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    registry_file = tmp_path / "clients.json"
    add_client(registry_file, "platform-new", "platform", public_path, ["system/Task.rs"], "hospital-z")
    registry = ClientRegistry.load(registry_file)
    token = make_client_assertion(json.loads(private_path.read_text()), client_id="platform-new",
                                  token_url=TOKEN_URL, now=NOW)
    client = await verify_client_assertion(token, token_url=TOKEN_URL, registry=registry, replay_cache=replay,
                                           now=NOW)
    assert (client.id, client.tenant, client.scopes) == ("platform-new", "hospital-z", ("system/Task.rs",))
    with pytest.raises(Conflict):
        add_client(registry_file, "platform-new", "platform", public_path, ["system/Task.rs"], "hospital-z")
    with pytest.raises(Conflict):
        generate_client_keypair(tmp_path / "client", alg)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"role": "admin"}, "role"),
        ({"tenant": ""}, "tenant"),
        ({"scopes": ["patient/*.rs"]}, "scopes"),
        ({"scopes": []}, "scopes"),
        ({"reviewer": "pr-1"}, "reviewer"),  # a platform client cannot name a PractitionerRole
        ({"cert_thumbprint": "short"}, "cert_thumbprint"),
        ({"jwks": {"keys": [EC_KEY.as_dict(private=True)]}}, "private"),
        ({"jwks": {"keys": [ECKey.generate_key("P-256", parameters={"kid": "p256"}).as_dict(private=False)]}}, "P-384"),
        ({"jwks": {"keys": [WEAK_RSA]}}, "2048"),
        ({"jwks": {"keys": [{**EC_KEY.as_dict(private=False), "kid": None}]}}, "kid"),
        ({"jwks": {"keys": [EC_KEY.as_dict(private=False), EC_KEY.as_dict(private=False)]}}, "unique"),
        ({"jwks": {"keys": [{**EC_KEY.as_dict(private=False), "alg": "HS256"}]}}, "alg"),
        ({"webhook": {"url": "http://platform.example/hooks", "secret": SECRET}}, "https"),
        ({"webhook": {"url": "https://user:pw@platform.example/hooks", "secret": SECRET}}, "credentials"),
        ({"webhook": {"url": "ftp://platform.example/hooks", "secret": SECRET}}, "http"),
        ({"webhook": {"url": "https://platform.example/hooks", "secret": "hunter2"}}, "whsec_"),
        ({"webhook": "https://platform.example/hooks"}, "webhook"),
    ],
)
@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")
def test_a_bad_registry_entry_is_refused(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem) as refused:
        Client.from_dict({**entry("c1", EC_KEY), **change})
    assert str(EC_KEY.as_dict(private=True)["d"]) not in refused.value.message


def test_a_webhook_gets_a_fresh_secret_kept_private_and_can_be_removed(tmp_path: Path) -> None:
    from fhir_bridge.adapters.clients import set_webhook
    from fhir_bridge.adapters.webhooks import HttpWebhooks

    path = tmp_path / "clients.json"
    path.write_text(json.dumps([entry("platform-a", EC_KEY)]))
    first = set_webhook(path, "platform-a", "https://platform.example/hooks")
    second = set_webhook(path, "platform-a", "http://127.0.0.1:9/hooks")  # loopback may be plain http
    assert first and second and first != second and first.startswith("whsec_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = ClientRegistry.load(path).get("platform-a")
    assert client is not None and (client.webhook_url, client.webhook_secret) == ("http://127.0.0.1:9/hooks", second)
    assert second not in repr(client)
    target = HttpWebhooks(ClientRegistry.load(path)).target("platform-a")
    assert target is not None and target.url == "http://127.0.0.1:9/hooks" and second not in repr(target)
    assert set_webhook(path, "platform-a", None) is None
    assert ClientRegistry.load(path).get("platform-a").webhook_url is None  # type: ignore[union-attr]
    with pytest.raises(InvalidInput, match="not registered"):
        set_webhook(path, "nobody", "https://platform.example/hooks")


def test_the_registry_file_is_checked_whole(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps([entry("a", EC_KEY), entry("a", RSA_KEY)]))
    with pytest.raises(InvalidInput, match="twice"):
        ClientRegistry.load(path)
    with pytest.raises(InvalidInput, match="not found"):
        ClientRegistry.load(tmp_path / "missing.json")
    assert len(ClientRegistry.load(tmp_path / "missing.json", missing_ok=True)) == 0

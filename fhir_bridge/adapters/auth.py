"""The bridge as a SMART Backend Services authorization server (SMART App Launch 2.2).

* token requests (backend-services.html "Obtain access token"): ``client_credentials`` with a
  ``private_key_jwt`` client assertion (client-confidential-asymmetric.html "Signature Verification"),
  signed RS384 or ES384 and nothing else, by a key of the client's registered JWK Set picked by ``kid``;
* access tokens: JWTs (RFC 9068 ``typ: at+jwt``) signed ES384 by the bridge's own P-384 key, at most 300 s,
  optionally bound to the client's TLS certificate (RFC 8705 §3, ``cnf.x5t#S256``);
* discovery: the ``.well-known/smart-configuration`` document (conformance.html "Metadata").

Every refusal is an :class:`OAuthError` (RFC 6749 §5.2 codes) or :class:`InvalidToken` (RFC 6750 §3.1). SMART
asks for ``invalid_client`` on any failure to authenticate the assertion, so expired, replayed or mis-addressed
assertions all answer that, never ``invalid_grant``. Messages say what is wrong, never what a token held.
Registered clients (and the keys they sign with) live in :mod:`fhir_bridge.adapters.clients`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from redis.asyncio import Redis

from fhir_bridge.access.scopes import ROLES, AccessContext, Role, grant_scopes, has_scope, within_ceiling
from fhir_bridge.adapters import key_files
from fhir_bridge.adapters.clients import (
    ASSERTION_ALGORITHMS,
    Client,
    ClientRegistry,
    add_client,
    certificate_thumbprint,
    generate_client_keypair,
    make_client_assertion,
)
from fhir_bridge.errors import InvalidInput, Unauthenticated

__all__ = [
    "ASSERTION_ALGORITHMS", "AccessContext", "BridgeKeys", "Client", "ClientRegistry", "InvalidClient",
    "InvalidScope", "InvalidToken", "OAuthError", "RedisReplayCache", "ReplayCache", "TokenRequest",
    "UnsupportedGrantType", "add_client", "certificate_thumbprint", "generate_client_keypair", "has_scope",
    "issue_access_token", "make_client_assertion", "oauth_error_body", "read_token_request",
    "smart_configuration", "verify_access_token", "verify_client_assertion",
]

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300  # client-confidential-asymmetric.html: exp "no more than five minutes in the future"
MAX_TOKEN_LIFETIME_S = 300  # backend-services.html: expires_in "SHOULD NOT exceed 300"
CLOCK_SKEW_S = 30  # tolerated difference between the client's clock and ours, for exp/iat/nbf
BRIDGE_ALGORITHM = "ES384"
AT_JWT_TYPE = "at+jwt"
_MAX_JWT_CHARS = 8192
_VERIFIED_TOKENS = 10_000  # tokens remembered as verified per key (about 10 MB at most)


class OAuthError(Unauthenticated):
    """A token request refused; ``code`` is the RFC 6749 §5.2 ``error`` the token endpoint answers."""

    code: ClassVar[str] = "invalid_request"


class InvalidClient(OAuthError):
    """The client could not be authenticated (HTTP 401 at the token endpoint)."""

    code = "invalid_client"


class InvalidScope(OAuthError):
    code = "invalid_scope"


class UnsupportedGrantType(OAuthError):
    code = "unsupported_grant_type"


class InvalidToken(Unauthenticated):
    """An access token refused at a FHIR endpoint (RFC 6750 §3.1; ``WWW-Authenticate: Bearer error=…``)."""

    code = "invalid_token"


def oauth_error_body(error: OAuthError) -> dict[str, str]:
    """The JSON body of a refused token request (RFC 6749 §5.2)."""
    return {"error": error.code, "error_description": error.message}


class ReplayCache(Protocol):
    async def remember(self, jti: str, ttl_s: int) -> bool:
        """Record ``jti`` for ``ttl_s`` seconds; False when it was already recorded (a replay)."""
        ...


class RedisReplayCache:
    """:class:`ReplayCache` shared by every API process: ``SET key 1 NX EX ttl`` (atomic first-writer-wins)."""

    def __init__(self, redis: Redis, prefix: str = "fhir-bridge:") -> None:
        self._redis = redis
        self._prefix = prefix

    async def remember(self, jti: str, ttl_s: int) -> bool:
        # hashed: the jti is the client's free text, the key stays short and printable
        key = f"{self._prefix}auth:jti:{hashlib.sha256(jti.encode()).hexdigest()}"
        return bool(await self._redis.set(key, b"1", nx=True, ex=max(1, int(ttl_s))))


@dataclass(frozen=True)
class TokenRequest:
    """The parts of a token request form that matter once its shape is checked."""

    assertion: str
    scope: str


def read_token_request(form: Mapping[str, str]) -> TokenRequest:
    """Check a token request's form fields (backend-services.html "Request") before any cryptography."""
    if form.get("grant_type") != "client_credentials":
        raise UnsupportedGrantType("grant_type must be client_credentials")
    assertion = form.get("client_assertion") or ""
    if form.get("client_assertion_type") != JWT_BEARER or not assertion:
        raise InvalidClient(f"authenticate with client_assertion_type={JWT_BEARER} and a client_assertion")
    scope = (form.get("scope") or "").strip()
    if not scope:
        raise InvalidScope("scope is required")
    return TokenRequest(assertion, scope)


async def verify_client_assertion(
    assertion: str, *, token_url: str, registry: ClientRegistry, replay_cache: ReplayCache, now: float
) -> Client:
    """Authenticate a client by its signed assertion (RFC 7523 §3 with SMART's rules); InvalidClient if not.

    Checked in this order, the replay last so an assertion that fails anything else never uses up its jti:
    shape and header (alg in :data:`ASSERTION_ALGORITHMS`, a ``kid``, no ``jku`` since we register no JWK Set
    URLs), a registered client named by ``iss``, the key with that ``kid`` and a matching key type, the
    signature, ``iss == sub``, ``aud`` = the token URL, ``exp`` in the future and at most five minutes away,
    ``jti`` present, then never seen before for that client.
    """
    if not assertion:
        raise InvalidClient("no client assertion")
    if len(assertion) > _MAX_JWT_CHARS:
        raise InvalidClient("the client assertion is too large")
    try:
        unverified = jws.extract_compact(assertion.encode("ascii"))
        header = unverified.headers()
        issuer = json.loads(unverified.payload).get("iss")
    except (JoseError, ValueError, AttributeError, UnicodeError):
        raise InvalidClient("the client assertion is not a JWT") from None
    alg = header.get("alg")
    if alg not in ASSERTION_ALGORITHMS:
        raise InvalidClient(f"the client assertion must be signed with {' or '.join(ASSERTION_ALGORITHMS)}")
    if str(header.get("typ", "JWT")).upper() != "JWT" or "jku" in header:
        raise InvalidClient("the client assertion header has an unexpected typ or a jku")
    kid = header.get("kid")
    client = registry.get(issuer) if isinstance(issuer, str) else None
    if client is None:
        raise InvalidClient("unknown client")
    key = client.verification_key(kid, alg) if isinstance(kid, str) else None
    if key is None:
        raise InvalidClient("no registered key of this client matches the assertion's kid and alg")
    try:
        claims = jwt.decode(assertion, key, algorithms=[alg]).claims
    except (JoseError, ValueError):
        raise InvalidClient("the client assertion signature does not verify") from None
    if claims.get("iss") != client.id or claims.get("sub") != client.id:
        raise InvalidClient("the client assertion's iss and sub must both be the client id")
    if not _audience_matches(claims.get("aud"), token_url):
        raise InvalidClient("the client assertion's aud must be the token URL")
    exp = claims.get("exp")
    if not _is_number(exp):
        raise InvalidClient("the client assertion has no exp")
    if exp <= now:
        raise InvalidClient("the client assertion has expired")
    if exp > now + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
        raise InvalidClient("the client assertion's exp is more than five minutes ahead")
    for early in ("nbf", "iat"):
        if early in claims and (not _is_number(claims[early]) or claims[early] > now + CLOCK_SKEW_S):
            raise InvalidClient(f"the client assertion's {early} is in the future")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= 256:
        raise InvalidClient("the client assertion has no jti")
    # client-confidential-asymmetric.html: a jti is unique per iss over the assertion lifetime
    if not await replay_cache.remember(f"{client.id}\x00{jti}", int(exp - now) + CLOCK_SKEW_S):
        raise InvalidClient("the client assertion was already used (replayed jti)")
    return client


class BridgeKeys:
    """The bridge's own EC P-384 signing key; its id is the RFC 7638 thumbprint of the public key."""

    FILE_NAME = "bridge-signing-key.pem"

    def __init__(self, private_pem: bytes) -> None:
        key = ECKey.import_key(private_pem)
        if key.curve_name != "P-384" or not key.is_private:
            raise InvalidInput("the bridge signing key must be an EC P-384 private key")
        self.kid = key.thumbprint()
        params = {"kid": self.kid, "use": "sig", "alg": BRIDGE_ALGORITHM}
        self.signing_key = ECKey.import_key(key.as_dict(private=True), parameters=params)  # type: ignore[arg-type]
        self.public_key = ECKey.import_key(key.as_dict(private=False), parameters=params)  # type: ignore[arg-type]
        # Tokens whose header and ES384 signature this key has verified, with their claims. A P-384 verify was
        # the largest single cost of an API read (BENCHMARKS.md part 3); a client reuses its token for minutes.
        # Only the signature check is skipped on a hit: expiry, audience and certificate binding are checked on
        # every request, and a token differing by one byte is another key here.
        self._verified: dict[str, dict[str, Any]] = {}

    def verified_claims(self, token: str) -> dict[str, Any] | None:
        """The claims of ``token`` if this key verified its signature before, else None."""
        return self._verified.get(token)

    def remember_verified(self, token: str, claims: dict[str, Any], now: float) -> None:
        """Remember a token whose signature verified; bounded (expired ones go first, then the oldest)."""
        if len(self._verified) >= _VERIFIED_TOKENS:
            for old in [t for t, c in self._verified.items() if not _is_number(c.get("exp")) or c["exp"] <= now]:
                del self._verified[old]
            for old in list(self._verified)[: max(0, len(self._verified) - _VERIFIED_TOKENS // 2)]:
                del self._verified[old]
        self._verified[token] = claims

    def forget_verified(self, token: str) -> None:
        self._verified.pop(token, None)

    @classmethod
    def load_or_create(cls, keys_dir: Path) -> BridgeKeys:
        """The key under ``keys_dir`` (``<data_dir>/keys``), created (0600) on first use."""
        path = keys_dir / cls.FILE_NAME
        if not path.exists():
            pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            key_files.create_once(path, pem)
        return cls(path.read_bytes())

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set to publish (``jwks_uri``): what verifies the bridge's tokens and signatures."""
        return {"keys": [self.public_key.as_dict(private=False)]}


def issue_access_token(
    client: Client, requested_scopes: str, *, signing_key: BridgeKeys, issuer: str, audience: str,
    lifetime_s: int = MAX_TOKEN_LIFETIME_S, now: float, ceilings: Mapping[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The token response for an authenticated client (backend-services.html "Issue Access Token").

    The scopes granted are those requested, cut down to the client's registered scopes and to what its role
    may ever hold (``ceilings``, ``config/roles.json``); InvalidScope if nothing is left. No refresh token
    (backend-services.html: "Refresh tokens SHOULD NOT be issued").
    """
    if not 0 < lifetime_s <= MAX_TOKEN_LIFETIME_S:
        raise InvalidInput(f"an access token lives at most {MAX_TOKEN_LIFETIME_S} seconds")
    allowed = within_ceiling(client.role, client.scopes, ceilings) if ceilings is not None else client.scopes
    granted = grant_scopes(requested_scopes, allowed)
    if not granted:
        raise InvalidScope("none of the requested scopes is granted to this client")
    scope = " ".join(granted)
    issued = int(now)
    claims: dict[str, Any] = {
        "iss": issuer, "sub": client.id, "client_id": client.id, "aud": audience, "iat": issued,
        "exp": issued + lifetime_s, "jti": secrets.token_urlsafe(18), "scope": scope, "role": client.role,
        "tenant": client.tenant,
    }
    if client.reviewer:
        claims["reviewer"] = client.reviewer
    if client.cert_thumbprint:
        claims["cnf"] = {"x5t#S256": client.cert_thumbprint}
    header = {"alg": BRIDGE_ALGORITHM, "kid": signing_key.kid, "typ": AT_JWT_TYPE}
    token = jwt.encode(header, claims, signing_key.signing_key, algorithms=[BRIDGE_ALGORITHM])
    return {"access_token": token, "token_type": "bearer", "expires_in": lifetime_s, "scope": scope}


def verify_access_token(
    token: str, *, keys: BridgeKeys, audience: str, now: float, cert_thumbprint: str | None = None
) -> AccessContext:
    """The caller behind a bearer token the bridge issued; InvalidToken for anything else.

    ES384 by the bridge key only, ``typ: at+jwt``, not expired, for this ``audience``; a token bound to a
    certificate (``cnf.x5t#S256``) is accepted only over a TLS connection presenting that certificate,
    whose SHA-256 thumbprint (:func:`certificate_thumbprint`) the caller passes as ``cert_thumbprint``.
    """
    if not token or len(token) > _MAX_JWT_CHARS:
        raise InvalidToken("no usable access token")
    claims = keys.verified_claims(token)
    if claims is None:
        try:
            header = jws.extract_compact(token.encode("ascii")).headers()
            if header.get("typ") != AT_JWT_TYPE or header.get("kid") != keys.kid:
                raise InvalidToken("not an access token issued by this bridge")
            claims = dict(jwt.decode(token, keys.public_key, algorithms=[BRIDGE_ALGORITHM]).claims)
        except (JoseError, ValueError, UnicodeError):
            raise InvalidToken("the access token signature does not verify") from None
        keys.remember_verified(token, claims, now)
    exp = claims.get("exp")
    if not _is_number(exp) or exp <= now:
        keys.forget_verified(token)
        raise InvalidToken("the access token has expired")
    if not _audience_matches(claims.get("aud"), audience):
        raise InvalidToken("the access token is not for this server")
    cnf = claims.get("cnf")
    bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
    if bound is not None and (cert_thumbprint is None or not hmac.compare_digest(str(bound), cert_thumbprint)):
        raise InvalidToken("the access token is bound to a client certificate this connection did not present")
    fields = [claims.get(name) for name in ("sub", "role", "tenant", "scope", "jti")]
    if not all(isinstance(value, str) for value in fields) or claims["role"] not in ROLES:
        raise InvalidToken("the access token lacks the bridge's claims")
    reviewer = claims.get("reviewer")
    return AccessContext(
        client_id=claims["sub"], role=cast(Role, claims["role"]), tenant=claims["tenant"],
        scopes=frozenset(claims["scope"].split()), jti=claims["jti"],
        reviewer=reviewer if isinstance(reviewer, str) else None, expires_at=float(exp),
    )


def smart_configuration(
    token_url: str, *, jwks_uri: str | None = None, scopes_supported: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The ``[base]/.well-known/smart-configuration`` document (SMART 2.2 conformance.html "Metadata").

    Backend services only: no ``authorization_endpoint`` (required only with launch-ehr/standalone), no
    ``issuer`` (required only with sso-openid-connect). ``code_challenge_methods_supported`` is REQUIRED by
    2.2 whatever the capabilities, hence ``S256`` although no authorization-code flow is offered.
    """
    document: dict[str, Any] = {
        "token_endpoint": token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        "code_challenge_methods_supported": ["S256"],
    }
    if jwks_uri:
        document["jwks_uri"] = jwks_uri
    if scopes_supported:
        document["scopes_supported"] = list(scopes_supported)
    return document


def _audience_matches(aud: object, expected: str) -> bool:
    return aud == expected or (isinstance(aud, list) and expected in aud and all(isinstance(a, str) for a in aud))


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN

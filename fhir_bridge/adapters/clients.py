"""Registered clients of the bridge, their public keys, and the client side of ``private_key_jwt``.

The registry is a JSON file (its path comes from the settings), a list of clients::

    [{"id": "platform-a", "role": "platform", "tenant": "hospital-a",
      "scopes": ["system/ServiceRequest.c", "system/DiagnosticReport.rs"],
      "jwks": {"keys": [{"kty": "EC", "crv": "P-384", "kid": "…", "x": "…", "y": "…"}]},
      "reviewer": "PractitionerRole id, reviewers only (optional)",
      "cert_thumbprint": "base64url SHA-256 of the client's DER certificate (optional: binds its tokens)"}]

SMART client-confidential-asymmetric.html "Registering a client": each JWK has ``kty`` and a ``kid`` unique in
its set, public members only. We accept only keys that can verify an allowed algorithm: RSA of 2048 bits or
more for RS384, EC P-384 for ES384. The file is checked whole when loaded: one bad entry and the bridge
refuses to start rather than run with a client silently missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, Key, RSAKey

from fhir_bridge.access import ROLES, Role, load_role_ceilings, parse_scope, within_ceiling
from fhir_bridge.adapters import key_files
from fhir_bridge.errors import Conflict, InvalidInput

#: the only algorithms a client assertion may use (SMART: RS384 and ES384)
ASSERTION_ALGORITHMS = ("RS384", "ES384")
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")
_THUMBPRINT = re.compile(r"[A-Za-z0-9_-]{43}")
_PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@dataclass(frozen=True)
class Client:
    """One registered client: who it is (role, tenant), what it may ask for, how it proves itself."""

    id: str
    role: Role
    tenant: str
    scopes: tuple[str, ...]
    jwks: Mapping[str, Any] = field(repr=False)
    reviewer: str | None = None
    cert_thumbprint: str | None = None

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Client:
        """A client from its registry entry; InvalidInput naming the problem (never a key) if it is wrong."""
        if not isinstance(entry, Mapping):
            raise InvalidInput("a client registry entry must be a JSON object")
        client_id = entry.get("id")
        if not isinstance(client_id, str) or not _NAME.fullmatch(client_id):
            raise InvalidInput("a client id is 1-128 characters [A-Za-z0-9._:-]")
        where = f"client {client_id}: "
        role, tenant, scopes = entry.get("role"), entry.get("tenant"), entry.get("scopes")
        if role not in ROLES:
            raise InvalidInput(where + f"role must be one of {', '.join(sorted(ROLES))}")
        if not isinstance(tenant, str) or not _NAME.fullmatch(tenant):
            raise InvalidInput(where + "tenant is 1-128 characters [A-Za-z0-9._:-]")
        if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) and parse_scope(s) for s in scopes):
            raise InvalidInput(where + "scopes must be a non-empty list of system/ scopes (e.g. system/Task.rs)")
        reviewer, thumbprint = entry.get("reviewer"), entry.get("cert_thumbprint")
        if reviewer is not None and (role != "reviewer" or not isinstance(reviewer, str)
                                     or not _FHIR_ID.fullmatch(reviewer)):
            raise InvalidInput(where + "reviewer is a PractitionerRole id, for reviewer clients only")
        if thumbprint is not None and (not isinstance(thumbprint, str) or not _THUMBPRINT.fullmatch(thumbprint)):
            raise InvalidInput(where + "cert_thumbprint is the base64url SHA-256 of the certificate (43 characters)")
        jwks = entry.get("jwks")
        _check_jwks(jwks, where)
        return cls(id=client_id, role=cast(Role, role), tenant=tenant, scopes=tuple(scopes),
                   jwks=cast(Mapping[str, Any], jwks), reviewer=reviewer, cert_thumbprint=thumbprint)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self.id, "role": self.role, "tenant": self.tenant,
                                 "scopes": list(self.scopes), "jwks": dict(self.jwks)}
        if self.reviewer:
            entry["reviewer"] = self.reviewer
        if self.cert_thumbprint:
            entry["cert_thumbprint"] = self.cert_thumbprint
        return entry

    def verification_key(self, kid: str, alg: str) -> Key | None:
        """The one registered key with this ``kid`` whose type fits ``alg`` (SMART "Signature Verification"
        step 3), or None: no match, or an algorithm outside :data:`ASSERTION_ALGORITHMS`."""
        wanted = {"RS384": "RSA", "ES384": "EC"}.get(alg)
        matches = [jwk for jwk in self.jwks["keys"] if jwk.get("kid") == kid and jwk.get("kty") == wanted]
        return JWKRegistry.import_key(matches[0]) if len(matches) == 1 else None


class ClientRegistry:
    """The registered clients by id."""

    def __init__(self, clients: Iterable[Client] = ()) -> None:
        self._clients: dict[str, Client] = {}
        for client in clients:
            if client.id in self._clients:
                raise InvalidInput(f"client {client.id} is registered twice")
            self._clients[client.id] = client

    @classmethod
    def load(cls, path: Path, *, missing_ok: bool = False) -> ClientRegistry:
        """Read and check the registry file; an absent file is an empty registry only with ``missing_ok``."""
        try:
            document = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            if missing_ok:
                return cls()
            raise InvalidInput(f"client registry not found: {path}") from None
        except ValueError:
            raise InvalidInput(f"the client registry {path} is not JSON") from None
        if not isinstance(document, list):
            raise InvalidInput(f"the client registry {path} must be a JSON list of clients")
        return cls(Client.from_dict(entry) for entry in document)

    def get(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    def __iter__(self) -> Iterator[Client]:
        return iter(self._clients.values())

    def __len__(self) -> int:
        return len(self._clients)


def add_client(
    path: Path, id: str, role: str, jwks_file: Path, scopes: Sequence[str], tenant: str, *,
    reviewer: str | None = None, cert_thumbprint: str | None = None,
) -> Client:
    """Register a client in the registry file at ``path`` (created if absent); Conflict if the id is taken.

    ``jwks_file`` holds the client's public JWK Set (or a single public JWK). For ``fhir-bridge clients add``.
    """
    try:
        jwks = json.loads(Path(jwks_file).read_bytes())
    except (OSError, ValueError):
        raise InvalidInput(f"cannot read a JWK Set from {jwks_file}") from None
    if isinstance(jwks, dict) and "keys" not in jwks and "kty" in jwks:
        jwks = {"keys": [jwks]}
    client = Client.from_dict({"id": id, "role": role, "tenant": tenant, "scopes": list(scopes), "jwks": jwks,
                               "reviewer": reviewer, "cert_thumbprint": cert_thumbprint})
    ceilings = load_role_ceilings()
    beyond = [s for s in client.scopes if within_ceiling(client.role, [s], ceilings) != (str(parse_scope(s)),)]
    if beyond:  # registering more than the role may hold would only mislead: tokens are cut to the ceiling anyway
        raise InvalidInput(f"a {client.role} client can not hold {', '.join(beyond)} (config/roles.json gives a "
                           f"{client.role} at most: {' '.join(ceilings[client.role])})")
    registry = ClientRegistry.load(path, missing_ok=True)
    if registry.get(id) is not None:
        raise Conflict(f"client {id} is already registered")
    entries = [c.to_dict() for c in registry] + [client.to_dict()]
    key_files.replace(Path(path), json.dumps(entries, indent=2).encode() + b"\n")
    return client


def certificate_thumbprint(der_certificate: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (unpadded) SHA-256 of the DER certificate."""
    return base64.urlsafe_b64encode(hashlib.sha256(der_certificate).digest()).decode().rstrip("=")


def generate_client_keypair(out_dir: Path, alg: Literal["ES384", "RS384"] = "ES384") -> tuple[Path, Path]:
    """Write a new client key pair into ``out_dir``: the private JWK (0600) and the public JWK Set to register.

    ``kid`` is the RFC 7638 thumbprint. Refuses to overwrite (Conflict). For ``fhir-bridge clients keygen``.
    """
    key: Key = ECKey.generate_key("P-384") if alg == "ES384" else RSAKey.generate_key(2048)
    params = {"kid": key.thumbprint(), "alg": alg, "use": "sig"}
    private_path, public_path = Path(out_dir) / "client-private.jwk.json", Path(out_dir) / "client-public.jwks.json"
    for target in (private_path, public_path):
        if target.exists():
            raise Conflict(f"{target} already exists; choose another directory")
    private = {**key.as_dict(private=True), **params}
    public = {"keys": [{**key.as_dict(private=False), **params}]}
    key_files.create_once(private_path, json.dumps(private, indent=2).encode() + b"\n")
    key_files.create_once(public_path, json.dumps(public, indent=2).encode() + b"\n")
    return private_path, public_path


def make_client_assertion(private_jwk: Mapping[str, Any], *, client_id: str, token_url: str, now: float,
                          lifetime_s: int = 240) -> str:
    """A one-time client assertion (the client side: demo, tests, outbound calls to a SMART source)."""
    key = JWKRegistry.import_key(dict(private_jwk))
    alg = private_jwk.get("alg") or ("ES384" if private_jwk.get("kty") == "EC" else "RS384")
    header = {"alg": alg, "kid": private_jwk["kid"], "typ": "JWT"}
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": int(now),
              "exp": int(now) + lifetime_s, "jti": secrets.token_urlsafe(18)}
    return jwt.encode(header, claims, key, algorithms=[alg])


def _check_jwks(jwks: object, where: str) -> None:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise InvalidInput(where + 'jwks must be a JWK Set: {"keys": [...]} with at least one key')
    kids = [jwk.get("kid") if isinstance(jwk, dict) else None for jwk in jwks["keys"]]
    if not all(isinstance(kid, str) and kid for kid in kids) or len(set(kids)) != len(kids):
        raise InvalidInput(where + "every key needs a kid, unique in the set")
    for jwk in jwks["keys"]:
        if _PRIVATE_MEMBERS & set(jwk):
            raise InvalidInput(where + "the JWK Set holds private or symmetric key material; register public keys")
        if jwk.get("alg") not in (None, *ASSERTION_ALGORITHMS) or jwk.get("use") not in (None, "sig"):
            raise InvalidInput(where + f"key {jwk['kid']}: alg must be RS384 or ES384 and use sig")
        try:
            key = JWKRegistry.import_key(jwk)
        except (JoseError, ValueError, TypeError, KeyError):
            raise InvalidInput(where + f"key {jwk['kid']} is not a valid JWK") from None
        fits = (isinstance(key, ECKey) and key.curve_name == "P-384") or (
            isinstance(key, RSAKey) and key.public_key.key_size >= 2048)
        if not fits:
            raise InvalidInput(where + f"key {jwk['kid']} must be EC P-384 (ES384) or RSA of 2048 bits or more")

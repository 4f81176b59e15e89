"""The bridge's signing key: ES384 detached JWS (RFC 7515 appendix F) for audit checkpoints, export manifests
and case bundles.

Written on ``cryptography`` alone because all we need is one algorithm in compact detached form: the JWS
header is ``{"alg":"ES384","kid":<thumbprint>}``, the signing input ``b64url(header) "." b64url(payload)``,
the serialisation ``b64url(header) ".." b64url(r || s)`` (RFC 7518 §3.4: r and s as 48-byte big-endian
integers, not DER). The key id is the key's RFC 7638 JWK thumbprint, so a verifier holding the public JWK
needs no registry. Verification refuses any other ``alg`` (no ``none``, no HMAC confusion) and any ``crit``.

Case bundles are too large to base64url-encode before signing (a case can hold 2 GB of attachments), so they
use the unencoded-payload option of RFC 7797: the header is ``{"alg":"ES384","b64":false,"crit":["b64"],
"kid":…,"sigT":…}`` and the signing input is ``b64url(header) "." payload`` with the payload's raw bytes, which
:class:`UnencodedJws` hashes (SHA-384) as they stream by and signs as a pre-computed digest. ``sigT`` is the
claimed signing time of JAdES (ETSI TS 119 182-1 §5.2.1), so the time a verifier reports is itself signed.
These signatures are deterministic ECDSA (RFC 6979): the same payload, time and key give the same bytes,
whether the payload was fed whole or in pieces. :meth:`JwsVerifier.verify` keeps refusing ``crit`` (audit
signatures never use it); :meth:`JwsVerifier.verify_unencoded` accepts exactly that header and nothing else.

The key lives in ``<data_dir>/keys/audit-signing.pem`` (PKCS#8, mode 0600), created on first use; the public
JWK is written next to it (``audit-signing.jwk.json``) for auditors who verify exports offline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature, encode_dss_signature

from fhir_bridge.errors import BridgeError

ALG = "ES384"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_COORD = 48  # P-384 coordinates and signature halves are 48 bytes
_UNENCODED_MEMBERS = frozenset({"alg", "b64", "crit", "kid", "sigT"})
KEY_FILE = "audit-signing.pem"
JWK_FILE = "audit-signing.jwk.json"


class SigningKeyError(BridgeError):
    """The signing key cannot be read, or is not a P-384 key."""

    code = "signing-key"


class JwsVerifier:
    """Verifies detached ES384 JWS against one or more public JWKs, chosen by ``kid`` (rotation keeps old keys)."""

    def __init__(self, jwks: Iterable[Mapping[str, Any]]) -> None:
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in jwks:
            key = _public_key(jwk)
            self._keys[thumbprint(key)] = key

    @property
    def key_ids(self) -> frozenset[str]:
        return frozenset(self._keys)

    @classmethod
    def from_file(cls, path: Path) -> JwsVerifier:
        """From a JSON file holding a JWK or a JWK Set (``{"keys": [...]}``)."""
        data = json.loads(Path(path).read_bytes())
        return cls(data.get("keys", [data]))

    def verify(self, payload: bytes, signature: str) -> bool:
        try:
            header_b64, empty, sig_b64 = signature.split(".")
            header = json.loads(_unb64(header_b64))
            raw = _unb64(sig_b64)
        except ValueError:
            return False
        key = self._keys.get(str(header.get("kid"))) if isinstance(header, dict) else None
        if empty or key is None or header.get("alg") != ALG or "crit" in header or len(raw) != 2 * _COORD:
            return False
        r, s = int.from_bytes(raw[:_COORD], "big"), int.from_bytes(raw[_COORD:], "big")
        try:
            key.verify(encode_dss_signature(r, s), _signing_input(header_b64, payload), ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return False
        return True

    def verify_unencoded(self, payload: Iterable[bytes], signature: str) -> bool:
        """Verify a detached RFC 7797 JWS (``b64: false``) over ``payload``, read piece by piece.

        The header must be exactly ``alg`` ES384, ``b64`` false, ``crit`` ["b64"], a known ``kid`` and a
        ``sigT`` string: any other algorithm (``none`` included), member or critical extension is refused.
        """
        parsed = unencoded_header(signature)
        if parsed is None:
            return False
        header_b64, header, raw = parsed
        key = self._keys.get(header["kid"])
        if key is None:
            return False
        digest = hashes.Hash(hashes.SHA384())
        digest.update(header_b64.encode("ascii") + b".")
        for piece in payload:
            digest.update(piece)
        r, s = int.from_bytes(raw[:_COORD], "big"), int.from_bytes(raw[_COORD:], "big")
        try:
            key.verify(encode_dss_signature(r, s), digest.finalize(), ec.ECDSA(Prehashed(hashes.SHA384())))
        except InvalidSignature:
            return False
        return True


class Es384Signer(JwsVerifier):
    """Signs with a P-384 private key; verifies with its public half (see the module docstring for the format)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key.curve, ec.SECP384R1):
            raise SigningKeyError("the audit signing key must be an EC P-384 key (ES384)")
        self._private = private_key
        self.key_id = thumbprint(private_key.public_key())
        super().__init__([self.public_jwk()])

    def sign(self, payload: bytes) -> str:
        header = _b64(json.dumps({"alg": ALG, "kid": self.key_id}, separators=(",", ":")).encode())
        der = self._private.sign(_signing_input(header, payload), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return f"{header}..{_b64(r.to_bytes(_COORD, 'big') + s.to_bytes(_COORD, 'big'))}"

    def payload_signer(self, signed_at: str) -> UnencodedJws:
        """A streaming signer for one payload (RFC 7797 ``b64: false``), claiming ``signed_at`` (RFC 3339 UTC)."""
        return UnencodedJws(self._private, self.key_id, signed_at)

    def sign_unencoded(self, payload: bytes, signed_at: str) -> str:
        """The same JWS as :meth:`payload_signer` fed ``payload`` at once, computed the plain way (for tests
        and small payloads)."""
        header = _unencoded_header_b64(self.key_id, signed_at)
        der = self._private.sign(header.encode("ascii") + b"." + payload,
                                 ec.ECDSA(hashes.SHA384(), deterministic_signing=True))
        return f"{header}..{_raw_signature(der)}"

    def public_jwk(self) -> dict[str, str]:
        """The public key as a JWK (RFC 7517) with its ``kid``, ``alg`` and ``use``."""
        return {**_jwk_members(self._private.public_key()), "kid": self.key_id, "alg": ALG, "use": "sig"}

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (the file is protected by its mode and the data directory)."""
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, pem: bytes) -> Es384Signer:
        """From an unencrypted PKCS#8 PEM P-384 key (e.g. the bridge's token-signing key, to sign with one key)."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SigningKeyError(f"cannot read the signing key: {type(exc).__name__}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SigningKeyError("the audit signing key must be an EC P-384 key (ES384)")
        return cls(key)

    @classmethod
    def generate(cls) -> Es384Signer:
        return cls(ec.generate_private_key(ec.SECP384R1()))


class UnencodedJws:
    """One detached ES384 JWS with an unencoded payload (RFC 7797), computed over a payload fed in pieces.

    Memory stays constant whatever the payload size: only the SHA-384 state is kept, and the digest is signed
    with ``Prehashed`` (deterministic ECDSA, RFC 6979).
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, key_id: str, signed_at: str) -> None:
        self._private = private_key
        self.header_b64 = _unencoded_header_b64(key_id, signed_at)
        self._digest = hashes.Hash(hashes.SHA384())
        self._digest.update(self.header_b64.encode("ascii") + b".")

    def update(self, data: bytes) -> None:
        self._digest.update(data)

    def finish(self) -> str:
        """The JWS compact serialisation with the payload part left empty: ``header..signature``."""
        der = self._private.sign(self._digest.finalize(),
                                 ec.ECDSA(Prehashed(hashes.SHA384()), deterministic_signing=True))
        return f"{self.header_b64}..{_raw_signature(der)}"


def unencoded_header(signature: str) -> tuple[str, dict[str, str], bytes] | None:
    """Split a detached RFC 7797 ES384 JWS into (header segment, header, r || s); None unless it has exactly the
    shape :class:`UnencodedJws` writes (see :meth:`JwsVerifier.verify_unencoded`)."""
    try:
        header_b64, empty, sig_b64 = signature.split(".")
        header = json.loads(_unb64(header_b64))
        raw = _unb64(sig_b64)
    except ValueError:
        return None
    if (empty or not isinstance(header, dict) or set(header) != _UNENCODED_MEMBERS or header["alg"] != ALG
            or header["b64"] is not False or header["crit"] != ["b64"] or not isinstance(header["kid"], str)
            or not isinstance(header["sigT"], str) or len(raw) != 2 * _COORD):
        return None
    return header_b64, {"kid": header["kid"], "sigT": header["sigT"]}, raw


def load_or_create_signer(keys_dir: Path) -> Es384Signer:
    """The key in ``keys_dir/audit-signing.pem``, created (0600) when absent. Two processes starting together
    agree on one key: the new key is linked into place only if no file is there yet."""
    keys_dir = Path(keys_dir)
    path = keys_dir / KEY_FILE
    if not path.exists():
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = Es384Signer.generate().private_pem()
        fd, name = tempfile.mkstemp(prefix=f".{KEY_FILE}.", suffix=".tmp", dir=keys_dir)  # mode 0600, unique
        tmp = Path(name)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race: its key is the key
            os.link(tmp, path)
        tmp.unlink()
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read the audit signing key {path.name}: {type(exc).__name__}") from None
    signer = Es384Signer.from_pem(pem)
    jwk_path = keys_dir / JWK_FILE
    text = json.dumps(signer.public_jwk(), indent=2) + "\n"
    if not jwk_path.exists() or jwk_path.read_text() != text:
        jwk_path.write_text(text)
    return signer


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint: SHA-256 of the required members (crv, kty, x, y) sorted, no whitespace."""
    members = json.dumps(_jwk_members(key), separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(members).digest())


def _jwk_members(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    return {"crv": "P-384", "kty": "EC", "x": _b64(numbers.x.to_bytes(_COORD, "big")),
            "y": _b64(numbers.y.to_bytes(_COORD, "big"))}  # fmt: skip


def _public_key(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    if jwk.get("kty") != "EC" or jwk.get("crv") != "P-384":
        raise SigningKeyError("an ES384 verification key must be an EC P-384 JWK")
    try:
        x, y = (int.from_bytes(_unb64(str(jwk[c])), "big") for c in ("x", "y"))
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except (KeyError, ValueError) as exc:
        raise SigningKeyError(f"not a valid P-384 public JWK: {type(exc).__name__}") from None


def _unencoded_header_b64(key_id: str, signed_at: str) -> str:
    header = {"alg": ALG, "b64": False, "crit": ["b64"], "kid": key_id, "sigT": signed_at}
    return _b64(json.dumps(header, separators=(",", ":")).encode())


def _raw_signature(der: bytes) -> str:
    r, s = decode_dss_signature(der)
    return _b64(r.to_bytes(_COORD, "big") + s.to_bytes(_COORD, "big"))


def _signing_input(header_b64: str, payload: bytes) -> bytes:
    return f"{header_b64}.{_b64(payload)}".encode("ascii")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise ValueError("not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

"""The audit signing key: ES384 detached JWS that other JOSE implementations accept, a key made once and kept."""

from __future__ import annotations

import base64
import json
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fhir_bridge.adapters.signing import (
    JWK_FILE,
    KEY_FILE,
    Es384Signer,
    JwsVerifier,
    SigningKeyError,
    load_or_create_signer,
)

PAYLOAD = b'{"hash":"ab","seq":7,"time":"2026-05-04T08:00:00.000Z"}'


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_signature_is_a_detached_es384_jws_with_the_key_thumbprint() -> None:
    signer = Es384Signer.generate()
    header, payload, signature = signer.sign(PAYLOAD).split(".")
    assert payload == ""
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "ES384", "kid": signer.key_id}
    assert len(base64.urlsafe_b64decode(signature + "==")) == 96  # r || s, not DER
    assert signer.verify(PAYLOAD, signer.sign(PAYLOAD))


def test_verification_refuses_other_payloads_keys_and_algorithms() -> None:
    signer, other = Es384Signer.generate(), Es384Signer.generate()
    jws = signer.sign(PAYLOAD)
    header, _, signature = jws.split(".")
    assert not signer.verify(PAYLOAD + b" ", jws)
    assert not other.verify(PAYLOAD, jws)  # its kid is unknown there
    forged_header = b64(json.dumps({"alg": "ES384", "kid": other.key_id}).encode())
    assert not other.verify(PAYLOAD, f"{forged_header}..{signature}")
    for alg in ("none", "HS384", "ES256"):
        bad = b64(json.dumps({"alg": alg, "kid": signer.key_id}).encode())
        assert not signer.verify(PAYLOAD, f"{bad}..{signature}")
    crit = b64(json.dumps({"alg": "ES384", "kid": signer.key_id, "crit": ["b64"], "b64": False}).encode())
    assert not signer.verify(PAYLOAD, f"{crit}..{signature}")
    assert not signer.verify(PAYLOAD, f"{header}.{b64(PAYLOAD)}.{signature}")  # attached form is not ours
    for garbage in ("", "a.b", "a..b..c", f"{header}..{signature}=", f"{header}..!!!", "e30..AAAA"):
        assert not signer.verify(PAYLOAD, garbage)


def test_a_verifier_built_from_public_jwks_knows_rotated_keys() -> None:
    old, new = Es384Signer.generate(), Es384Signer.generate()
    verifier = JwsVerifier([old.public_jwk(), new.public_jwk()])
    assert verifier.verify(PAYLOAD, old.sign(PAYLOAD)) and verifier.verify(PAYLOAD, new.sign(PAYLOAD))
    assert "d" not in new.public_jwk()
    with pytest.raises(SigningKeyError):
        JwsVerifier([{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}])
    with pytest.raises(SigningKeyError):
        Es384Signer(ec.generate_private_key(ec.SECP256R1()))


def test_another_jose_implementation_agrees_on_signatures_and_thumbprints() -> None:
    joserfc = pytest.importorskip("joserfc")
    from joserfc import jws
    from joserfc.jwk import ECKey

    signer = Es384Signer.generate()
    jwk: dict[str, str | list[str]] = {**signer.public_jwk()}
    public = ECKey.import_key(jwk)
    assert public.thumbprint() == signer.key_id  # RFC 7638
    ours = signer.sign(PAYLOAD)
    theirs_view = jws.deserialize_compact(ours, public, algorithms=["ES384"], payload=PAYLOAD)
    assert theirs_view.protected == {"alg": "ES384", "kid": signer.key_id}
    private = ECKey.import_key(signer.private_pem())
    theirs = jws.detach_content(jws.serialize_compact({"alg": "ES384", "kid": signer.key_id}, PAYLOAD, private,
                                                      algorithms=["ES384"]))  # fmt: skip
    assert signer.verify(PAYLOAD, theirs)
    assert joserfc.__name__ == "joserfc"


def test_the_key_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = load_or_create_signer(keys)
    assert stat.S_IMODE((keys / KEY_FILE).stat().st_mode) == 0o600
    again = load_or_create_signer(keys)
    assert again.key_id == first.key_id
    assert again.verify(PAYLOAD, first.sign(PAYLOAD))
    published = JwsVerifier.from_file(keys / JWK_FILE)
    assert published.verify(PAYLOAD, again.sign(PAYLOAD))
    assert sorted(p.name for p in keys.iterdir()) == sorted([KEY_FILE, JWK_FILE])


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    keys, ids, barrier = tmp_path / "keys", [], threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        ids.append(load_or_create_signer(keys).key_id)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 8


def test_an_unreadable_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_or_create_signer(tmp_path)


def test_a_signer_can_use_an_existing_pem_key_and_keeps_its_thumbprint() -> None:
    signer = Es384Signer.generate()
    same = Es384Signer.from_pem(signer.private_pem())
    assert same.key_id == signer.key_id and signer.verify(PAYLOAD, same.sign(PAYLOAD))


# -- case bundles: unencoded payload (RFC 7797), streamed ------------------------------------------------------

SIGNED_AT = "2026-11-21T12:00:00Z"
BIG = b'{"entry":[' + b'{"resource":{"data":"' + b"QUJD" * 50_000 + b'"}}' + b'],"type":"document"}'


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_bundle_signature_is_a_detached_unencoded_es384_jws_naming_its_time() -> None:
    signer = Es384Signer.generate()
    header, payload, signature = signer.sign_unencoded(BIG, SIGNED_AT).split(".")
    assert payload == ""
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
        "alg": "ES384", "b64": False, "crit": ["b64"], "kid": signer.key_id, "sigT": SIGNED_AT}
    assert len(base64.urlsafe_b64decode(signature + "==")) == 96


def test_the_streaming_signer_equals_the_plain_one_for_any_cut_of_the_payload() -> None:
    signer = Es384Signer.generate()
    plain = signer.sign_unencoded(BIG, SIGNED_AT)
    for cut in ([BIG], pieces(BIG, 7), pieces(BIG, 4096), [*pieces(BIG[:300], 1), BIG[300:]]):
        streaming = signer.payload_signer(SIGNED_AT)
        for piece in cut:
            streaming.update(piece)
        assert streaming.finish() == plain  # deterministic ECDSA (RFC 6979): the same bytes
    assert signer.verify_unencoded(pieces(BIG, 1000), plain)
    assert signer.verify_unencoded([BIG], plain)


def test_unencoded_verification_refuses_other_payloads_keys_headers_and_algorithms() -> None:
    signer, other = Es384Signer.generate(), Es384Signer.generate()
    jws = signer.sign_unencoded(BIG, SIGNED_AT)
    header, _, signature = jws.split(".")
    assert not signer.verify_unencoded([BIG[:-1] + b" "], jws)
    assert not signer.verify_unencoded([BIG, b"x"], jws)
    assert not other.verify_unencoded([BIG], jws)
    good = {"alg": "ES384", "b64": False, "crit": ["b64"], "kid": signer.key_id, "sigT": SIGNED_AT}
    for change in ({"alg": "none"}, {"alg": "HS384"}, {"alg": "ES256"}, {"b64": True}, {"crit": []},
                   {"crit": ["b64", "exp"]}, {"sigT": "2027-01-01T00:00:00Z"}, {"typ": "JOSE"}):
        forged = b64(json.dumps({**good, **change}).encode())
        assert not signer.verify_unencoded([BIG], f"{forged}..{signature}"), change
    assert not signer.verify_unencoded([BIG], signer.sign(BIG))  # an audit (b64 true) signature is not one
    assert not signer.verify(BIG, jws)  # and the audit verifier keeps refusing crit
    for garbage in ("", "a.b", f"{header}.{b64(BIG)}.{signature}", f"{header}..{signature}A", "e30..AAAA"):
        assert not signer.verify_unencoded([BIG], garbage)


def test_another_jose_implementation_verifies_unencoded_bundle_signatures() -> None:
    pytest.importorskip("joserfc")
    from joserfc import jws
    from joserfc.jwk import ECKey
    from joserfc.registry import HeaderParameter

    signer = Es384Signer.generate()
    small = b'{"resourceType":"Bundle","type":"document"}'
    public = ECKey.import_key({**signer.public_jwk()})
    # joserfc refuses header members it does not know: teach it JAdES sigT (RFC 7515 §4 lets verifiers ignore it)
    registry = jws.JWSRegistry(header_registry={"sigT": HeaderParameter("JAdES claimed signing time", "str")},
                               algorithms=["ES384"])
    checked = jws.deserialize_compact(signer.sign_unencoded(small, SIGNED_AT), public, registry=registry,
                                      payload=small)
    assert checked.payload == small and checked.protected["b64"] is False
    streaming = signer.payload_signer(SIGNED_AT)
    streaming.update(small[:10])
    streaming.update(small[10:])
    jws.deserialize_compact(streaming.finish(), public, registry=registry, payload=small)
    with pytest.raises(jws.BadSignatureError):
        jws.deserialize_compact(signer.sign_unencoded(small, SIGNED_AT), public, registry=registry,
                                payload=small + b" ")

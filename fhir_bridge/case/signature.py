"""Case bundles as the bridge stores, serves and signs them (the bundle itself: :mod:`fhir_bridge.case.packaging`).

Stored: a case bundle is kept as a small **skeleton**, its canonical JSON cut where each Binary's base64
``data`` goes (:class:`BundleLayout`), each cut naming the document's blob (the documents are in the blob
store already). Serving streams the text parts and base64-encodes each blob into its place, so the served
bytes are the packaged bytes without a 2 GB copy; a pseudonymised variant is a transform of the small
skeleton (:mod:`fhir_bridge.access.pseudonym`), its Binaries the same blobs.

Signature (R4 bundle.html ``Bundle.signature``, signature.html; STANDARDS.md §6): ``type`` ASTM E1762
``1.2.840.10065.1.12.1.5`` (verification signature), ``when``, ``who`` the bridge Device of the bundle (the
Composition's author), ``targetFormat`` application/fhir+json, ``sigFormat`` application/jose and ``data`` the
base64 of a detached ES384 JWS (RFC 7515 appendix F) over the R4 canonical JSON of the bundle without ``id``,
``meta`` and ``signature`` (the "#document" form). The choice: the JWS uses RFC 7797 ``b64: false`` (header
``{"alg":"ES384","b64":false,"crit":["b64"],"kid":…,"sigT":…}``), so its signing input is
``b64url(header) "." canonical bytes`` and is SHA-384-hashed as the bytes stream by, and ``sigT`` (JAdES
claimed signing time) puts ``when`` under the signature. Canonical key order puts ``signature`` after
``entry``, ``identifier`` and ``resourceType`` and before ``timestamp`` and ``type``: the entries are streamed
and hashed first, the small known tail is hashed, and the signature is emitted in its place. The bundle the
collect job packages is signed then (the signature is kept in its skeleton); a pseudonymised variant is
signed while it is served. A verifier (``fhir-bridge verify-bundle``) parses the bundle, drops ``id``,
``meta`` and ``signature``, re-encodes it canonically and checks the JWS (:func:`check_bundle_signature`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from fhir_bridge.case.packaging import FileBase64
from fhir_bridge.errors import BlobUnreadable
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import FHIR_JSON, Resource, dumps, iterencode, loads
from fhir_bridge.ports import PayloadSigner, SignerPort

SIGNATURE_TYPE = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5",
                  "display": "Verification Signature"}
JOSE = "application/jose"
UNSIGNED_MEMBERS = ("id", "meta", "signature")  # left out of the signed form (R4 "#document" canonical form)
SKELETON_FORMAT = "fhir-bridge-case-skeleton/1"
SKELETON_PREFIX = b'{"format":"' + SKELETON_FORMAT.encode() + b'"'
_HASH_BATCH = 1 << 20


class BlobData:
    """A Binary's ``data`` kept in the blob store under ``digest`` (a Bundle read back from its skeleton)."""

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def __repr__(self) -> str:
        return f"BlobData({self.digest[:12]}…)"


@dataclass(frozen=True, slots=True)
class BinaryPart:
    """Where a Binary's base64 goes: the entry it belongs to and the blob holding the document's bytes."""

    entry: int
    digest: str


Part = str | BinaryPart


@dataclass(frozen=True)
class BundleLayout:
    """A case bundle as stored: the canonical JSON of its signed form (no ``id``, ``meta``, ``signature``) cut
    into text and binaries; ``signature_at`` is the part the ``signature`` member goes in front of, ``who`` the
    bridge Device's fullUrl, ``signature`` the signature made when it was packaged (None: sign when served)."""

    parts: tuple[Part, ...]
    signature_at: int
    who: str
    signature: Resource | None = None

    def __post_init__(self) -> None:
        tail = self.parts[self.signature_at:]
        if (not 0 < self.signature_at <= len(self.parts) or not isinstance(self.parts[0], str)
                or not self.parts[0].startswith("{") or any(isinstance(p, BinaryPart) for p in tail)):
            raise ValueError("a bundle layout opens with text, has members before 'signature', no Binary after")

    @property
    def binaries(self) -> list[BinaryPart]:
        return [p for p in self.parts if isinstance(p, BinaryPart)]


class _Slot:
    """Stands in for a Binary's data while the layout is encoded: yields one marker the encoder passes on."""

    def __init__(self, part: BinaryPart) -> None:
        self.part = part

    def iter_chunks(self) -> Iterator[str]:
        yield _Cut(self.part)


class _Cut(str):
    part: BinaryPart

    def __new__(cls, part: BinaryPart) -> _Cut:
        cut = super().__new__(cls, "")
        cut.part = part
        return cut


def layout_of(bundle: Resource, digests: Mapping[Path, str] | None = None) -> BundleLayout:
    """Cut the canonical JSON of ``bundle`` (signed form) at each Binary's data: a :class:`FileBase64` (named
    by ``digests``, file path → blob digest) or a :class:`BlobData`."""
    entries = []
    for index, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") or {}
        data = resource.get("data")
        if resource.get("resourceType") == "Binary" and isinstance(data, FileBase64 | BlobData):
            digest = data.digest if isinstance(data, BlobData) else (digests or {})[data.path]
            entry = {**entry, "resource": {**resource, "data": _Slot(BinaryPart(index, digest))}}
        entries.append(entry)
    body = {k: v for k, v in bundle.items() if k not in UNSIGNED_MEMBERS}
    body["entry"] = entries
    parts: list[Part] = []
    text: list[str] = ["{"]
    signature_at: int | None = None

    def flush() -> None:
        if text:
            parts.append("".join(text))
            text.clear()

    for n, key in enumerate(sorted(body)):
        if key > "signature" and signature_at is None:
            flush()
            signature_at = len(parts)
        text.append(("," if n else "") + json.dumps(key, ensure_ascii=False) + ":")
        for chunk in iterencode(body[key], canonical=True):
            if isinstance(chunk, _Cut):
                flush()
                parts.append(chunk.part)
            else:
                text.append(chunk)
    if signature_at is None:
        flush()
        signature_at = len(parts)
    text.append("}")
    flush()
    return BundleLayout(tuple(parts), signature_at, bridge_device_url(bundle))


def bridge_device_url(bundle: Resource) -> str:
    """The fullUrl of the bridge's Device in the bundle (the Composition's author): the signature's ``who``."""
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        names = [n.get("name") for n in resource.get("deviceName") or []]
        if resource.get("resourceType") == "Device" and "fhir-bridge" in names:
            return str(entry["fullUrl"])
    raise ValueError("the case bundle has no fhir-bridge Device entry")


def skeleton_bytes(layout: BundleLayout) -> bytes:
    """The layout as stored in the blob store (small: the Binaries are only named)."""
    parts = [p if isinstance(p, str) else {"blob": p.digest, "entry": p.entry} for p in layout.parts]
    return dumps({"format": SKELETON_FORMAT, "parts": parts, "signature": layout.signature,
                  "signatureAt": layout.signature_at, "who": layout.who}, canonical=True)


def parse_skeleton(data: bytes) -> BundleLayout:
    try:
        stored = loads(data)
        parts: list[Part] = [p if isinstance(p, str) else BinaryPart(int(p["entry"]), str(p["blob"]))
                             for p in stored["parts"]]
        if stored["format"] != SKELETON_FORMAT:
            raise ValueError(stored["format"])
        return BundleLayout(tuple(parts), int(stored["signatureAt"]), str(stored["who"]), stored["signature"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BlobUnreadable(f"the stored case bundle skeleton is damaged ({type(exc).__name__})") from None


def layout_document(layout: BundleLayout) -> Resource:
    """The bundle the layout stands for (signed form), each Binary's data a :class:`BlobData`: for variants."""
    bundle: Resource = loads("".join(p if isinstance(p, str) else "" for p in layout.parts))
    for part in layout.binaries:
        resource = bundle["entry"][part.entry]["resource"]
        if resource.get("resourceType") != "Binary" or resource.get("data") != "":
            raise BlobUnreadable("the stored case bundle skeleton does not match its binaries")
        resource["data"] = BlobData(part.digest)
    return bundle


def signature_element(jws: str, when: str, who: str) -> Resource:
    return {"type": [dict(SIGNATURE_TYPE)], "when": when, "who": {"reference": who}, "targetFormat": FHIR_JSON,
            "sigFormat": JOSE, "data": base64.b64encode(jws.encode("ascii")).decode("ascii")}


def sign_from_files(layout: BundleLayout, files: Mapping[str, Path], signer: SignerPort, when: str
                    ) -> BundleLayout:
    """Sign the layout reading each Binary from its file (``files``: blob digest → path), as the collect job
    does while the documents are still on disk. Blocking: run it on a worker thread."""
    payload = signer.payload_signer(when)
    for part in layout.parts:
        if isinstance(part, str):
            payload.update(part.encode("utf-8"))
        else:
            for chunk in FileBase64(files[part.digest]).iter_chunks():
                payload.update(chunk.encode("ascii"))
    return replace(layout, signature=signature_element(payload.finish(), when, layout.who))


async def served_chunks(
    layout: BundleLayout,
    head: Resource,
    read_blob: Callable[[str], AsyncIterator[bytes]],
    *,
    signer: SignerPort | None = None,
    when: str | None = None,
) -> AsyncGenerator[bytes, None]:
    """The served bundle: ``head`` (``id``, ``meta``) first, then the layout with each blob's base64 streamed
    into its place and the signature spliced in. With ``signer`` the signature is computed over what is
    emitted (hashing as it goes); otherwise the layout's own signature is used (None: no signature)."""
    when = when or instant(datetime.now(UTC), timespec="seconds")
    payload: PayloadSigner | None = signer.payload_signer(when) if signer else None
    opening = dumps(head, canonical=True)[:-1] + b"," if head else b"{"
    for index, part in enumerate(layout.parts):
        if index == layout.signature_at:
            signature = layout.signature
            if payload is not None:
                for rest in layout.parts[index:]:
                    payload.update(str(rest).encode("utf-8"))  # only text after the signature (see layout_of)
                signature = signature_element(payload.finish(), when, layout.who)
                payload = None
            if signature is not None:
                yield b',"signature":' + dumps(signature, canonical=True)
        if isinstance(part, str):
            data = part.encode("utf-8")
            if payload is not None:
                payload.update(data)
            yield opening + data[1:] if index == 0 else data
            continue
        async with contextlib.aclosing(_base64_of(read_blob(part.digest))) as pieces:
            async for piece in pieces:
                if payload is not None:
                    payload.update(piece)
                yield piece


async def _base64_of(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """Base64 of a byte stream whose chunks are of any size: encoded in multiples of 3 bytes, so the pieces
    join into exactly the base64 of the whole (no padding in the middle)."""
    rest = b""
    try:
        async for chunk in chunks:
            data = rest + chunk
            cut = len(data) - len(data) % 3
            rest = data[cut:]
            if cut:
                yield base64.b64encode(data[:cut])
        if rest:
            yield base64.b64encode(rest)
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()


@dataclass(frozen=True)
class SignatureCheck:
    """What :func:`check_bundle_signature` found: ``ok``, or why not; the key and the signed time."""

    ok: bool
    reason: str
    key_id: str | None = None
    signed_at: str | None = None


def signed_payload(bundle: Resource) -> Iterator[bytes]:
    """The bytes the signature covers, re-encoded from a parsed bundle: R4 canonical JSON without ``id``,
    ``meta`` and ``signature``, in batches of about 1 MiB."""
    batch: list[str] = []
    size = 0
    for chunk in iterencode({k: v for k, v in bundle.items() if k not in UNSIGNED_MEMBERS}, canonical=True):
        batch.append(chunk)
        size += len(chunk)
        if size >= _HASH_BATCH:
            yield "".join(batch).encode("utf-8")
            batch, size = [], 0
    yield "".join(batch).encode("utf-8")


def check_bundle_signature(
    bundle: Resource,
    verify: Callable[[Iterable[bytes], str], bool],
    known_keys: Collection[str] | None = None,
) -> SignatureCheck:
    """Check ``Bundle.signature`` (see the module docstring) with ``verify(payload pieces, jws)`` (the
    adapter's ES384 verifier). Never raises for a bad signature: the answer says what is wrong."""
    signature = bundle.get("signature")
    if not isinstance(signature, dict):
        return SignatureCheck(False, "the bundle has no signature")
    if signature.get("sigFormat") != JOSE:
        return SignatureCheck(False, f"signature.sigFormat is not {JOSE}")
    try:
        jws = base64.b64decode(str(signature.get("data", "")), validate=True).decode("ascii")
        segment = jws.split(".")[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return SignatureCheck(False, "signature.data is not a base64 JWS")
    if not isinstance(header, dict):
        return SignatureCheck(False, "signature.data is not a base64 JWS")
    kid, signed_at = header.get("kid"), header.get("sigT")
    kid = kid if isinstance(kid, str) else None
    signed_at = signed_at if isinstance(signed_at, str) else None
    if header.get("alg") != "ES384":
        return SignatureCheck(False, f"signature algorithm {str(header.get('alg'))[:20]!r} is refused (ES384 only)",
                              kid, signed_at)
    if known_keys is not None and kid not in known_keys:
        return SignatureCheck(False, f"signed with key {str(kid)[:64]!r}, which is not a trusted key", kid,
                              signed_at)
    if not verify(signed_payload(bundle), jws):
        return SignatureCheck(False, "the signature does not match the bundle (changed after signing, or not "
                              "a detached ES384 JWS with b64 false)", kid, signed_at)
    if signature.get("when") != signed_at:
        return SignatureCheck(False, "signature.when is not the signed time", kid, signed_at)
    return SignatureCheck(True, "signature valid", kid, signed_at)

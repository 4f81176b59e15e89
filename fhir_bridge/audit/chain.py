"""The audit chain: every stored AuditEvent carries the hash of the one before, and signed checkpoints pin it.

Format (version 1), so that an auditor can re-implement the check from this text alone:

* events are numbered ``seq`` = 1, 2, 3… with no gaps; the stored event's ``id`` is ``str(seq)``;
* ``canonical(event)`` = :func:`fhir_bridge.fhir.resources.dumps` ``canonical=True`` (keys sorted, no whitespace,
  UTF-8; FHIR R4 json.html §2.6.2.6) of the event **without** ``meta`` and without the chain extension;
* ``hash(seq) = SHA-256(raw 32 bytes of hash(seq-1) || canonical(event seq))`` in lower-case hex, with
  ``hash(0)`` = 64 zeros (:data:`GENESIS`);
* the stored event carries, as the extension :data:`CHAIN_URL`, ``seq`` (valueInteger), ``prev`` (hash(seq-1))
  and ``hash`` (valueString each);
* a checkpoint ``(seq, hash, time)`` is signed as a detached JWS (RFC 7515 appendix F; ES384 by default) over
  ``canonical({"hash": …, "seq": …, "time": …})``.

Changing an event breaks its own hash; deleting or inserting one breaks the ``seq`` sequence and the ``prev``
link of the next; moving one puts it where its ``seq`` says otherwise. A rewrite that recomputes every later
hash is caught by the first signed checkpoint after it. Verification reports the first position where a rule
fails. JOSE lives in an adapter (``fhir_bridge.adapters.signing``): here only the :class:`Signer` shape.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fhir_bridge.errors import AuditIntegrityError as AuditIntegrityError  # kept importable from here
from fhir_bridge.errors import MalformedResource
from fhir_bridge.fhir.resources import Resource, dumps, loads

CHAIN_URL = "https://fhir-bridge.dev/fhir/StructureDefinition/audit-chain"
GENESIS = "0" * 64
EXPORT_FORMAT = "fhir-bridge-audit-export/1"


class SignatureVerifier(Protocol):
    def verify(self, payload: bytes, signature: str) -> bool:
        """True when ``signature`` (a detached compact JWS) signs ``payload`` with a key we trust."""
        ...


class Signer(SignatureVerifier, Protocol):
    key_id: str

    def sign(self, payload: bytes) -> str:
        """A detached compact JWS (``header..signature``) over ``payload``."""
        ...


@dataclass(frozen=True, slots=True)
class ChainLink:
    """Event ``seq``'s place in the chain: its hash and the hash before it (``prev`` may be unknown: "")."""

    seq: int
    hash: str
    prev: str = ""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """``first_broken_seq``: the first position where the chain does not hold (None when ``ok``)."""

    ok: bool
    count: int
    first_broken_seq: int | None = None
    reason: str = ""
    head: ChainLink | None = None


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement "event ``seq`` of this log had hash ``hash`` at ``time``" (FHIR instant)."""

    seq: int
    hash: str
    time: str
    signature: str

    def payload(self) -> bytes:
        return checkpoint_payload(self.seq, self.hash, self.time)

    def verify(self, verifier: SignatureVerifier) -> bool:
        return verifier.verify(self.payload(), self.signature)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Checkpoint:
        data = json.loads(text)
        return cls(int(data["seq"]), str(data["hash"]), str(data["time"]), str(data["signature"]))


def checkpoint_payload(seq: int, hash_: str, time: str) -> bytes:
    return dumps({"hash": hash_, "seq": seq, "time": time}, canonical=True)


def sign_checkpoint(link: ChainLink, time: str, signer: Signer) -> Checkpoint:
    return Checkpoint(link.seq, link.hash, time, signer.sign(checkpoint_payload(link.seq, link.hash, time)))


def chain_hash(previous_hash: str, event_bytes: bytes) -> str:
    """SHA-256 hex over the previous hash's 32 raw bytes followed by the event's canonical bytes."""
    return hashlib.sha256(bytes.fromhex(previous_hash) + event_bytes).hexdigest()


def canonical_bytes(event: Resource) -> bytes:
    """The bytes the chain hashes: canonical JSON without ``meta`` and without the chain extension."""
    body = {k: v for k, v in event.items() if k not in ("meta", "extension")}
    others = [ext for ext in event.get("extension", []) if not (isinstance(ext, dict) and ext.get("url") == CHAIN_URL)]
    if others:
        body["extension"] = others
    return dumps(body, canonical=True)


def seal(event: Resource, seq: int, prev: str) -> tuple[Resource, ChainLink]:
    """The event as stored at ``seq`` after ``prev``: ``id`` set to the seq, chain extension added."""
    body = {k: v for k, v in event.items() if k != "id"}
    body = {"resourceType": body.pop("resourceType", "AuditEvent"), "id": str(seq), **body}
    others = [e for e in body.get("extension", []) if not (isinstance(e, dict) and e.get("url") == CHAIN_URL)]
    body["extension"] = others
    link = ChainLink(seq, chain_hash(prev, canonical_bytes(body)), prev)
    parts = [("seq", "valueInteger", seq), ("prev", "valueString", prev), ("hash", "valueString", link.hash)]
    body["extension"] = [*others, {"url": CHAIN_URL, "extension": [{"url": u, kind: v} for u, kind, v in parts]}]
    return body, link


def chain_link(event: Resource) -> ChainLink | None:
    """The chain extension of a stored event, or None when it has none (or a malformed one)."""
    for ext in event.get("extension", []):
        if isinstance(ext, dict) and ext.get("url") == CHAIN_URL:
            parts = {p.get("url"): p for p in ext.get("extension", []) if isinstance(p, dict)}
            seq = parts.get("seq", {}).get("valueInteger")
            hash_, prev = parts.get("hash", {}).get("valueString"), parts.get("prev", {}).get("valueString")
            if isinstance(seq, int) and isinstance(hash_, str) and isinstance(prev, str):
                return ChainLink(seq, hash_, prev)
    return None


@dataclass
class ChainVerifier:
    """Checks stored events one at a time, in seq order, in constant memory (for logs of millions of events).

    ``start`` is the link before the first event fed (the genesis, a purge anchor, the link before an export);
    ``checkpoints`` maps a seq to the checkpoint that must match the hash found there, its signature checked
    with ``verifier``. :meth:`feed` returns False once the chain is broken; :meth:`finish` gives the result.
    """

    start: ChainLink = field(default_factory=lambda: ChainLink(0, GENESIS))
    checkpoints: Mapping[int, Checkpoint] = field(default_factory=dict)
    verifier: SignatureVerifier | None = None
    count: int = field(default=0, init=False)
    broken: tuple[int, str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._last = self.start

    def feed(self, seq: int, stored: bytes | None) -> bool:
        """Check the event stored at position ``seq`` (None: nothing is stored there)."""
        if self.broken is not None:
            return False
        expected = self._last.seq + 1
        if seq != expected:
            return self._break(min(seq, expected), f"event {expected} is missing" if seq > expected else
                               f"event {seq} appears out of order")  # fmt: skip
        if stored is None:
            return self._break(seq, f"event {seq} is missing")
        try:
            event = loads(stored)  # decimals kept exact: 1.50 must hash as 1.50 (resources.loads)
        except MalformedResource:
            return self._break(seq, f"event {seq} is not JSON")
        link = chain_link(event) if isinstance(event, dict) else None
        if link is None:
            return self._break(seq, f"event {seq} has no chain extension")
        if link.seq != seq or event.get("id") != str(seq):
            return self._break(seq, f"the event stored at {seq} is event {link.seq}: moved or reordered")
        if link.prev != self._last.hash:
            return self._break(seq, f"event {seq} does not follow event {seq - 1}: one was deleted or inserted")
        if chain_hash(link.prev, canonical_bytes(event)) != link.hash:
            return self._break(seq, f"event {seq} was changed after it was stored")
        checkpoint = self.checkpoints.get(seq)
        if checkpoint is not None:
            if checkpoint.hash != link.hash:
                return self._break(seq, f"checkpoint {seq} does not match: the chain was rewritten up to here")
            if self.verifier is not None and not checkpoint.verify(self.verifier):
                return self._break(seq, f"checkpoint {seq} has an invalid signature")
        self._last = link
        self.count += 1
        return True

    def finish(self, head: ChainLink | None = None) -> VerifyResult:
        """The result; ``head`` is where the log says its chain ends (a deleted last event is found there)."""
        last = self._last
        if self.broken is None and head is not None:
            if head.seq > last.seq:
                self._break(last.seq + 1, f"event {last.seq + 1} is missing (the chain should end at {head.seq})")
            elif head.seq < last.seq:
                self._break(head.seq + 1, f"events after {head.seq} were added past the end of the chain")
            elif head.hash != last.hash:
                self._break(head.seq, f"event {head.seq} is not the one the chain's end records")
        if self.broken is None:
            late = sorted(s for s in self.checkpoints if s > self._last.seq)
            if late:
                self._break(late[0], f"checkpoint {late[0]} is past the end of the chain")
        if self.broken is not None:
            return VerifyResult(False, self.count, self.broken[0], self.broken[1], self._last)
        return VerifyResult(True, self.count, head=self._last)

    def _break(self, seq: int, reason: str) -> bool:
        self.broken = (seq, reason)
        return False


def verify_chain(
    events: Iterable[tuple[int, bytes | None]],
    *,
    start: ChainLink | None = None,
    head: ChainLink | None = None,
    checkpoints: Mapping[int, Checkpoint] | None = None,
    verifier: SignatureVerifier | None = None,
) -> VerifyResult:
    """Verify stored events given as ``(seq, stored bytes)`` in seq order; see :class:`ChainVerifier`."""
    checker = ChainVerifier(start or ChainLink(0, GENESIS), dict(checkpoints or {}), verifier)
    for seq, stored in events:
        if not checker.feed(seq, stored):
            break
    return checker.finish(head)


@dataclass(frozen=True, slots=True)
class Manifest:
    """What an export holds, signed: an auditor checks the file against it offline (:func:`verify_export`).

    ``prev_hash`` is the hash before ``first_seq`` (the export is a slice of the chain), ``sha256`` the NDJSON
    file's digest, ``checkpoints`` the signed checkpoints that fall inside the slice.
    """

    file: str
    count: int
    first_seq: int | None
    last_seq: int | None
    prev_hash: str | None
    last_hash: str | None
    sha256: str
    since: str | None
    until: str | None
    created: str
    key_id: str
    checkpoints: tuple[Checkpoint, ...] = ()
    signature: str = ""

    def payload(self) -> bytes:
        """The signed bytes: the canonical JSON of every field but the signature."""
        data = self.to_dict()
        del data["signature"]
        return dumps(data, canonical=True)

    def to_dict(self) -> dict[str, Any]:
        return {"format": EXPORT_FORMAT, "file": self.file, "count": self.count, "firstSeq": self.first_seq,
                "lastSeq": self.last_seq, "prevHash": self.prev_hash, "lastHash": self.last_hash,
                "sha256": self.sha256, "since": self.since, "until": self.until, "created": self.created,
                "kid": self.key_id, "checkpoints": [asdict(c) for c in self.checkpoints],
                "signature": self.signature}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a {EXPORT_FORMAT} manifest")
        cps = tuple(Checkpoint(int(c["seq"]), c["hash"], c["time"], c["signature"]) for c in data["checkpoints"])
        return cls(file=data["file"], count=int(data["count"]), first_seq=data["firstSeq"], last_seq=data["lastSeq"],
                   prev_hash=data["prevHash"], last_hash=data["lastHash"], sha256=data["sha256"], since=data["since"],
                   until=data["until"], created=data["created"], key_id=data["kid"], checkpoints=cps,
                   signature=data["signature"])  # fmt: skip


def verify_export(ndjson_path: Path, manifest_path: Path, verifier: SignatureVerifier) -> VerifyResult:
    """Check an export offline (no Redis, no bridge): the manifest's signature, every line's place in the chain
    from ``prevHash`` to ``lastHash``, the checkpoints inside, the count and the file's SHA-256."""
    try:
        manifest = Manifest.from_dict(json.loads(Path(manifest_path).read_bytes()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return VerifyResult(False, 0, None, f"the manifest cannot be read: {type(exc).__name__}")
    if not verifier.verify(manifest.payload(), manifest.signature):
        return VerifyResult(False, 0, None, "the manifest's signature does not verify")
    first = manifest.first_seq if manifest.first_seq is not None else 1
    digest = hashlib.sha256()
    checker = ChainVerifier(ChainLink(first - 1, manifest.prev_hash or GENESIS),
                            {c.seq: c for c in manifest.checkpoints}, verifier)  # fmt: skip
    with Path(ndjson_path).open("rb") as lines:
        for offset, line in enumerate(lines):
            digest.update(line)
            checker.feed(first + offset, line.rstrip(b"\n"))
    head = ChainLink(manifest.last_seq, manifest.last_hash) if manifest.last_seq and manifest.last_hash else None
    result = checker.finish(head)
    if not result.ok:
        return result
    if result.count != manifest.count:
        return VerifyResult(False, result.count, None, f"the file holds {result.count} events, not {manifest.count}")
    if digest.hexdigest() != manifest.sha256:
        return VerifyResult(False, result.count, None, "the file's SHA-256 differs from the manifest's")
    return result

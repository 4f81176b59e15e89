"""Audit export for auditors: a slice of the chain as NDJSON, with a signed manifest that verifies offline.

The NDJSON holds the stored events byte for byte (one canonical JSON object per line, chain extension
included), so an auditor re-computes every hash from the file alone; the manifest
(:class:`~fhir_bridge.audit.chain.Manifest`) says which slice it is (first and last seq, the hash before the
first, the last hash), the file's SHA-256, the signed checkpoints inside the slice, and is itself signed with
the bridge's key. Check a pair with :func:`fhir_bridge.audit.chain.verify_export` and the public JWK
(``fhir_bridge.adapters.signing.JwsVerifier``): no Redis, no bridge needed.

An export only reads the chain, so it takes an :class:`~fhir_bridge.adapters.audit_reader.AuditChainReader`
(the log is one, and calls this from ``RedisAuditLog.export_ndjson`` with its signer, verifier and clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from fhir_bridge.adapters.audit_reader import AuditChainReader
from fhir_bridge.audit.chain import (
    GENESIS,
    AuditIntegrityError,
    ChainLink,
    ChainVerifier,
    Manifest,
    SignatureVerifier,
    Signer,
    chain_link,
)
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import loads

_FLUSH_BYTES = 1 << 20


async def export_ndjson(
    log: AuditChainReader,
    path: Path,
    *,
    signer: Signer,
    verifier: SignatureVerifier,
    created: datetime,
    since: datetime | None = None,
    until: datetime | None = None,
    manifest_path: Path | None = None,
) -> Manifest:
    """Write the events of ``log`` recorded in [``since``, ``until``) to ``path`` and the manifest, signed by
    ``signer``, to ``manifest_path`` (default ``<path>.manifest.json``), both atomically (temporary files
    renamed at the end). ``verifier`` checks the signed checkpoints met on the way.

    The slice is verified while it is written (links, hashes, the checkpoints inside it): a broken chain is not
    exported but refused with :class:`AuditIntegrityError`, so a manifest never vouches for a tampered slice.
    """
    path = Path(path)
    manifest_path = Path(manifest_path) if manifest_path else path.with_name(path.name + ".manifest.json")
    span = await log.seq_range(since, until)
    digest, count, prev, last_hash, inside = hashlib.sha256(), 0, None, None, []
    tmp = path.with_name(f".{path.name}.tmp")
    handle: BinaryIO = await asyncio.to_thread(tmp.open, "wb")
    try:
        if span is not None:
            first, last = span
            first_body = await anext(body async for _, body in log.read_range(first, first))
            link = chain_link(loads(first_body)) if first_body else None
            prev = link.prev if link else GENESIS  # a missing first event is reported by the checker below
            inside = [c for c in await log.checkpoints() if first <= c.seq <= last]
            checker = ChainVerifier(ChainLink(first - 1, prev), {c.seq: c for c in inside}, verifier)
            chunk = bytearray()
            async for seq, body in log.read_range(first, last):
                if not checker.feed(seq, body) or body is None:
                    break
                chunk += body + b"\n"
                if len(chunk) >= _FLUSH_BYTES or seq == last:
                    digest.update(chunk)
                    await asyncio.to_thread(handle.write, bytes(chunk))
                    chunk.clear()
            result = checker.finish()
            if not result.ok:
                raise AuditIntegrityError(
                    f"the audit chain is broken at {result.first_broken_seq}: {result.reason}; nothing was exported"
                )
            count, last_hash = result.count, result.head.hash if result.head else None
        await asyncio.to_thread(handle.close)
        manifest = Manifest(
            file=path.name,
            count=count,
            first_seq=span[0] if span else None,
            last_seq=span[1] if span else None,
            prev_hash=prev,
            last_hash=last_hash,
            sha256=digest.hexdigest(),
            since=instant(since) if since else None,
            until=instant(until) if until else None,
            created=instant(created),
            key_id=signer.key_id,
            checkpoints=tuple(inside),
        )
        manifest = replace(manifest, signature=signer.sign(manifest.payload()))
        text = json.dumps(manifest.to_dict(), indent=2) + "\n"
        await asyncio.to_thread(_write_atomically, manifest_path, text.encode("utf-8"))
        await asyncio.to_thread(tmp.replace, path)
    except BaseException:
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(tmp.unlink, True)
        raise
    return manifest


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)

"""ITI-68 Retrieve Document for the source client: the body streamed to disk and verified (MHD ITI-68 §2:3.68.4.2).

Its own module because an attachment is the one answer that is not a small JSON resource: it is streamed to
disk in chunks, never whole in memory, capped in size (``source.max_attachment_bytes``), with
``attachment.size`` and the base64 SHA-1 ``attachment.hash`` verified (FHIR Attachment) and its SHA-256 taken on
the way, the hashing and writing done in a worker thread. The file appears under its name only once every
check passed. The audited exchange around a retrieve is
:class:`~fhir_bridge.adapters.source_client.SourceClient`'s; the requests go through
:class:`~fhir_bridge.adapters.source_http.SourceHttp` (to another origin, an attachment gets no token).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx

from fhir_bridge.adapters.source_http import OpenExchange, SourceHttp, redact
from fhir_bridge.errors import AttachmentError, SourceUnavailable
from fhir_bridge.ports import RetrievedAttachment


def check_declared(url: str, expected_size: int | None, expected_sha1_b64: str | None, cap: int) -> bytes | None:
    """The declared SHA-1 digest (None when none is declared), once what the DocumentReference declares is known
    to be usable: a base64 SHA-1 and a size within ``cap``. Checked before any request: no point fetching it."""
    expected_sha1: bytes | None = None
    if expected_sha1_b64 is not None:
        try:
            expected_sha1 = base64.b64decode(expected_sha1_b64, validate=True)
        except ValueError:
            raise AttachmentError("attachment.hash is not base64", reason="bad-hash", url=redact(url)) from None
        if len(expected_sha1) != 20:
            raise AttachmentError("attachment.hash is not a SHA-1 digest", reason="bad-hash", url=redact(url))
    if expected_size is not None and expected_size > cap:
        raise AttachmentError(f"declared size {expected_size} is over the {cap} byte limit",
                              reason="too-large", url=redact(url))
    return expected_sha1


async def retrieve_to_disk(http: SourceHttp, url: str, dest: Path, expected_size: int | None,
                           expected_sha1: bytes | None, exchange: OpenExchange) -> RetrievedAttachment:
    """Retrieve ``url`` into ``dest``; a connection lost part way starts the download again, up to
    ``source.max_retries`` times (the request loop's own retries only cover getting an answer)."""
    for attempt in range(1, http.settings.max_retries + 2):
        try:
            return await _retrieve_once(http, url, dest, expected_size, expected_sha1, exchange)
        except SourceUnavailable:
            if attempt > http.settings.max_retries:
                raise
            await asyncio.sleep(http.policy.backoff(attempt))
    raise AssertionError("unreachable")


async def _retrieve_once(
    http: SourceHttp, url: str, dest: Path, expected_size: int | None, expected_sha1: bytes | None,
    exchange: OpenExchange,
) -> RetrievedAttachment:
    try:
        response = await http.send("GET", url, accept="*/*", stream=True, exchange=exchange)
    except SourceUnavailable as exc:
        raise AttachmentError(str(exc), reason="retrieve-failed", url=redact(url)) from None
    cap = http.settings.max_attachment_bytes
    limit = min(cap, expected_size) if expected_size is not None else cap
    size = 0
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    sink = _AttachmentSink(tmp)
    try:
        if response.status_code != 200:
            raise AttachmentError(
                f"retrieve answered HTTP {response.status_code}", reason="retrieve-failed",
                status=response.status_code, url=redact(url),
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # chunks as they arrive: a fixed chunk size would make httpx copy every byte once more
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    reason = "too-large" if size > cap else "size-mismatch"
                    raise AttachmentError(
                        f"attachment is larger than {'the limit' if reason == 'too-large' else 'declared'}",
                        reason=reason, url=redact(url),
                    )
                await sink.add(chunk)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise SourceUnavailable(f"connection lost during retrieve ({type(exc).__name__})") from None
        await sink.finish()
        if expected_size is not None and size != expected_size:
            raise AttachmentError(f"attachment has {size} bytes, {expected_size} declared",
                                  reason="size-mismatch", url=redact(url))
        if expected_sha1 is not None and sink.sha1.digest() != expected_sha1:
            raise AttachmentError("attachment bytes do not match attachment.hash (SHA-1)",
                                  reason="hash-mismatch", url=redact(url))
        os.replace(tmp, dest)
    finally:
        await sink.close()
        await response.aclose()
        tmp.unlink(missing_ok=True)
    return RetrievedAttachment(
        url=url, path=dest, size=size, sha1_b64=base64.b64encode(sink.sha1.digest()).decode("ascii"),
        sha256_hex=sink.sha256.hexdigest(),
        content_type=response.headers.get("Content-Type", "").split(";")[0].strip() or None,
    )


class _AttachmentSink:
    """Hashes an ITI-68 body and writes it to disk in a worker thread, about 1 MiB at a time, in order.

    hashlib and file writes release the GIL, so on a second core they run beside the event loop, which keeps
    reading this and the other responses (BENCHMARKS.md part 1: in the loop they were ~15% of a pull's time,
    opening the files another 5%). One batch at most is in the thread while the next one fills.
    """

    _BATCH = 1 << 20

    def __init__(self, path: Path) -> None:
        self.sha1, self.sha256 = hashlib.sha1(usedforsecurity=False), hashlib.sha256()
        self._path = path
        self._out: Any = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._flight: asyncio.Future[None] | None = None

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= self._BATCH:
            await self._flush()

    async def finish(self) -> None:
        """Every byte hashed and written, the file closed."""
        await self._flush(last=True)
        if self._flight is not None:
            await self._flight
        self._flight = None

    async def close(self) -> None:
        """Stop after an error: let the thread finish its batch, close the file (nothing else is written)."""
        if self._flight is not None:
            await asyncio.wait([self._flight])
        self._close()

    async def _flush(self, *, last: bool = False) -> None:
        if self._flight is not None:
            await self._flight
        batch, self._pending, self._pending_size = self._pending, [], 0
        self._flight = asyncio.get_running_loop().run_in_executor(None, self._absorb, batch, last)

    def _absorb(self, batch: list[bytes], last: bool) -> None:
        if self._out is None:
            self._out = self._path.open("wb")
        for chunk in batch:
            self.sha1.update(chunk)
            self.sha256.update(chunk)
            self._out.write(chunk)
        if last:
            self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

"""Content-addressed blob storage on the local file system (attachments, case bundles).

A blob is named by the SHA-256 of its plaintext and lives at ``root/ab/cd/<digest>``: two levels of fan-out
keep directories small with millions of blobs, and the name is the integrity check (the packager signs
digests, not paths). Guarantees:

* streaming: files are copied in 1 MiB chunks on a worker thread, never read whole into memory (an ITI-68
  attachment may be hundreds of megabytes);
* atomic: a blob is written to a temporary file under ``root/.incoming`` (same file system) and published
  with ``os.replace``, so a reader sees a complete blob or none; concurrent puts of the same content are
  harmless, both write the same bytes;
* durable: the temporary file is fsynced before it is published;
* safe names: a digest is exactly 64 lowercase hex characters or :class:`~fhir_bridge.errors.InvalidInput`,
  so no caller-supplied string ever becomes a path (no traversal);
* private: files are 0600 and directories 0700 (they hold health data).

The bytes on disk go through :func:`_write_stored` and :func:`_read_stored` only: encryption at rest (AES-GCM
with a key id per blob) will change those two functions and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncGenerator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from fhir_bridge.errors import InvalidInput, NotFound
from fhir_bridge.ports import StoredBlob

CHUNK_SIZE = 1024 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")


class FileBlobStore:
    """:class:`~fhir_bridge.ports.BlobStorePort` over a directory (``<data_dir>/blobs`` in production)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._incoming = self.root / ".incoming"

    def path(self, digest: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists); InvalidInput for a bad digest."""
        _check_digest(digest)
        return self.root / digest[:2] / digest[2:4] / digest

    async def put_file(self, path: Path) -> StoredBlob:
        """Store a copy of the file at ``path``, streamed in chunks; the source file is left untouched."""

        def copy() -> StoredBlob:
            with open(path, "rb") as source:
                return self._store(_chunks(source))

        return await asyncio.to_thread(copy)

    async def put_bytes(self, data: bytes) -> StoredBlob:
        """Store ``data`` (for what is already in memory: a case bundle, a rendered report)."""
        return await asyncio.to_thread(self._store, [data])

    def open_chunks(self, digest: str) -> AsyncGenerator[bytes, None]:
        """The blob's plaintext in chunks of up to 1 MiB, each read on a worker thread.

        A plain function returning the generator, so a bad or unknown digest fails here, at the call,
        rather than at the first ``async for`` step (the API can still answer 404 before streaming).
        Close it (``aclose``) when abandoning it early, to release the file at once.
        """
        target = self.path(digest)
        if not target.is_file():
            raise NotFound(f"no blob {digest}")
        return _stream(target, digest)

    async def read_bytes(self, digest: str) -> bytes:
        """The whole blob in memory: only for small blobs (bundles, reports)."""
        target = self.path(digest)

        def read() -> bytes:
            with _open_blob(target, digest) as stored:
                return b"".join(_read_stored(stored))

        return await asyncio.to_thread(read)

    async def exists(self, digest: str) -> bool:
        target = self.path(digest)
        return await asyncio.to_thread(target.is_file)

    def _store(self, chunks: Iterable[bytes]) -> StoredBlob:
        self._incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp_name = tempfile.mkstemp(dir=self._incoming, prefix="blob-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as temp:
                digest, size = _write_stored(chunks, temp)
                temp.flush()
                os.fsync(temp.fileno())
            target = self.path(digest)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.replace(temp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_dir(target.parent)
        return StoredBlob(digest=digest, size=size)


def _check_digest(digest: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidInput("a blob digest is 64 lowercase hexadecimal characters (SHA-256)")


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    while chunk := source.read(CHUNK_SIZE):
        yield chunk


def _open_blob(target: Path, digest: str) -> BinaryIO:
    try:
        return open(target, "rb")
    except FileNotFoundError:
        raise NotFound(f"no blob {digest}") from None


async def _stream(target: Path, digest: str) -> AsyncGenerator[bytes, None]:
    stored = await asyncio.to_thread(_open_blob, target, digest)
    try:
        plaintext = _read_stored(stored)
        while chunk := await asyncio.to_thread(next, plaintext, b""):
            yield chunk
    finally:
        stored.close()


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; best effort, as not every file system lets a directory be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The on-disk format. Today: the plaintext as is. Encryption at rest replaces these two functions
# (a header with a key id and nonce, then AES-GCM chunks); the digest stays that of the plaintext.


def _write_stored(chunks: Iterable[bytes], out: BinaryIO) -> tuple[str, int]:
    """Write the plaintext ``chunks`` in the stored format; return (SHA-256 hex of the plaintext, its size)."""
    sha256 = hashlib.sha256()
    size = 0
    for chunk in chunks:
        sha256.update(chunk)
        size += len(chunk)
        out.write(chunk)
    return sha256.hexdigest(), size


def _read_stored(stored: BinaryIO) -> Iterator[bytes]:
    """The plaintext of a stored blob, in chunks of up to :data:`CHUNK_SIZE`."""
    yield from _chunks(stored)

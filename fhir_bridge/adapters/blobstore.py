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
* private: files are 0600 and directories 0700 (they hold health data);
* encrypted at rest when the store is given a :class:`BlobKeyring` (production always gives one): AES-256-GCM
  in authenticated chunks, the key id stored with each blob so keys rotate without re-encrypting.

The bytes on disk go through :func:`_write_stored` and :func:`_read_stored` only. The encrypted format::

    header  = b"FHIRBLOB" | version (1 byte, = 1) | key id length (1 byte) | key id (ASCII)
              | base nonce (12 bytes) | chunk size (4 bytes, big-endian)
    records = AES-256-GCM(chunk i) + 16-byte tag, for i = 0, 1, …
              nonce_i = (base nonce + i) mod 2**96, big-endian
              associated data = header | i (8 bytes, big-endian) | final flag (1 byte)

Every record but the last holds exactly ``chunk size`` plaintext bytes; the last holds fewer (possibly none)
and is sealed with the final flag. The header is bound into every record, so a changed key id or chunk size
fails; records cannot be reordered (the counter is in the nonce), and a file cut at any point, or
lengthened, fails: a cut record no longer authenticates, a cut on a record boundary leaves no final record
(even an empty blob ends with one: its 16-byte tag), and appended bytes make the last record full-sized.
The digest remains the SHA-256 of the plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import struct
import tempfile
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fhir_bridge.adapters import key_files
from fhir_bridge.errors import BlobUnreadable, InvalidInput, NotFound
from fhir_bridge.ports import StoredBlob

CHUNK_SIZE = 1024 * 1024
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")




@dataclass(frozen=True)
class BlobKeyring:
    """AES-256 keys by id: ``active_id`` encrypts new blobs, every key in ``keys`` can still read old ones.

    Rotation adds a key and makes it active; blobs written before keep naming their key and stay readable
    as long as it is kept here. A running process holds the keyring it loaded: restart every process that
    shares the blob directory after a rotation, so they all can read what the others write.
    """

    active_id: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.active_id not in self.keys:
            raise InvalidInput("the active blob key is not in the keyring")
        for key_id, key in self.keys.items():
            if not _KEY_ID.fullmatch(key_id) or len(key) != 32:
                raise InvalidInput("a blob key id is 1-64 characters [A-Za-z0-9._-], its key 32 bytes")

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise BlobUnreadable(f"the blob was encrypted with key {key_id!r}, which is not in the keyring") from None

    @classmethod
    def load(cls, path: Path) -> BlobKeyring:
        """Read a key file: ``{"active": id, "keys": {id: base64url key, …}}``."""
        try:
            document = json.loads(path.read_bytes())
            keys = {key_id: base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
                    for key_id, value in document["keys"].items()}
            return cls(active_id=document["active"], keys=keys)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InvalidInput(f"the blob key file {path} is missing or not a blob keyring") from None

    @classmethod
    def load_or_create(cls, path: Path) -> BlobKeyring:
        """The keyring at ``path``, created with one fresh key on first use (0600, safe when processes race)."""
        if not path.exists():
            key_files.create_once(path, _dump(cls.fresh()))
        return cls.load(path)

    @classmethod
    def fresh(cls, previous: BlobKeyring | None = None) -> BlobKeyring:
        """A keyring with a new random active key, keeping ``previous``'s keys for reading."""
        key_id = f"{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"
        keys = dict(previous.keys) if previous else {}
        keys[key_id] = AESGCM.generate_key(bit_length=256)
        return cls(active_id=key_id, keys=keys)

    @classmethod
    def rotate(cls, path: Path) -> BlobKeyring:
        """Add a new active key to the key file at ``path`` (for an operator command); old keys stay."""
        keyring = cls.fresh(cls.load(path))
        key_files.replace(path, _dump(keyring))
        return keyring


def _dump(keyring: BlobKeyring) -> bytes:
    keys = {key_id: base64.urlsafe_b64encode(key).decode().rstrip("=") for key_id, key in keyring.keys.items()}
    return json.dumps({"active": keyring.active_id, "keys": keys}, indent=2).encode() + b"\n"


class FileBlobStore:
    """:class:`~fhir_bridge.ports.BlobStorePort` over a directory (``<data_dir>/blobs`` in production).

    With a ``keyring`` blobs are encrypted at rest and plaintext files are refused on reading (a plaintext
    file in an encrypted store is a substitution nobody could detect otherwise); without one, blobs are
    stored as plaintext and an encrypted file is refused (a keyring was left out of the configuration).
    """

    def __init__(self, root: Path, keyring: BlobKeyring | None = None) -> None:
        self.root = Path(root)
        self._incoming = self.root / ".incoming"
        self._keyring = keyring

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
        return _stream(target, digest, self._keyring)

    async def read_bytes(self, digest: str) -> bytes:
        """The whole blob in memory: only for small blobs (bundles, reports)."""
        target = self.path(digest)

        def read() -> bytes:
            with _open_blob(target, digest) as stored:
                return b"".join(_read_stored(stored, self._keyring))

        return await asyncio.to_thread(read)

    async def exists(self, digest: str) -> bool:
        target = self.path(digest)
        return await asyncio.to_thread(target.is_file)

    def _store(self, chunks: Iterable[bytes]) -> StoredBlob:
        self._incoming.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, temp_name = tempfile.mkstemp(dir=self._incoming, prefix="blob-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as temp:
                # the plaintext call keeps the hook's historical two-argument form (tests replace it)
                digest, size = (_write_stored(chunks, temp) if self._keyring is None
                                else _write_stored(chunks, temp, self._keyring))
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


async def _stream(target: Path, digest: str, keyring: BlobKeyring | None) -> AsyncGenerator[bytes, None]:
    stored = await asyncio.to_thread(_open_blob, target, digest)
    try:
        plaintext = _read_stored(stored, keyring)
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


# The on-disk format: plaintext as is without a keyring, else the chunked AES-256-GCM format of the module
# docstring. The digest is always that of the plaintext.

_MAGIC = b"FHIRBLOB"
_VERSION = 1
_NONCE_BYTES = 12
_TAG_BYTES = 16


def _write_stored(chunks: Iterable[bytes], out: BinaryIO, keyring: BlobKeyring | None = None) -> tuple[str, int]:
    """Write the plaintext ``chunks`` in the stored format; return (SHA-256 hex of the plaintext, its size)."""
    sha256 = hashlib.sha256()
    size = 0
    if keyring is None:
        for chunk in chunks:
            sha256.update(chunk)
            size += len(chunk)
            out.write(chunk)
        return sha256.hexdigest(), size
    sealer = _Sealer(keyring, out)
    pending = bytearray()  # only ever a partial chunk: whole chunks are sealed straight from the input
    for chunk in chunks:
        sha256.update(chunk)
        size += len(chunk)
        view = memoryview(chunk)
        if pending:
            take = CHUNK_SIZE - len(pending)
            pending += view[:take]
            view = view[take:]
            if len(pending) < CHUNK_SIZE:
                continue
            sealer.seal(pending, final=False)
            pending.clear()
        while len(view) >= CHUNK_SIZE:
            sealer.seal(view[:CHUNK_SIZE], final=False)
            view = view[CHUNK_SIZE:]
        pending += view
    sealer.seal(pending, final=True)
    return sha256.hexdigest(), size


def _read_stored(stored: BinaryIO, keyring: BlobKeyring | None = None) -> Iterator[bytes]:
    """The plaintext of a stored blob, in chunks of up to :data:`CHUNK_SIZE`; BlobUnreadable if it fails."""
    start = stored.read(len(_MAGIC) + 1)
    encrypted = start == _MAGIC + bytes([_VERSION])
    if keyring is None:
        if encrypted:
            raise BlobUnreadable("the blob is encrypted and no blob keyring is configured")
        stored.seek(0)
        yield from _chunks(stored)
        return
    if not encrypted:
        raise BlobUnreadable("the blob is not in the encrypted format (damaged, or written without a key)")
    yield from _open_records(stored, keyring)


class _Sealer:
    """Writes the header, then seals one record per call."""

    def __init__(self, keyring: BlobKeyring, out: BinaryIO) -> None:
        key_id = keyring.active_id.encode("ascii")
        self._base = secrets.token_bytes(_NONCE_BYTES)
        self._header = (_MAGIC + bytes([_VERSION, len(key_id)]) + key_id + self._base
                        + struct.pack(">I", CHUNK_SIZE))
        self._aead = AESGCM(keyring.key(keyring.active_id))
        self._out = out
        self._index = 0
        out.write(self._header)

    def seal(self, plaintext: bytes | bytearray | memoryview, *, final: bool) -> None:
        nonce = _nonce(self._base, self._index)
        self._out.write(self._aead.encrypt(nonce, plaintext, _aad(self._header, self._index, final)))
        self._index += 1


def _open_records(stored: BinaryIO, keyring: BlobKeyring) -> Iterator[bytes]:
    (id_length,) = _read_exactly(stored, 1)
    key_id_bytes = _read_exactly(stored, id_length)
    base = _read_exactly(stored, _NONCE_BYTES)
    (chunk_size,) = struct.unpack(">I", _read_exactly(stored, 4))
    if not 0 < chunk_size <= 64 * CHUNK_SIZE:
        raise BlobUnreadable("the blob header is damaged")
    header = _MAGIC + bytes([_VERSION, id_length]) + key_id_bytes + base + struct.pack(">I", chunk_size)
    try:
        key_id = key_id_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise BlobUnreadable("the blob header is damaged") from None
    aead = AESGCM(keyring.key(key_id))
    record_size = chunk_size + _TAG_BYTES
    index = 0
    while True:
        record = stored.read(record_size)
        final = len(record) < record_size  # only the last record is short (possibly only its tag)
        try:
            plaintext = aead.decrypt(_nonce(base, index), record, _aad(header, index, final))
        except InvalidTag:
            raise BlobUnreadable(f"the blob failed authentication at chunk {index}: it is damaged, "
                                 "truncated or was tampered with") from None
        if plaintext:
            yield plaintext
        if final:
            return
        index += 1


def _read_exactly(stored: BinaryIO, size: int) -> bytes:
    data = stored.read(size)
    if len(data) != size:
        raise BlobUnreadable("the blob header is truncated")
    return data


def _nonce(base: bytes, index: int) -> bytes:
    return ((int.from_bytes(base, "big") + index) % (1 << 96)).to_bytes(_NONCE_BYTES, "big")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)

"""The file blob store: content addressed, streamed, atomic, and closed to path tricks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from fhir_bridge.adapters import blobstore
from fhir_bridge.adapters.blobstore import CHUNK_SIZE, FileBlobStore
from fhir_bridge.errors import InvalidInput, NotFound
from fhir_bridge.ports import BlobStorePort, StoredBlob


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs")


def test_file_blob_store_implements_the_port(store: FileBlobStore) -> None:
    port: BlobStorePort = store
    assert port is store


async def test_bytes_are_stored_under_their_sha256(store: FileBlobStore) -> None:
    data = b"%PDF-1.7 compte rendu"
    digest = hashlib.sha256(data).hexdigest()
    blob = await store.put_bytes(data)
    assert blob == StoredBlob(digest=digest, size=len(data))
    assert store.path(digest) == store.root / digest[:2] / digest[2:4] / digest
    assert store.path(digest).read_bytes() == data
    assert await store.exists(digest)
    assert await store.read_bytes(digest) == data


async def test_empty_content_is_a_blob_too(store: FileBlobStore) -> None:
    blob = await store.put_bytes(b"")
    assert blob.size == 0
    assert await store.read_bytes(blob.digest) == b""
    assert [chunk async for chunk in store.open_chunks(blob.digest)] == []


async def test_a_large_file_is_streamed_in_chunks_without_being_held_in_memory(
    store: FileBlobStore, tmp_path: Path
) -> None:
    source = tmp_path / "scan.dcm"
    size = 6 * CHUNK_SIZE + 123
    sha256 = hashlib.sha256()
    with source.open("wb") as out:
        for i in range(7):
            chunk = bytes([i]) * (CHUNK_SIZE if i < 6 else 123)
            sha256.update(chunk)
            out.write(chunk)

    tracemalloc.start()
    try:
        blob = await store.put_file(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob == StoredBlob(digest=sha256.hexdigest(), size=size)
    assert peak < 3 * CHUNK_SIZE, f"put_file peaked at {peak} bytes"
    assert source.exists()

    chunks = [chunk async for chunk in store.open_chunks(blob.digest)]
    assert [len(c) for c in chunks] == [CHUNK_SIZE] * 6 + [123]
    assert hashlib.sha256(b"".join(chunks)).hexdigest() == blob.digest


async def test_concurrent_puts_of_the_same_content_leave_one_complete_blob(store: FileBlobStore) -> None:
    data = os.urandom(3 * CHUNK_SIZE)
    blobs = await asyncio.gather(*(store.put_bytes(data) for _ in range(8)))
    assert len(set(blobs)) == 1
    assert await store.read_bytes(blobs[0].digest) == data
    assert list((store.root / ".incoming").iterdir()) == []


async def test_blobs_are_private_to_the_service(store: FileBlobStore) -> None:
    blob = await store.put_bytes(b"sensitive")
    path = store.path(blob.digest)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


async def test_a_failed_write_publishes_nothing(store: FileBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(chunks: object, out: object) -> tuple[str, int]:
        raise OSError("disk full")

    monkeypatch.setattr(blobstore, "_write_stored", broken)
    with pytest.raises(OSError, match="disk full"):
        await store.put_bytes(b"never published")
    assert list((store.root / ".incoming").iterdir()) == []
    assert [p for p in store.root.rglob("*") if p.is_file()] == []


async def test_unknown_digest_is_not_found(store: FileBlobStore) -> None:
    missing = "0" * 64
    assert not await store.exists(missing)
    with pytest.raises(NotFound):
        await store.read_bytes(missing)
    with pytest.raises(NotFound):
        store.open_chunks(missing)


@pytest.mark.parametrize(
    "digest",
    [
        "../../etc/passwd",
        "A" * 64,  # uppercase is another name for the same digest: refuse it rather than store twice
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "/" + "a" * 63,
        "a" * 62 + "/.",
        "",
    ],
)
async def test_anything_but_a_sha256_hex_digest_is_refused(store: FileBlobStore, digest: str) -> None:
    with pytest.raises(InvalidInput):
        store.path(digest)
    with pytest.raises(InvalidInput):
        await store.exists(digest)
    with pytest.raises(InvalidInput):
        await store.read_bytes(digest)
    with pytest.raises(InvalidInput):
        store.open_chunks(digest)


async def test_a_stream_abandoned_early_closes_its_file(store: FileBlobStore) -> None:
    blob = await store.put_bytes(b"x" * (3 * CHUNK_SIZE))
    chunks = store.open_chunks(blob.digest)
    first = await anext(chunks)
    assert len(first) == CHUNK_SIZE
    assert str(store.path(blob.digest)) in _open_files()
    await chunks.aclose()
    assert str(store.path(blob.digest)) not in _open_files()


def _open_files() -> set[str]:
    names = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the fd listing /proc itself is gone already
            names.add(os.readlink(f"/proc/self/fd/{fd}"))
    return names

"""Blobs at rest: AES-256-GCM in authenticated chunks, unreadable without the key, keys that rotate."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tracemalloc
from pathlib import Path

import pytest

from fhir_bridge.adapters.blobstore import CHUNK_SIZE, BlobKeyring, BlobUnreadable, FileBlobStore
from fhir_bridge.errors import InvalidInput
from fhir_bridge.ports import StoredBlob

REPORT = b"<ClinicalDocument>compte rendu d'IRM: lesion hepatique segment IV, patient DUPONT Jeanne</ClinicalDocument>"


def keyring(*ids: str, active: str | None = None) -> BlobKeyring:
    return BlobKeyring(active_id=active or ids[-1], keys={key_id: os.urandom(32) for key_id in ids})


@pytest.fixture
def keys() -> BlobKeyring:
    return keyring("k1")


@pytest.fixture
def store(tmp_path: Path, keys: BlobKeyring) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs", keys)


async def test_blob_bytes_on_disk_do_not_contain_the_plaintext(store: FileBlobStore) -> None:
    blob = await store.put_bytes(REPORT)
    on_disk = store.path(blob.digest).read_bytes()
    assert REPORT not in on_disk
    assert b"DUPONT" not in on_disk
    assert on_disk.startswith(b"FHIRBLOB\x01")
    assert await store.read_bytes(blob.digest) == REPORT


async def test_the_content_address_stays_the_sha256_of_the_plaintext(store: FileBlobStore) -> None:
    blob = await store.put_bytes(REPORT)
    assert blob == StoredBlob(digest=hashlib.sha256(REPORT).hexdigest(), size=len(REPORT))


async def test_the_same_content_is_encrypted_under_a_fresh_nonce_each_time(tmp_path: Path, keys: BlobKeyring) -> None:
    first = FileBlobStore(tmp_path / "a", keys)
    second = FileBlobStore(tmp_path / "b", keys)
    blob = await first.put_bytes(REPORT)
    await second.put_bytes(REPORT)
    assert first.path(blob.digest).read_bytes() != second.path(blob.digest).read_bytes()


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE, 3 * CHUNK_SIZE + 17],
)
async def test_any_size_round_trips_through_put_bytes(store: FileBlobStore, size: int) -> None:
    data = os.urandom(size)
    blob = await store.put_bytes(data)
    assert await store.read_bytes(blob.digest) == data
    chunks = [chunk async for chunk in store.open_chunks(blob.digest)]
    assert b"".join(chunks) == data
    assert all(0 < len(chunk) <= CHUNK_SIZE for chunk in chunks)


async def test_uneven_input_chunks_are_regrouped_into_whole_records(tmp_path: Path, keys: BlobKeyring) -> None:
    source = tmp_path / "scan.bin"
    data = os.urandom(2 * CHUNK_SIZE + 5)
    source.write_bytes(data)
    store = FileBlobStore(tmp_path / "blobs", keys)
    blob = await store.put_file(source)
    chunks = [chunk async for chunk in store.open_chunks(blob.digest)]
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, 5]
    assert b"".join(chunks) == data
    # one header, three records (two full, one final of 5 bytes), each with its 16-byte tag
    header = len(b"FHIRBLOB") + 2 + len(keys.active_id) + 12 + 4
    assert store.path(blob.digest).stat().st_size == header + 2 * (CHUNK_SIZE + 16) + 5 + 16


async def test_a_large_file_is_encrypted_without_being_held_in_memory(store: FileBlobStore, tmp_path: Path) -> None:
    source = tmp_path / "scan.dcm"
    with source.open("wb") as out:
        for i in range(6):
            out.write(bytes([i]) * CHUNK_SIZE)
    tracemalloc.start()
    try:
        blob = await store.put_file(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert blob.size == 6 * CHUNK_SIZE
    assert peak < 4 * CHUNK_SIZE, f"encrypted put_file peaked at {peak} bytes"


async def test_a_flipped_byte_anywhere_fails_to_read(store: FileBlobStore) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 100)
    blob = await store.put_bytes(data)
    path = store.path(blob.digest)
    original = path.read_bytes()
    header = len(original) - (2 * (CHUNK_SIZE + 16) + 100 + 16)
    for offset in (header - 1, header + 10, header + CHUNK_SIZE + 20, len(original) - 1):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(BlobUnreadable, match=r"authentication|damaged"):
            await store.read_bytes(blob.digest)
        with pytest.raises(BlobUnreadable):
            _ = [chunk async for chunk in store.open_chunks(blob.digest)]


async def test_a_changed_key_id_in_the_header_fails(tmp_path: Path) -> None:
    keys = keyring("k1", "k2", active="k1")
    store = FileBlobStore(tmp_path / "blobs", keys)
    blob = await store.put_bytes(REPORT)
    path = store.path(blob.digest)
    path.write_bytes(path.read_bytes().replace(b"k1", b"k2", 1))
    with pytest.raises(BlobUnreadable, match="authentication"):
        await store.read_bytes(blob.digest)


@pytest.mark.parametrize("cut", ["last byte", "last record", "inside a record", "header"])
async def test_a_truncated_blob_fails_to_read(store: FileBlobStore, cut: str) -> None:
    data = os.urandom(2 * CHUNK_SIZE)  # two full records and an empty final one
    blob = await store.put_bytes(data)
    path = store.path(blob.digest)
    original = path.read_bytes()
    keep = {"last byte": len(original) - 1,
            "last record": len(original) - 16,  # drops the empty final record: ends on a record boundary
            "inside a record": len(original) - CHUNK_SIZE // 2,
            "header": 12}[cut]
    path.write_bytes(original[:keep])
    with pytest.raises(BlobUnreadable, match=r"truncated|authentication"):
        await store.read_bytes(blob.digest)


async def test_bytes_appended_to_a_blob_are_detected(store: FileBlobStore) -> None:
    blob = await store.put_bytes(REPORT)
    path = store.path(blob.digest)
    path.write_bytes(path.read_bytes() + b"extra")
    with pytest.raises(BlobUnreadable):
        await store.read_bytes(blob.digest)


async def test_blobs_written_with_an_old_key_still_read_after_rotation(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "blob-keys.json"
    first = BlobKeyring.load_or_create(key_file)
    old_blob = await FileBlobStore(tmp_path / "blobs", first).put_bytes(b"written under key 1")

    second = BlobKeyring.rotate(key_file)
    assert second.active_id != first.active_id
    assert set(second.keys) == {first.active_id, second.active_id}
    assert BlobKeyring.load(key_file) == second

    store = FileBlobStore(tmp_path / "blobs", BlobKeyring.load(key_file))
    new_blob = await store.put_bytes(b"written under key 2")
    assert second.active_id.encode() in store.path(new_blob.digest).read_bytes()[:64]
    assert await store.read_bytes(old_blob.digest) == b"written under key 1"
    assert await store.read_bytes(new_blob.digest) == b"written under key 2"


async def test_a_blob_whose_key_was_removed_names_the_missing_key(tmp_path: Path) -> None:
    blob = await FileBlobStore(tmp_path / "blobs", keyring("old")).put_bytes(REPORT)
    with pytest.raises(BlobUnreadable, match=r"'old'.*not in the keyring"):
        await FileBlobStore(tmp_path / "blobs", keyring("new")).read_bytes(blob.digest)


async def test_the_wrong_key_under_the_same_id_fails_authentication(tmp_path: Path) -> None:
    blob = await FileBlobStore(tmp_path / "blobs", keyring("k1")).put_bytes(REPORT)
    with pytest.raises(BlobUnreadable, match="authentication"):
        await FileBlobStore(tmp_path / "blobs", keyring("k1")).read_bytes(blob.digest)


async def test_an_encrypted_blob_is_refused_by_a_store_without_a_keyring(store: FileBlobStore) -> None:
    blob = await store.put_bytes(REPORT)
    with pytest.raises(BlobUnreadable, match="no blob keyring"):
        await FileBlobStore(store.root).read_bytes(blob.digest)


async def test_a_plaintext_file_in_an_encrypted_store_is_refused(tmp_path: Path, keys: BlobKeyring) -> None:
    blob = await FileBlobStore(tmp_path / "blobs").put_bytes(REPORT)
    with pytest.raises(BlobUnreadable, match="not in the encrypted format"):
        await FileBlobStore(tmp_path / "blobs", keys).read_bytes(blob.digest)


def test_the_key_file_is_created_once_private_and_reused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "blob-keys.json"
    created = BlobKeyring.load_or_create(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert BlobKeyring.load_or_create(key_file) == created
    document = json.loads(key_file.read_text())
    assert document["active"] == created.active_id
    assert list(key_file.parent.iterdir()) == [key_file]  # no temporary file left behind


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"active": "k1", "keys": {}}', b'{"active": "k1", "keys": {"k1": "c2hvcnQ"}}', b"[]"],
)
def test_a_broken_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    key_file = tmp_path / "blob-keys.json"
    key_file.write_bytes(content)
    with pytest.raises(InvalidInput, match="blob key"):
        BlobKeyring.load(key_file)


def test_the_keyring_repr_does_not_show_keys() -> None:
    keys = keyring("k1")
    assert keys.keys["k1"].hex() not in repr(keys)
    assert str(keys.keys["k1"]) not in repr(keys)

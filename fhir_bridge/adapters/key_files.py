"""Secret files under ``<data_dir>/keys``: written atomically, readable by the service user only.

Shared by the blob keyring and the bridge's signing keys. Two rules matter:

* a key file is created once, even when the API and several workers start together on a fresh data
  directory: :func:`create_once` publishes with ``os.link``, which fails if the name exists, so the loser
  of the race reads the winner's key instead of overwriting it (two different keys would leave blobs or
  tokens nobody can read or verify);
* files are 0600 in a 0700 directory, and fsynced before they are published.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _write_temp(directory: Path, data: bytes) -> str:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=".key-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    return temp_name


def create_once(path: Path, data: bytes) -> bytes:
    """Create ``path`` holding ``data`` unless it exists; return what the file holds afterwards."""
    temp_name = _write_temp(path.parent, data)
    try:
        os.link(temp_name, path)
    except FileExistsError:
        return path.read_bytes()
    finally:
        os.unlink(temp_name)
    return data


def replace(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (a reader sees the old content or the new, never a mix)."""
    temp_name = _write_temp(path.parent, data)
    try:
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise

"""The secret behind case pseudonyms (:mod:`fhir_bridge.access.pseudonym`): 32 random bytes in
``<data_dir>/keys/case-pseudonym.key``, created 0600 on first use (:func:`key_files.create_once`, so the API and
the workers starting together agree on one key).

Losing the file changes every case's pseudonym (reviewers abroad would no longer find their cases by it);
disclosing it lets anyone holding a Task id compute the pseudonym, never the INS. Back it up with the blob keys.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fhir_bridge.adapters import key_files
from fhir_bridge.adapters.signing import SigningKeyError

KEY_FILE = "case-pseudonym.key"
_KEY_BYTES = 32


def load_or_create_pseudonym_key(keys_dir: Path) -> bytes:
    """The key in ``keys_dir/case-pseudonym.key``, created when absent."""
    path = Path(keys_dir) / KEY_FILE
    try:
        key = path.read_bytes() if path.exists() else key_files.create_once(path, secrets.token_bytes(_KEY_BYTES))
    except OSError as exc:
        raise SigningKeyError(f"cannot read the case pseudonym key {path.name}: {type(exc).__name__}") from None
    if len(key) != _KEY_BYTES:
        raise SigningKeyError(f"the case pseudonym key {path.name} must hold {_KEY_BYTES} bytes")
    return key

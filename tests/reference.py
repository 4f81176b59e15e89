"""Reference data for tests: the repository's data folders, and the shipped data read once.

The bridge finds its data through :mod:`fhir_bridge.adapters.reference_data` (settings, else the copy in the
package, ``fhir_bridge/data``: symlinks to these folders); a test about the files people edit names them here.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fhir_bridge.main import ReferenceData, load_reference_data

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
MAPPINGS_DIR = ROOT / "mappings"
PROFILES_DIR = ROOT / "profiles"
REGISTRY_FILE = CONFIG_DIR / "reviewers.json"
DEADLINES_FILE = CONFIG_DIR / "deadlines.json"
LABELS_FILE = CONFIG_DIR / "report-labels.json"


@functools.cache
def shipped() -> ReferenceData:
    """Every data file as shipped, read once per test run."""
    return load_reference_data()

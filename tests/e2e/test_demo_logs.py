"""Issue 6 "Done when": the logs of a whole demo run contain no INS and no patient name.

``fhir-bridge demo`` runs as a subprocess (private Redis, sandbox, API, worker, real clients and tokens) at DEBUG,
the most talkative level. The patients' identifiers and names are read from what the demo produced (the case
bundle) and from the sandbox world every demo builds, then searched for in every log file, case-insensitively
and also in their JSON-escaped and accent-stripped forms (a log line may carry either).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.sandbox.world import build_world

pytestmark = pytest.mark.e2e


def _forms(value: str) -> set[str]:
    plain = "".join(c for c in unicodedata.normalize("NFKD", value) if not unicodedata.combining(c))
    return {value.lower(), plain.lower(), json.dumps(value)[1:-1].lower()}


def _secrets_of(patient: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for identifier in patient.get("identifier", []) or []:
        if identifier.get("value"):
            found |= _forms(str(identifier["value"]))
    for name in patient.get("name", []) or []:
        for part in [name.get("family"), *(name.get("given") or [])]:
            if isinstance(part, str) and len(part) >= 3:
                found |= _forms(part)
    return found


def test_a_whole_demo_run_logs_no_ins_and_no_patient_name(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {**os.environ, "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "fhir_bridge", "demo", "--out", str(out), "--log-level", "DEBUG"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    bundle = json.loads((out / "bundle.json").read_bytes())
    patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    assert patients, "the case bundle has its Patient"
    secrets = set().union(*(_secrets_of(p) for p in patients))
    # and every patient of the sandbox the demo ran against, not only the one whose case was made
    world = build_world(patients=3)
    for patient in world.patients:
        secrets |= _forms(patient.nir) | _forms(patient.given) | _forms(patient.family)
    assert any(s.isdigit() for s in secrets), "the INS values are among what is searched for"

    logs = sorted((out / "logs").glob("*.log"))
    assert {p.name for p in logs} >= {"api.log", "worker.log", "sandbox.log"}
    text = "\n".join(p.read_text("utf-8", errors="replace") for p in logs).lower()
    # DEBUG logs were written (an empty log would prove nothing): asyncio's DEBUG line and the bridge's own events.
    # (Not a length: most of it used to be redis-py's per-connection warnings, whose count depends on the pool.)
    assert "using selector" in text and '"event": "worker.started"' in text, text[-2000:]
    leaked = sorted(s for s in secrets if s in text)
    assert not leaked, f"patient identifiers or names in the demo logs: {len(leaked)} value(s)"

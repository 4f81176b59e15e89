"""Helpers for the end-to-end tests of issue 8: running ``fhir-bridge`` commands against a test bridge and
writing worklists for the sandbox's patients."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Bridge


def run_cli(bridge: Bridge, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m fhir_bridge ARGS`` with the bridge's settings (Redis, source, data directory)."""
    return subprocess.run([sys.executable, "-m", "fhir_bridge", *args], capture_output=True, text=True,
                          env={**_base_env(), **bridge.env, **env}, timeout=timeout, check=False)


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


def platform_options(bridge: Bridge, client_id: str = "platform") -> list[str]:
    """``--api --client-id --key`` of a registered platform client (keys written by dev_clients.provision)."""
    key = bridge.data_dir / "client-keys" / client_id / "client-private.jwk.json"
    return ["--api", bridge.api, "--client-id", client_id, "--key", str(key)]


def summary(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON summary a sync command prints as its last stdout line."""
    assert result.stdout.strip(), result.stderr
    answer: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def worklist_line(patient: dict[str, Any], question: str, **extra: str) -> str:
    """A CSV line (header: :data:`HEADER`) asking about ``patient`` of the sandbox's world."""
    ident = patient["identifier"]
    fields = {"patient": f"{ident['system']}|{ident['value']}", "specialty": patient.get("specialty", "oncology"),
              "question": question, "deadline": "2026-12-31", "requester": "Dr Bernard", **extra}
    return ",".join(fields[name] for name in HEADER.split(","))


HEADER = "patient,specialty,question,deadline,requester"


def write_worklist(path: Path, lines: list[str]) -> Path:
    path.write_text(HEADER + "\n" + "\n".join(lines) + "\n", "utf-8")
    return path

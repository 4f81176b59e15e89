"""Signed case bundles end to end: a real collect (the sandbox over HTTP, a private redis-server, encrypted blobs,
the bridge's own key, wired by the composition root) serves bundles that `fhir-bridge verify-bundle` accepts, run
as a child process; a changed copy, an unsigned one, another key or an unreadable file are refused."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.settings import load_settings
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.main import open_runtime
from fhir_bridge.ports import Job
from fhir_bridge.workflow.cases import COLLECT_JOB
from tests.e2e.conftest import Bridge, Sandbox

pytestmark = pytest.mark.e2e
ABROAD = AccessContext(client_id="reviewer-onco-de-1", role="reviewer", tenant="reviewers", scopes=frozenset(),
                       jti="t", reviewer="onco-de-1")


@dataclass
class Served:
    data_dir: Path
    plain: Path
    pseudonymised: Path
    ins: str


def verify_bundle(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "fhir_bridge", "verify-bundle", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def _collect_and_serve(data_dir: Path, redis_url: str, sandbox: Sandbox) -> Served:
    settings = load_settings(env={}, data_dir=str(data_dir), source__url=sandbox.url, source__backoff_initial=0.05)
    patient = sandbox.world()["patients"][0]
    async with open_runtime(settings, redis_url, "test") as runtime:
        request = (await runtime.bridge.cases.submit_request(second_opinion_request(patient, "SIGNED-1"),
                                                      tenant="platform")).resource
        task = await runtime.bridge.book.for_request(request["id"])
        await runtime.bridge.cases.run_collect_job(Job(f"collect:{task['id']}", COLLECT_JOB, {"task": task["id"]}))
        task = await runtime.bridge.book.for_request(request["id"])
        assert task["status"] in ("ready", "on-hold"), task.get("statusReason")
        bundle_id = next(o["valueReference"]["reference"] for o in task["output"]
                         if o["type"]["coding"][0]["code"] == "case-bundle").split("/")[1]
        files = {}
        for name, reader in (("plain", None), ("pseudonymised", ABROAD)):
            files[name] = data_dir / f"{name}.json"
            files[name].write_bytes(b"".join([c async for c in runtime.bridge.bundles.chunks(bundle_id, reader)]))
    return Served(data_dir, files["plain"], files["pseudonymised"], patient["identifier"]["value"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Served:
    data_dir = tmp_path_factory.mktemp("signed")
    with EmbeddedRedis(data_dir / "redis-test") as redis:
        return asyncio.run(_collect_and_serve(data_dir, redis.url, sandbox))


def test_served_bundles_verify_with_the_bridge_key_from_the_command_line(served: Served) -> None:
    for path in (served.plain, served.pseudonymised):
        result = verify_bundle(served.data_dir, path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("signature valid (kid ") and result.stderr == ""
    jwks = served.data_dir / "keys" / "audit-signing.jwk.json"
    assert verify_bundle(served.data_dir, served.plain, "--jwks", jwks).returncode == 0
    assert served.ins.encode() in served.plain.read_bytes()
    assert served.ins.encode() not in served.pseudonymised.read_bytes()


def changed(served: Served, name: str, edit: Any) -> Path:
    bundle = json.loads(served.plain.read_bytes())
    edit(bundle)
    path = served.data_dir / f"{name}.json"
    path.write_text(json.dumps(bundle, ensure_ascii=False), "utf-8")
    return path


def _flip_data(bundle: dict[str, Any]) -> None:
    binary = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Binary")
    binary["data"] = ("A" if binary["data"][10] != "A" else "B").join((binary["data"][:10], binary["data"][11:]))


def _retitle(bundle: dict[str, Any]) -> None:
    bundle["entry"][0]["resource"]["title"] += "."


def test_a_tampered_or_unsigned_bundle_exits_1_in_one_line(served: Served) -> None:
    cases = {
        "entry": _retitle,
        "binary": _flip_data,
        "removed": lambda b: b["entry"].pop(),
        "unsigned": lambda b: b.pop("signature"),
    }
    for name, edit in cases.items():
        result = verify_bundle(served.data_dir, changed(served, name, edit))
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert result.stderr.startswith("fhir-bridge: error: signature invalid") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr and result.stdout == ""
    raw = served.plain.read_bytes()
    cut = served.data_dir / "byte.json"
    at = raw.index(b'"title":"') + 12
    cut.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])
    assert verify_bundle(served.data_dir, cut).returncode == 1


def test_another_key_exits_1_and_an_unreadable_file_exits_2(served: Served) -> None:
    other = served.data_dir / "other.jwk.json"
    other.write_text(json.dumps({"keys": [Es384Signer.generate().public_jwk()]}))
    result = verify_bundle(served.data_dir, served.plain, "--jwks", other)
    assert result.returncode == 1 and "not a trusted key" in result.stderr
    garbage = served.data_dir / "garbage.json"
    garbage.write_bytes(b'{"resourceType": "Bundle", "entry": [')
    for path, extra in ((garbage, ()), (served.data_dir / "missing.json", ()), (served.plain, ("--jwks", garbage))):
        result = verify_bundle(served.data_dir, path, *extra)
        assert result.returncode == 2, (path, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_bundle_read_over_the_api_verifies(bridge: Bridge, sandbox: Sandbox, tmp_path: Path) -> None:
    """The whole path: the platform asks, the worker packages and signs, the API serves the assigned reviewer
    (the platform's tokens carry no Bundle scope), the CLI verifies."""
    patient = sandbox.world()["patients"][1]
    with bridge.client("platform") as platform:
        answer = platform.post(f"{bridge.api}/ServiceRequest", json=second_opinion_request(patient, "SIGNED-2"),
                               headers={"Content-Type": "application/fhir+json"})
        assert answer.status_code == 201, answer.text
        deadline, task = time.monotonic() + 60, dict[str, Any]()
        while time.monotonic() < deadline and task.get("status") not in ("ready", "on-hold", "failed"):
            time.sleep(0.2)
            found = platform.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{answer.json()['id']}"})
            task = (found.raise_for_status().json().get("entry") or [{}])[0].get("resource", {})
    assert task.get("status") == "ready", task
    reference = next(o["valueReference"]["reference"] for o in task["output"]
                     if o["type"]["coding"][0]["code"] == "case-bundle")
    path = tmp_path / "served.json"
    reviewer = bridge.client(bridge.reviewer_of(task))
    with reviewer, reviewer.stream("GET", f"{bridge.api}/{reference}") as got, path.open("wb") as out:
        assert got.status_code == 200, got.read()
        for chunk in got.iter_bytes():
            out.write(chunk)
    result = verify_bundle(bridge.data_dir, path)
    assert result.returncode == 0, result.stderr

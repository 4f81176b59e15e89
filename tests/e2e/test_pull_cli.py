"""`fhir-bridge pull` against the sandbox over real HTTP: what is packaged, what is left out, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.dev.processes import ProcessGroup
from fhir_bridge.fhir.resources import validate
from tests.e2e.conftest import Sandbox, start_sandbox

pytestmark = pytest.mark.e2e


def pull(source: str, patient: str, out: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhir_bridge", "pull", "--source", source, "--patient", patient, "--out", str(out),
         *extra], capture_output=True, text=True, timeout=timeout, env={"FHIR_BRIDGE_SOURCE__BACKOFF_INITIAL": "0.05",
                                                                         "PATH": "/usr/bin:/bin"},
    )


def token(patient: dict[str, Any]) -> str:
    return f"{patient['identifier']['system']}|{patient['identifier']['value']}"


def check_case(out: Path, patient: dict[str, Any], world: dict[str, Any], root: str) -> None:
    bundle = json.loads((out / "bundle.json").read_text("utf-8"))
    validate(bundle)
    assert bundle["type"] == "document" and bundle["entry"][0]["resource"]["resourceType"] == "Composition"
    docs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    packaged = {d["meta"]["source"].split("/DocumentReference/")[1].split("/")[0] for d in patient_docs(docs)}
    expected = set(patient["documents"]["intact"])
    assert packaged == expected
    assert len(docs) == len(expected)
    # nothing of any other patient
    others = {d for p in world["patients"] if p["id"] != patient["id"] for d in p["documents"]["all"]}
    assert not packaged & others
    studies = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
    assert {s["meta"]["source"].split("/ImagingStudy/")[1].split("/")[0] for s in studies} == set(patient["studies"])
    # every document's Binary is in the bundle and matches its hash
    full = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    for doc in docs:
        attachment = doc["content"][0]["attachment"]
        assert full[attachment["url"]]["resourceType"] == "Binary"
    problems = json.loads((out / "problems.json").read_text("utf-8"))
    by_reason: dict[str, set[str]] = {}
    for problem in problems:
        by_reason.setdefault(problem["reason"], set()).add(problem["sourceUrl"].rsplit("/", 1)[1])
    assert by_reason.get("masked", set()) == set(patient["documents"]["masked"])
    assert by_reason.get("hash-mismatch", set()) == set(patient["documents"]["corrupt"])
    assert by_reason.get("size-mismatch", set()) == set(patient["documents"]["truncated"])
    assert by_reason.get("superseded")  # the version replaced by a current document is named
    assert by_reason["superseded"] <= set(patient["documents"]["superseded"])


def patient_docs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return docs


def test_pull_packages_exactly_the_current_unmasked_intact_documents(sandbox: Sandbox, tmp_path: Path) -> None:
    world = sandbox.world()
    patient = world["patients"][0]
    result = pull(sandbox.url, token(patient), tmp_path)
    assert result.returncode == 3, result.stderr  # something was left out
    summary = json.loads(result.stdout)
    assert summary["documentsPackaged"] == len(patient["documents"]["intact"])
    check_case(tmp_path, patient, world, sandbox.root)
    assert patient["identifier"]["value"] not in result.stderr


def test_pull_gives_the_same_result_through_faults_and_latency(processes: ProcessGroup, tmp_path: Path) -> None:
    faulty = start_sandbox(processes, "sandbox-faulty", "--patients", "4", "--page-cap", "3", "--fault-rate", "0.3",
                           "--latency", "20")
    world = faulty.world()
    patient = world["patients"][1]
    result = pull(faulty.url, token(patient), tmp_path, "--concurrency", "4")
    assert result.returncode in (0, 3), result.stderr
    check_case(tmp_path, patient, world, faulty.root)


def test_a_source_that_never_recovers_ends_with_exit_1_in_bounded_time(processes: ProcessGroup,
                                                                       tmp_path: Path) -> None:
    dead = start_sandbox(processes, "sandbox-dead", "--patients", "1", "--fault-rate", "1.0")
    started = time.monotonic()
    result = pull(dead.url, "urn:oid:1.2.250.1.213.1.4.10|295109912611193", tmp_path, "--deadline", "5")
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "did not answer" in result.stderr or "deadline" in result.stderr


def test_a_malformed_nir_is_refused_before_any_network_call(sandbox: Sandbox, tmp_path: Path) -> None:
    result = pull("http://127.0.0.1:9/fhir", "urn:oid:1.2.250.1.213.1.4.10|295109912611194", tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("fhir-bridge: error: ") and result.stderr.count("\n") == 1
    assert "key" in result.stderr


def test_an_unknown_patient_is_bad_input(sandbox: Sandbox, tmp_path: Path) -> None:
    result = pull(sandbox.url, "urn:oid:1.2.250.1.213.1.4.10|295109912611193", tmp_path)
    assert result.returncode == 2 and "no Patient" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("where", ["html", "sandbox-root"])
def test_a_url_that_is_not_a_fhir_server(where: str, sandbox: Sandbox, liar: str, tmp_path: Path) -> None:
    url = f"{liar}/html" if where == "html" else f"{sandbox.root}/nothing-here"
    result = pull(url, "urn:oid:1.2.250.1.213.1.4.10|295109912611193", tmp_path)
    assert result.returncode == 2, result.stderr
    assert "not a FHIR" in result.stderr or "not an MHD source" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_search_page_that_is_not_a_bundle(liar: str, tmp_path: Path) -> None:
    result = pull(f"{liar}/not-a-bundle", "urn:oid:1.2.250.1.213.1.4.10|295109912611193", tmp_path)
    assert result.returncode == 1 and "searchset Bundle" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_next_link_loop(liar: str, tmp_path: Path) -> None:
    result = pull(f"{liar}/loop", "urn:oid:1.2.250.1.213.1.4.10|295109912611193", tmp_path)
    assert result.returncode == 1 and "loop" in result.stderr
    assert result.stderr.count("\n") == 1


def test_progress_shows_on_a_terminal_and_not_in_a_pipe(sandbox: Sandbox, tmp_path: Path) -> None:
    import os

    from tests.e2e.terminal import run_on_terminal

    patient = sandbox.world()["patients"][1]
    returncode, seen = run_on_terminal(
        [sys.executable, "-m", "fhir_bridge", "pull", "--source", sandbox.url, "--patient", token(patient),
         "--out", str(tmp_path / "tty")], dict(os.environ))
    assert returncode in (0, 3)
    assert b"retrieve" in seen  # the rich progress bar, on the terminal
    piped = pull(sandbox.url, token(patient), tmp_path / "pipe")
    assert piped.returncode in (0, 3) and piped.stderr == ""  # nothing on a non-terminal stderr

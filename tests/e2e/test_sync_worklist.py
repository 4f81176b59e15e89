"""``fhir-bridge sync worklist`` against real processes: idempotent submission through the API, bad lines
reported by number (the rest proceeds), ``--dry-run`` sends nothing."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from fhir_bridge.fhir.identity import nir_key
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.sync_helpers import platform_options, run_cli, summary, worklist_line, write_worklist

pytestmark = pytest.mark.e2e


def request_total(bridge: Bridge) -> int:
    with bridge.client("platform") as platform:
        answer = platform.get(f"{bridge.api}/ServiceRequest", params={"_count": "0"})
        return int(answer.raise_for_status().json()["total"])


def test_a_worklist_is_submitted_once_and_bad_lines_are_reported(bridge: Bridge, sandbox: Sandbox,
                                                                  tmp_path: Path) -> None:
    patients = sandbox.world()["patients"]
    unknown = {"identifier": {"system": patients[0]["identifier"]["system"],
                              "value": f"1991299123456{nir_key('1991299123456'):02d}"}}
    good = [worklist_line(p, f"Avis sur le dossier {n}") for n, p in enumerate(patients)]
    bad_nir = worklist_line(patients[0], "x").replace(patients[0]["identifier"]["value"],
                                                      patients[0]["identifier"]["value"][:-2] + "00")
    lines = [*good[:2], bad_nir, worklist_line(patients[1], "y", specialty="astrology"),
             worklist_line(patients[2], '"jamais fermé'), worklist_line(unknown, "inconnu"), *good[2:]]
    worklist = write_worklist(tmp_path / "rcp.csv", lines)
    before = request_total(bridge)

    dry = run_cli(bridge, "sync", "worklist", str(worklist), "--dry-run")
    assert dry.returncode == 3, dry.stderr
    assert summary(dry) | {"failures": []} == {"lines": 8, "dryRun": True, "valid": 5, "failed": 3, "failures": []}
    assert request_total(bridge) == before

    first = run_cli(bridge, "sync", "worklist", str(worklist), *platform_options(bridge))
    assert first.returncode == 3, first.stderr
    report = summary(first)
    assert (report["created"], report["alreadyThere"], report["failed"]) == (len(patients), 0, 4)
    reasons = {f["line"]: f["reason"] for f in report["failures"]}
    assert sorted(reasons) == [4, 5, 6, 7]  # line 1 is the header
    assert "control key" in reasons[4] and "specialty" in reasons[5] and "quoting" in reasons[6]
    assert reasons[7].startswith("HTTP 422") and "patient" in reasons[7]
    for value in [p["identifier"]["value"] for p in patients] + [unknown["identifier"]["value"]]:
        assert value not in first.stdout + first.stderr, "no patient identifier in the command's output"
    assert request_total(bridge) == before + len(patients)

    again = run_cli(bridge, "sync", "worklist", str(worklist), *platform_options(bridge))
    assert again.returncode == 3, again.stderr
    assert (summary(again)["created"], summary(again)["alreadyThere"]) == (0, len(patients))
    assert request_total(bridge) == before + len(patients)


def test_a_clean_worklist_exits_0_and_a_missing_file_or_client_exits_2(bridge: Bridge, sandbox: Sandbox,
                                                                       tmp_path: Path) -> None:
    patient = sandbox.world()["patients"][3]
    worklist = write_worklist(tmp_path / "one.csv", [worklist_line(patient, "Seul avis")])
    done = run_cli(bridge, "sync", "worklist", str(worklist), *platform_options(bridge))
    assert done.returncode == 0, done.stderr
    assert summary(done)["created"] == 1
    missing = run_cli(bridge, "sync", "worklist", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "cannot read" in missing.stderr
    no_client = run_cli(bridge, "sync", "worklist", str(worklist))
    assert no_client.returncode == 2 and "--client-id" in no_client.stderr
    auditor_key = bridge.data_dir / "client-keys" / "auditor" / "client-private.jwk.json"
    wrong_key = [*platform_options(bridge)[:4], "--key", str(auditor_key)]
    refused = run_cli(bridge, "sync", "worklist", str(worklist), *wrong_key)
    assert refused.returncode == 1 and "refused" in refused.stderr, refused.stderr
    with httpx.Client(timeout=10) as plain:
        assert plain.get(bridge.api.removesuffix("/fhir") + "/readyz").status_code == 200


def test_the_worklist_shows_progress_on_a_terminal_and_nothing_in_a_pipe(bridge: Bridge, sandbox: Sandbox,
                                                                        tmp_path: Path) -> None:
    import os
    import sys

    from tests.e2e.terminal import run_on_terminal

    patients = sandbox.world()["patients"]
    worklist = write_worklist(tmp_path / "tty.csv", [worklist_line(p, "Avis (terminal)") for p in patients])
    returncode, seen = run_on_terminal([sys.executable, "-m", "fhir_bridge", "sync", "worklist", str(worklist),
                                        *platform_options(bridge)], {**os.environ, **bridge.env})
    assert returncode == 0
    assert b"submit" in seen  # the rich progress bar, on the terminal
    piped = run_cli(bridge, "sync", "worklist", str(worklist), *platform_options(bridge))
    assert piped.returncode == 0 and piped.stderr == ""  # nothing on a non-terminal stderr
    assert summary(piped)["alreadyThere"] == len(patients)

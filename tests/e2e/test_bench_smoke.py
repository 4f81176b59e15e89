"""The benchmark suite in its quick mode, so it does not rot: every part runs against real processes and
prints its table. Behaviour only (it runs, it measures what it says, the clients made the same requests):
the figures themselves are for BENCHMARKS.md, never for a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_the_quick_benchmark_suite_runs_every_part_and_prints_its_table(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--workdir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| part | figure | value | target | met |" in done.stdout
    rows = json.loads((tmp_path / "results.json").read_text("utf-8"))["rows"]
    parts = {row["part"] for row in rows}
    assert parts == {"1 pull", "2 memory", "3 api", "3 audit", "4 sync"}
    measured = [row for row in rows if row["part"] != "4 sync"]
    assert all(row["value"] and row["value"] > 0 for row in measured)
    pull = next(row for row in rows if row["figure"].startswith("bridge / limit"))
    assert "DIFFER" not in pull["reference"] and "documents [40] vs [40]" in pull["reference"]
    assert all("chain verified" in row["reference"] for row in rows if row["part"] == "3 audit")
    sync = next(row for row in rows if row["part"] == "4 sync")
    assert "harness ran" in sync["reference"] or sync["met"] is not None
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # cases, keys and logs are cleaned up

"""The built wheel, installed into a fresh virtualenv, starts and works from an empty directory (issue 15).

What ``pip install fhir-bridge`` gives must not depend on the checkout: the data files (config/, mappings/,
profiles/) come from the package (importlib.resources), not from a path next to the sources. So the wheel is
built from a copy of the working tree (no stale ``build/`` or ``*.egg-info`` of the checkout can leak into it),
installed with its dependencies from the package index (pip's cache makes this quick) into one virtualenv for
the whole module, and run from an empty temporary directory with an environment that names neither the
checkout nor any ``FHIR_BRIDGE_*`` setting: a ``pull`` against the sandbox and a whole ``demo``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.dev.processes import Child, ProcessGroup, free_port, wait_healthy

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
#: what a wheel is built from; the data folders are reached through the fhir_bridge/data symlinks
SOURCES = ("pyproject.toml", "README.md", "fhir_bridge", "config", "mappings", "profiles")


@dataclass(frozen=True)
class Installed:
    venv: Path
    wheel: Path
    env: dict[str, str]

    def command(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False, **kwargs)
    assert done.returncode == 0, f"{args[:3]}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    tree = root / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".*")
    for name in SOURCES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tree / name, symlinks=True, ignore=ignore)
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy2(source, tree / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(tree)])
    wheel = next((root / "dist").glob("fhir_bridge-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    redis = shutil.which("redis-server")
    assert redis, "the demo needs redis-server on PATH"
    env = {"PATH": os.pathsep.join([str(venv / "bin"), str(Path(redis).parent), "/usr/bin", "/bin"]),
           "HOME": str(root), "NO_COLOR": "1", "FHIR_BRIDGE_SOURCE__BACKOFF_INITIAL": "0.05"}
    return Installed(venv=venv, wheel=wheel, env=env)


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    work = tmp_path / "empty"
    work.mkdir()
    return work


@pytest.fixture(scope="module")
def sandbox(installed: Installed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fhir-bridge sandbox`` of the installed wheel (no corrupted attachments), its root URL."""
    port = free_port()
    cwd = tmp_path_factory.mktemp("sandbox-cwd")
    with (cwd / "sandbox.log").open("wb") as log:
        process = subprocess.Popen(
            [installed.command("fhir-bridge"), "sandbox", "--port", str(port), "--patients", "2", "--no-corrupt"],
            cwd=cwd, env=installed.env, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    child = Child("sandbox", process, cwd / "sandbox.log")
    with ProcessGroup(cwd, children=[child]):  # stopped (SIGTERM, then SIGKILL) whatever happens
        wait_healthy(child, f"{root}/healthz", timeout=60)
        yield root


def test_the_wheel_holds_the_data_files_as_real_files_and_nothing_else(installed: Installed, empty_dir: Path) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        data = {n for n in names if n.startswith("fhir_bridge/data/")}
        assert "fhir_bridge/data/config/fhir-bridge.toml" in data and "fhir_bridge/data/config/roles.json" in data
        assert "fhir_bridge/data/mappings/triage-rules.json" in data
        assert "fhir_bridge/data/profiles/case-task.json" in data
        assert all(n.endswith((".json", ".toml")) for n in data), data  # no build.py, README or differential/
        assert not any("/differential/" in n for n in data)
        assert wheel.read("fhir_bridge/data/config/roles.json") == (REPO / "config" / "roles.json").read_bytes()
    location = _run([installed.command("python"), "-c", "import fhir_bridge; print(fhir_bridge.__file__)"],
                    env=installed.env, cwd=empty_dir).stdout.strip()
    package = Path(location).parent
    assert package.is_relative_to(installed.venv)  # the installed copy runs, not the checkout
    assert (package / "data" / "config").is_dir() and not (package / "data" / "config").is_symlink()


def test_pull_from_an_empty_directory_packages_the_case(installed: Installed, sandbox: str, empty_dir: Path) -> None:
    world = httpx.get(f"{sandbox}/_sandbox/world", timeout=10).raise_for_status().json()
    patient = world["patients"][0]
    token = f"{patient['identifier']['system']}|{patient['identifier']['value']}"
    done = subprocess.run(
        [installed.command("fhir-bridge"), "pull", "--source", f"{sandbox}/fhir", "--patient", token, "--out", "case"],
        cwd=empty_dir, env=installed.env, capture_output=True, text=True, timeout=300, check=False)
    # 3: the case is packaged and something was left out by design (every sandbox patient has a masked document)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["documentsPackaged"] == len(patient["documents"]["intact"])
    bundle = json.loads((empty_dir / "case" / "bundle.json").read_text("utf-8"))
    assert bundle["type"] == "document" and bundle["entry"][0]["resource"]["resourceType"] == "Composition"
    reasons = {p["reason"] for p in json.loads((empty_dir / "case" / "problems.json").read_text("utf-8"))}
    assert "masked" in reasons and not reasons & {"hash-mismatch", "size-mismatch"}


def test_the_demo_runs_from_an_empty_directory(installed: Installed, empty_dir: Path) -> None:
    done = subprocess.run(
        [installed.command("fhir-bridge"), "demo", "--out", "demo"],
        cwd=empty_dir, env=installed.env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = empty_dir / "demo"
    for name in ("bundle.json", "report.json", "report-fr.html", "report-fr.pdf", "audit-verify.json"):
        assert (out / name).is_file(), name
    assert (out / "report-fr.pdf").read_bytes().startswith(b"%PDF")
    assert {p.name for p in (out / "logs").glob("*.log")} >= {"api.log", "worker.log", "sandbox.log"}

"""Parts 1 and 2: a case pull + package against the sandbox, and the bridge's memory on a 2 GB case.

Part 1 (issue 9): one patient with 500 documents of mixed sizes (~300 MB) and 20 ImagingStudies, served by
``fhir-bridge sandbox`` with 20 ms added to every request and pages capped at 50. Three clients pull it,
each in its own process, interleaved run after run (so a burst of load from another process hits them all):

* the bridge: ``fhir-bridge pull`` (SourceClient + collect + packaging to disk, the real code path);
* (a) the limit: :mod:`bench.limit_client`, a bare httpx script making the same requests with the same
  concurrency and nothing else;
* (b) the naive way: :mod:`bench.sequential_client`, a sequential fhirpy loop.

Each run's requests are counted in the sandbox's request log, so "the same requests" is checked, not assumed.
The figures are medians of the runs: bridge/limit (target <= 1.3) and sequential/bridge (target >= 8).

Part 2: ``fhir-bridge pull`` of a case whose attachments total 2 GB (40 documents of mixed sizes around
50 MB), its peak RSS from the kernel (``wait4``), against the same command pulling an ordinary small case in
the same run: the ratio shows whether memory grows with the case. Target: <= 250 MB.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (
    Report,
    Row,
    Timed,
    median,
    patient_token,
    py_spy,
    python_module,
    run_timed,
    sandbox_requests,
    sandbox_world,
    start_on_free_port,
    top_functions,
)
from fhir_bridge.dev.processes import ProcessGroup
from fhir_bridge.sandbox.world import build_world

SEED = 1


@dataclass(frozen=True)
class PullCase:
    """The case a part pulls: documents the bridge will retrieve, their total size, studies, how often."""

    documents: int
    total_mb: int
    studies: int
    runs: int
    latency_ms: int = 20
    page_cap: int = 50


PULL = {"full": PullCase(documents=500, total_mb=300, studies=20, runs=3),
        "quick": PullCase(documents=40, total_mb=8, studies=4, runs=1)}
MEMORY = {"full": PullCase(documents=40, total_mb=2048, studies=2, runs=1),
          "quick": PullCase(documents=12, total_mb=48, studies=2, runs=1)}


def sandbox_args(case: PullCase, patients: int = 1) -> list[str]:
    """``fhir-bridge sandbox`` options for ``case``: patient 0's ordinary record plus enough big documents
    and archived studies that the bridge retrieves exactly ``case.documents`` documents (current, not masked;
    corruption off so that none is refused) and finds ``case.studies`` studies."""
    ordinary = build_world(SEED, 1).patients[0]
    kept = sum(1 for d in ordinary.documents if d.status == "current" and not d.masked)
    big = case.documents - kept
    if big < 1:
        raise ValueError(f"a benchmark case needs more than the {kept} ordinary documents")
    archived = max(0, case.studies - len(ordinary.studies))
    return ["sandbox", "--seed", str(SEED), "--patients", str(patients), "--latency", str(case.latency_ms),
            "--page-cap", str(case.page_cap), "--no-corrupt", "--big-docs", str(big),
            "--big-total-mb", str(case.total_mb), "--archive-studies", str(archived)]


def _bridge(base: str, token: str, out: Path) -> list[str]:
    return python_module("fhir_bridge", "pull", "--source", base, "--patient", token, "--out", str(out))


def _limit(base: str, token: str) -> list[str]:
    return python_module("bench.limit_client", "--source", base, "--patient", token)


def _sequential(base: str, token: str, out: Path) -> list[str]:
    return python_module("bench.sequential_client", "--source", base, "--patient", token, "--out", str(out))


@dataclass
class Run:
    timed: Timed
    requests: int
    documents: int


def _run(name: str, args: list[str], root: str, work: Path) -> Run:
    """One client run, its requests counted at the sandbox; a failed run stops the part with its stderr."""
    sandbox_requests(root, clear=True)
    timed = run_timed(args, stderr_path=work / f"{name}.stderr", env={"FHIR_BRIDGE_LOG_LEVEL": "WARNING"})
    if timed.returncode not in (0, 3):  # 3: the bridge left something out (the masked document): expected
        raise RuntimeError(f"{name} exited {timed.returncode}: "
                           f"{(work / f'{name}.stderr').read_text('utf-8', 'replace')[-2000:]}")
    summary: dict[str, Any] = timed.json() or {}
    documents = int(summary.get("documentsPackaged", summary.get("documents", -1)))
    return Run(timed, len(sandbox_requests(root, clear=True)), documents)


def profile(name: str, args: list[str], work: Path) -> None:
    """One more run of ``args`` under ``py-spy record`` (not counted): a flame graph and a top-functions list in
    the profile directory. ``--gil`` keeps the samples of the thread holding the GIL: where Python time goes."""
    spy, where = py_spy(), common.PROFILE_DIR
    if spy is None or where is None:
        raise RuntimeError("--profile needs py-spy (pip install -e '.[bench]', or bash dev.sh bench)")
    for fmt, out in (("flamegraph", where / f"{name}.svg"), ("raw", where / f"{name}.raw")):
        run_timed([spy, "record", "--gil", "-r", "250", "-f", fmt, "-o", str(out), "--", *args],
                  stderr_path=work / f"profile-{name}.stderr")
        shutil.rmtree(work / "profiled-out", ignore_errors=True)
    top_functions(where / f"{name}.raw", where / f"{name}.txt")


def run_pull(report: Report, mode: str, work: Path) -> None:
    """Part 1; see the module docstring."""
    case = PULL[mode]
    work.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(work / "logs") as group:
        root = start_on_free_port(group, "sandbox-pull", sandbox_args(case), "/healthz")
        base = f"{root}/fhir"
        token = patient_token(sandbox_world(root)["patients"][0])
        clients = {
            "bridge": lambda: _bridge(base, token, work / "bridge-out"),
            "limit": lambda: _limit(base, token),
            "sequential": lambda: _sequential(base, token, work / "sequential-out"),
        }
        _run("warm-up", _limit(base, token), root, work)  # first connections, page cache, sandbox code paths
        runs: dict[str, list[Run]] = {name: [] for name in clients}
        for n in range(case.runs):
            order = list(clients)[n % 3:] + list(clients)[:n % 3]  # rotate who goes first
            for name in order:
                runs[name].append(_run(name, clients[name](), root, work))
                shutil.rmtree(work / f"{name}-out", ignore_errors=True)
        if common.PROFILE_DIR is not None:
            profile("pull", _bridge(base, token, work / "profiled-out"), work)
    seconds = {name: median([r.timed.seconds for r in rs]) for name, rs in runs.items()}
    requests = {name: sorted({r.requests for r in rs}) for name, rs in runs.items()}
    documents = {name: sorted({r.documents for r in rs}) for name, rs in runs.items()}
    size = f"{case.documents} docs, {case.total_mb} MB, {case.studies} studies"
    same = len({tuple(v) for v in requests.values()}) == 1
    report.add(Row(
        "1 pull", "bridge / limit (wall time)", seconds["bridge"] / seconds["limit"], "x",
        f"bridge {seconds['bridge']:.2f} s, limit {seconds['limit']:.2f} s (median of {case.runs}; {size}; "
        f"requests {requests['bridge']} vs {requests['limit']}{'' if same else ' DIFFER'}; "
        f"documents {documents['bridge']} vs {documents['limit']})",
        "<= 1.3", seconds["bridge"] / seconds["limit"] <= 1.3))
    report.add(Row(
        "1 pull", "sequential fhirpy / bridge (speed-up)", seconds["sequential"] / seconds["bridge"], "x",
        f"sequential {seconds['sequential']:.2f} s, bridge {seconds['bridge']:.2f} s; "
        f"limit/sequential speed-up {seconds['sequential'] / seconds['limit']:.2f}x "
        f"(requests {requests['sequential']}, documents {documents['sequential']})",
        ">= 8", seconds["sequential"] / seconds["bridge"] >= 8))
    mb = case.total_mb * 1024 * 1024 / 1e6
    report.add(Row("1 pull", "bridge throughput", mb / seconds["bridge"], "MB/s",
                   f"limit {mb / seconds['limit']:.0f} MB/s, sequential {mb / seconds['sequential']:.0f} MB/s; "
                   f"bridge peak RSS {max(r.timed.peak_rss_mib for r in runs['bridge']):.0f} MiB"))


def run_memory(report: Report, mode: str, work: Path) -> None:
    """Part 2; see the module docstring."""
    case = MEMORY[mode]
    work.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(work / "logs") as group:
        # generating the 2 GB case's hashes takes the sandbox a few seconds at start
        root = start_on_free_port(group, "sandbox-memory", sandbox_args(case, patients=2), "/healthz", timeout=300)
        base = f"{root}/fhir"
        patients = sandbox_world(root)["patients"]
        small = _run("bridge-small", _bridge(base, patient_token(patients[1]), work / "small-out"), root, work)
        shutil.rmtree(work / "small-out", ignore_errors=True)
        big = _run("bridge-big", _bridge(base, patient_token(patients[0]), work / "big-out"), root, work)
        shutil.rmtree(work / "big-out", ignore_errors=True)
        limit = _run("limit-big", _limit(base, patient_token(patients[0])), root, work)
    rss, base_rss = big.timed.peak_rss_mib, small.timed.peak_rss_mib
    report.add(Row(
        "2 memory", f"bridge peak RSS, {case.total_mb / 1024:.1f} GiB case" if case.total_mb >= 1024
        else f"bridge peak RSS, {case.total_mb} MiB case", rss * 1.048576, "MB",
        f"{rss:.0f} MiB for {big.documents} docs / {case.total_mb} MiB in {big.timed.seconds:.1f} s; "
        f"small case ({small.documents} docs) {base_rss:.0f} MiB, ratio {rss / base_rss:.2f}x; "
        f"bare httpx script {limit.timed.peak_rss_mib:.0f} MiB",
        "<= 250 MB", rss * 1.048576 <= 250))

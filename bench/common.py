"""What every part of the suite shares: rows of the result table, timed child processes, the machine.

A child's wall time is taken from just before it is spawned to its exit, as a user timing the command would
see it (interpreter start and imports included, for the bridge and for the baselines alike), and its peak
RSS is the kernel's own figure from ``wait4`` (``ru_maxrss``): exact, no sampling that could miss a spike.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from fhir_bridge.dev.processes import ProcessGroup, free_port

ROOT = Path(__file__).resolve().parent.parent
#: where ``--profile`` puts py-spy profiles of the bridge's side (None: no profiling); set by ``bench.__main__``
PROFILE_DIR: Path | None = None


@dataclass
class Row:
    """One line of the table: the figure, how it compares with its baseline, the target and whether it is met.

    ``value`` is the figure itself (a ratio, a rate or a size, in ``unit``); ``reference`` the absolute
    numbers behind it, for the reader; ``met`` None when there is no target or it could not be measured.
    """

    part: str
    figure: str
    value: float | None
    unit: str
    reference: str
    target: str = ""
    met: bool | None = None


@dataclass
class Report:
    """Rows in the order they were measured, plus the machine and its load before and after."""

    rows: list[Row] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.part}: {row.figure} = {fmt(row.value)} {row.unit} ({row.reference})", flush=True)

    def table(self) -> str:
        """The rows as a Markdown table (pasted as is into BENCHMARKS.md)."""
        lines = ["| part | figure | value | target | met | absolute numbers (same run) |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = {True: "yes", False: "**no**", None: "–"}[r.met]
            lines.append(f"| {r.part} | {r.figure} | {fmt(r.value)} {r.unit} | {r.target} | {met} | {r.reference} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "rows": [asdict(r) for r in self.rows], "notes": self.notes}


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# -- the machine ---------------------------------------------------------------------------------------


def load_average() -> str:
    """``uptime``'s three load averages: how busy the machine was (2 cores: above 2 means queueing)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> dict[str, Any]:
    """What BENCHMARKS.md records about the machine: cores, memory, CPU model, Python, kernel, date."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_before": load_average(),
    }


# -- timed children ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    """A finished child: exit code, wall seconds, peak RSS in MiB (the kernel's ``ru_maxrss``), stdout."""

    returncode: int
    seconds: float
    peak_rss_mib: float
    stdout: str

    def json(self) -> Any:
        """The last line of stdout as JSON (every client of the suite prints its summary there)."""
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else None


def run_timed(args: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 1800,
              stderr_path: Path | None = None) -> Timed:
    """Run ``args`` to completion; wall time from spawn to exit and the child's own peak RSS via ``wait4``.

    ``wait4`` on the pid gives that child's resource usage alone (not the harness's, not other children's),
    so a sampling thread that could miss a short spike is not needed.
    """
    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-{os.getpid()}-{time.monotonic_ns()}.out"
    err = stderr_path.open("wb") if stderr_path else subprocess.DEVNULL
    try:
        with out_path.open("w+b") as out:
            started = time.perf_counter()
            process = subprocess.Popen(list(args), stdout=out, stderr=err, cwd=ROOT,  # bench.* importable
                                       env={**os.environ, **(env or {})})
            deadline = started + timeout
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() > deadline:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.005)
            seconds = time.perf_counter() - started
            process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
            out.seek(0)
            stdout = out.read().decode("utf-8", "replace")
    finally:
        if stderr_path and not isinstance(err, int):
            err.close()
        out_path.unlink(missing_ok=True)
    return Timed(process.returncode, seconds, usage.ru_maxrss / 1024, stdout)


def python_module(module: str, *args: str) -> list[str]:
    """``<this interpreter> -m module args``: the suite's clients and the bridge run with the same Python."""
    return [sys.executable, "-m", module, *args]


# -- real processes on free ports ---------------------------------------------------------------------


def start_on_free_port(group: ProcessGroup, name: str, args: list[str], health_path: str, *,
                       timeout: float = 120.0, extra_env: Mapping[str, str] | None = None) -> str:
    """Start ``python -m fhir_bridge args --port P`` on a free port; returns ``http://127.0.0.1:P``.

    Tries another port when one was taken between the pick and the bind (as tests/e2e does)."""
    for attempt in range(3):
        port = free_port()
        root = f"http://127.0.0.1:{port}"
        try:
            group.start(name, [*args, "--port", str(port)], health_url=root + health_path, timeout=timeout,
                        extra_env=extra_env)
            return root
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def sandbox_world(root: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{root}/_sandbox/world", timeout=60).raise_for_status().json()
    return answer


def sandbox_requests(root: str, *, clear: bool = False) -> list[dict[str, Any]]:
    """The sandbox's request log (``/_sandbox/requests``), cleared after reading when ``clear``."""
    log: list[dict[str, Any]] = httpx.get(f"{root}/_sandbox/requests", timeout=60).raise_for_status().json()
    if clear:
        httpx.delete(f"{root}/_sandbox/requests", timeout=60).raise_for_status()
    return log


def patient_token(patient: Mapping[str, Any]) -> str:
    """``system|value`` for ``--patient`` (never printed: it is the patient's INS)."""
    return f"{patient['identifier']['system']}|{patient['identifier']['value']}"


def py_spy() -> str | None:
    """The py-spy executable (the ``bench`` extra), next to this interpreter or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def top_functions(raw: Path, out: Path, count: int = 25) -> None:
    """Summarise a py-spy ``raw`` (collapsed stacks) profile: functions by own and by inclusive samples."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text("utf-8", "replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")
        total += int(n)
        own[frames[-1]] = own.get(frames[-1], 0) + int(n)
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + int(n)
    lines = [f"{total} samples", "", "own time:"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:count]]
    lines += ["", "inclusive:"]
    lines += [f"{n / total:6.1%}  {f}" for f, n in sorted(inclusive.items(), key=lambda x: -x[1])[: count * 2]]
    out.write_text("\n".join(lines) + "\n", "utf-8")

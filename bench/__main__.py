"""``python -m bench [pull] [memory] [api] [audit] [sync] [--quick]``: run the suite, print the table.

No part named: all of them. ``--quick`` runs small sizes (seconds, for the smoke test and a first look);
the figures worth recording come from the full sizes on a quiet machine. The table is printed as Markdown
(ready for BENCHMARKS.md) and written with the machine description to ``<workdir>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import ROOT, Report, load_average, machine

PARTS = ("pull", "memory", "api", "audit", "sync")


def _runner(part: str) -> Callable[[Report, str, Path], None]:
    """Each part's entry point, imported only when it runs (a part's dependencies stay its own)."""
    if part == "pull":
        from bench.pull import run_pull

        return run_pull
    if part == "memory":
        from bench.pull import run_memory

        return run_memory
    if part == "api":
        from bench.api import run_api

        return run_api
    if part == "audit":
        from bench.audit import run_audit

        return run_audit
    from bench.sync import run_sync

    return run_sync


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help=f"parts to run, among {', '.join(PARTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not figures to record")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".bench",
                        help="where the runs write (cases, logs, results.json); default .bench/")
    parser.add_argument("--keep", action="store_true", help="keep the work directory's cases and logs")
    parser.add_argument("--profile", action="store_true",
                        help="also record the bridge under py-spy (pull: one more pull; api: the server during "
                             "the read load) into <workdir>/profiles: flame graphs (.svg) and top functions (.txt)")
    args = parser.parse_args(argv)
    if unknown := [p for p in args.parts if p not in PARTS]:
        parser.error(f"unknown part {unknown[0]!r}: choose among {', '.join(PARTS)}")
    parts = args.parts or list(PARTS)
    mode = "quick" if args.quick else "full"
    report = Report(machine=machine())
    report.machine["mode"] = mode
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        common.PROFILE_DIR = args.workdir / "profiles"
        common.PROFILE_DIR.mkdir(exist_ok=True)
    print(f"fhir-bridge benchmarks ({mode}): {', '.join(parts)}; load average {report.machine['load_before']}",
          flush=True)
    failed = []
    for part in parts:
        started = time.perf_counter()
        print(f"- {part} …", flush=True)
        work = args.workdir / part
        shutil.rmtree(work, ignore_errors=True)  # each run starts from nothing (keys, Redis, cases)
        try:
            _runner(part)(report, mode, work)
        except Exception as exc:  # one broken part must not hide the others' figures
            failed.append(part)
            report.notes.append(f"{part} failed: {type(exc).__name__}: {exc}")
            print(f"  {part} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    report.machine["load_after"] = load_average()
    (args.workdir / "results.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", "utf-8")
    m = report.machine
    print()
    print(f"machine: {m['nproc']} cores, {m['memory_gib']} GiB, {m['cpu']}, Python {m['python']}, "
          f"{m['date']}; load average before {m['load_before']}, after {m['load_after']}")
    print()
    print(report.table())
    for note in report.notes:
        print(f"\nnote: {note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

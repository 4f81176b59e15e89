"""``fhir-bridge pull``: one patient's record from an MHD source into a case bundle on disk."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fhir_bridge.cli.common import EXIT_OK, EXIT_PARTIAL, ProgressBar, one_line_errors


@click.command()
@click.option("--source", "source_url", required=True, help="FHIR base URL of the MHD/PDSm source.")
@click.option("--patient", "patient", required=True, help="Patient identifier as SYSTEM|VALUE (INS).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for bundle.json, problems.json and attachments/.")
@click.option("--concurrency", type=int, default=None, help="Requests in flight to the source (source.concurrency).")
@click.option("--max-pages", type=int, default=None, help="Most pages accepted for one search (source.max_pages).")
@click.option("--deadline", type=float, default=None, help="Seconds one request may take with its retries.")
@one_line_errors
def pull(source_url: str, patient: str, out_dir: Path, concurrency: int | None, max_pages: int | None,
         deadline: float | None) -> None:
    """Pull one patient's documents and studies from an MHD source into a case bundle in OUT.

    Exit 0 when everything was packaged, 3 when the bundle was written but something was left out
    (see problems.json), 2 on bad input, 1 on any other failure.
    """
    from fhir_bridge.fhir.identity import parse_patient_identifier

    identifier = parse_patient_identifier(patient)  # before any network call
    from fhir_bridge.adapters.settings import load_settings
    from fhir_bridge.logs import configure_logging

    settings = load_settings(source__url=source_url, source__concurrency=concurrency,
                             source__max_pages=max_pages, source__total_deadline=deadline)
    configure_logging(os.environ.get("FHIR_BRIDGE_LOG_LEVEL", "WARNING"))
    summary = asyncio.run(_pull(settings, identifier, out_dir))
    click.echo(json.dumps(summary, ensure_ascii=False))
    sys.exit(EXIT_PARTIAL if summary["leftOut"] else EXIT_OK)


async def _pull(settings: Any, identifier: Any, out_dir: Path) -> dict[str, Any]:
    from fhir_bridge.adapters.reference_data import ReferenceFiles, load_terminology
    from fhir_bridge.adapters.source_client import SourceClient
    from fhir_bridge.case.packaging import build_case_bundle, write_bundle
    from fhir_bridge.workflow.collect import collect_case

    terminology = load_terminology(ReferenceFiles.of(settings).mappings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ProgressBar() as progress:
        # a one-off pull builds its own client: the composition root would cost ~0.5 s of start-up (FastAPI,
        # Redis, the renderers) for a command that needs none of them
        async with SourceClient(settings.source.url, settings.source) as source:
            collected = await collect_case(source, identifier, out_dir / "attachments", terminology,
                                           progress=progress)
            bundle = build_case_bundle(collected.content, terminology=terminology, absolute=source.absolute,
                                       now=datetime.now(UTC))
    size = await asyncio.to_thread(write_bundle, bundle, out_dir / "bundle.json")
    problems = [p.to_json() for p in collected.problems]
    (out_dir / "problems.json").write_text(json.dumps(problems, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return {
        "bundle": str(out_dir / "bundle.json"),
        "bundleBytes": size,
        "problems": str(out_dir / "problems.json"),
        "documentsFound": collected.documents_found,
        "documentsPackaged": len(collected.content.documents),
        "studiesPackaged": len(collected.content.studies),
        "leftOut": len(problems),
        "reasons": _count(p["reason"] for p in problems),
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out

"""``fhir-bridge sync overdue | worklist | refresh | deliver``: batch work for hospital IT (issue 8).

Same conventions as every command (:mod:`fhir_bridge.cli.common`): a JSON summary on stdout, a progress bar on
stderr when it is a terminal, one-line errors, and exit codes 0 (every line or case fine), 3 (done, but some
lines or cases failed: the summary names them by line number or count, never by patient), 2 (bad input: no such
file, not a worklist, bad options), 1 (anything else: the API or Redis unreachable, a refused client).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from fhir_bridge.cli.common import EXIT_OK, EXIT_PARTIAL, ProgressBar, cli_settings, one_line_errors
from fhir_bridge.errors import InvalidInput


@click.group()
def sync() -> None:
    """Batch work for hospital IT."""


@sync.command("overdue")
@one_line_errors
def sync_overdue() -> None:
    """Flag every open case past its due date (Task extension ``overdue`` and a note); print how many."""
    from fhir_bridge.main import open_runtime, redis_url_for

    settings = cli_settings()

    async def scan(redis_url: str) -> int:
        async with open_runtime(settings, redis_url) as runtime:
            return len(await runtime.bridge.assignments.scan_overdue())

    with redis_url_for(settings, may_start=False) as redis_url:
        flagged = asyncio.run(scan(redis_url))
    click.echo(json.dumps({"flagged": flagged}))


@sync.command("worklist")
@click.argument("worklist_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, default=False, help="Check every line and print the summary; send nothing.")
@click.option("--api", "api_url", default=None, help="The bridge's FHIR base URL (sync.api_url).")
@click.option("--client-id", default=None, help="A registered platform client (sync.client_id).")
@click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="That client's private JWK, from `fhir-bridge clients keygen` (sync.private_key_jwk).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=None,
              help="Requests in flight (sync.worklist_concurrency).")
@one_line_errors
def sync_worklist(worklist_file: Path, dry_run: bool, api_url: str | None, client_id: str | None,
                  key_file: Path | None, concurrency: int | None) -> None:
    """Submit the second-opinion requests of a worklist FILE (CSV with a header, or NDJSON), idempotently.

    Each line is one request (columns: patient, specialty, question, and optionally deadline, requester, id,
    kind, priority, plan, patient_system). A line sent again never makes a second case. Bad lines are
    reported by number and the rest proceeds. Exit 0 when every line is submitted or already there, 3 when
    some failed, 2 when FILE is not a worklist.
    """
    from fhir_bridge.adapters.reference_data import ReferenceFiles, load_terminology
    from fhir_bridge.case.worklist import read_worklist

    settings = cli_settings(sync__api_url=api_url, sync__client_id=client_id,
                         sync__private_key_jwk=str(key_file) if key_file else None,
                         sync__worklist_concurrency=concurrency)
    try:
        data = worklist_file.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {worklist_file.name}: {type(exc).__name__}") from None
    terminology = load_terminology(ReferenceFiles.of(settings).mappings)
    worklist = read_worklist(data, filename=worklist_file.name, terminology=terminology,
                             request_system=settings.sync.request_system,
                             patient_system=settings.sync.patient_system)
    failures = {e.number: e.reason for e in worklist.errors}
    counts: Counter[str] = Counter()
    if dry_run:
        counts["valid"] = len(worklist.lines)
    elif worklist.lines:
        for outcome in asyncio.run(_submit(settings, worklist.lines)):
            counts[outcome.outcome] += 1
            if outcome.outcome == "failed":
                failures[outcome.number] = outcome.reason
    summary: dict[str, Any] = {"lines": worklist.total, "dryRun": dry_run}
    summary |= {"valid": counts["valid"]} if dry_run else {"created": counts["created"],
                                                           "alreadyThere": counts["exists"]}
    summary["failed"] = len(failures)
    summary["failures"] = [{"line": n, "reason": failures[n]} for n in sorted(failures)]
    click.echo(json.dumps(summary, ensure_ascii=False))
    sys.exit(EXIT_PARTIAL if failures else EXIT_OK)


async def _submit(settings: Any, lines: list[Any]) -> list[Any]:
    from fhir_bridge.adapters.token_client import BackendServicesAuth, load_private_jwk
    from fhir_bridge.adapters.worklist_client import SCOPE, submit_lines

    conf = settings.sync
    if not conf.client_id or not conf.private_key_jwk:
        raise InvalidInput("give --client-id and --key (or [sync] client_id and private_key_jwk): the worklist is "
                           "sent as a registered platform client")
    api = api_base(settings)
    token_url = api.removesuffix("/fhir") + "/auth/token"
    auth = BackendServicesAuth(token_url, conf.client_id, load_private_jwk(Path(conf.private_key_jwk)), SCOPE)
    with ProgressBar() as progress:
        done = 0

        def tick(_: Any) -> None:
            nonlocal done
            done += 1
            progress("submit", done, len(lines))

        return await submit_lines(lines, api=api, auth=auth, concurrency=conf.worklist_concurrency, on_done=tick)


def api_base(settings: Any) -> str:
    """The API's FHIR base: ``sync.api_url``, else ``api.public_base_url``, else the address ``serve`` uses."""
    base = settings.sync.api_url or settings.api.public_base_url or f"http://{settings.api.host}:{settings.api.port}"
    base = base.rstrip("/")
    return base if base.endswith("/fhir") else f"{base}/fhir"


@sync.command("refresh")
@one_line_errors
def sync_refresh() -> None:
    """Pull what changed at the source for the open cases (ready or waiting for documents): one incremental
    search per patient since its watermark; the cases of a patient with news are collected and triaged again.
    Prints counts (never a patient); exit 3 when some patients could not be checked."""
    from fhir_bridge.main import open_runtime, redis_url_for

    settings = cli_settings()

    async def refresh(redis_url: str) -> Any:
        async with open_runtime(settings, redis_url, "cli") as runtime:
            assert runtime.bridge.sync is not None
            with ProgressBar() as progress:
                return await runtime.bridge.sync.refresh_open_cases(progress)

    with redis_url_for(settings, may_start=False) as redis_url:
        report = asyncio.run(refresh(redis_url))
    click.echo(json.dumps(report.to_json()))
    sys.exit(EXIT_PARTIAL if report.failures else EXIT_OK)


@sync.command("deliver")
@one_line_errors
def sync_deliver() -> None:
    """Retry pending deliveries now: dead jobs of a delivery kind ([sync] delivery_kinds, e.g. deliver-*) go back
    to the queue with fresh attempts, and such jobs waiting for a retry are made due. Prints how many."""
    from fhir_bridge.main import open_queue_admin, redis_url_for

    settings = cli_settings()

    async def redrive(redis_url: str) -> Any:
        async with open_queue_admin(settings, redis_url) as admin:
            return await admin.redrive(settings.sync.delivery_kinds)

    with redis_url_for(settings, may_start=False) as redis_url:
        done = asyncio.run(redrive(redis_url))
    click.echo(json.dumps({"fromDead": done.from_dead, "madeDue": done.made_due,
                           "kinds": settings.sync.delivery_kinds}))

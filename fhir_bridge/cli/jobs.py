"""``fhir-bridge jobs list | show | retry | purge-dead``: the job queue for operators (issue 8).

Jobs are shown by id, kind, state, attempts, age and error class (:mod:`fhir_bridge.adapters.queue_admin`):
never a payload value or an error message, which may name a patient. Exit codes as everywhere: 0 done, 2 bad
input (an unknown job, a purge without ``--yes``), 1 anything else (Redis unreachable).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from fhir_bridge.cli.common import cli_settings, one_line_errors
from fhir_bridge.errors import InvalidInput, NotFound

T = TypeVar("T")


@click.group()
def jobs() -> None:
    """The job queue: list, show, retry dead jobs, purge dead letters."""


def _with_admin(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``await work(admin)`` against the bridge's Redis (FHIR_BRIDGE_REDIS_URL, or the private server of a
    running `fhir-bridge serve` with the same data directory)."""
    from fhir_bridge.main import open_queue_admin, redis_url_for

    settings = cli_settings()

    async def run(url: str) -> T:
        async with open_queue_admin(settings, url) as admin:
            return await work(admin)

    with redis_url_for(settings, may_start=False) as redis_url:
        return asyncio.run(run(redis_url))


@jobs.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(["ready", "running", "delayed", "dead"]),
              help="Only jobs in this state; repeatable (default: all four).")
@click.option("--kind", default=None, help="Only jobs of this kind (a glob pattern, e.g. 'deliver-*').")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, default=False, help="One JSON object per line instead of a table.")
@one_line_errors
def jobs_list(states: tuple[str, ...], kind: str | None, limit: int, as_json: bool) -> None:
    """List waiting, running, delayed and dead jobs, oldest first."""
    from fhir_bridge.adapters.queue_admin import STATES

    found = _with_admin(lambda admin: admin.jobs(states or STATES, kind=kind, limit=limit))
    if as_json:
        for job in found:
            click.echo(json.dumps(job.to_json()))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "kind", "state", "attempts", "age", "error", "worker / due in")
    for job in found:
        where = job.consumer or (f"{job.due_in_seconds:.1f} s" if job.due_in_seconds is not None else "")
        table.add_row(job.id, job.kind, job.state, str(job.attempts), f"{job.age_seconds:.1f} s", job.error_type,
                      where)
    console = Console()
    console.print(table)
    console.print(f"{len(found)} job(s)")


@jobs.command("show")
@click.argument("job_id")
@one_line_errors
def jobs_show(job_id: str) -> None:
    """Show one job (state, kind, attempts, age, error class, the names of its payload's fields)."""
    job = _with_admin(lambda admin: admin.show(job_id))
    if job is None:
        raise NotFound("no job with that id (unknown, or finished long enough ago to be forgotten)")
    click.echo(json.dumps(job.to_json()))


@jobs.command("retry")
@click.argument("job_id")
@one_line_errors
def jobs_retry(job_id: str) -> None:
    """Put a dead job back in the queue with a fresh set of attempts."""
    if not _with_admin(lambda admin: admin.retry(job_id)):
        raise NotFound("no dead job with that id")
    click.echo(json.dumps({"retried": job_id}))


@jobs.command("purge-dead")
@click.option("--yes", is_flag=True, default=False, help="Really drop every dead letter (they cannot come back).")
@one_line_errors
def jobs_purge_dead(yes: bool) -> None:
    """Drop every dead letter (their jobs may be enqueued again afterwards)."""
    if not yes:
        count = len(_with_admin(lambda admin: admin.jobs(["dead"], limit=100_000)))
        raise InvalidInput(f"this drops {count} dead letter(s) for good: add --yes")
    click.echo(json.dumps({"purged": _with_admin(lambda admin: admin.purge_dead())}))

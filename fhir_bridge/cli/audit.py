"""``fhir-bridge audit verify | export | verify-export | purge``: the audit trail for auditors and operators."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fhir_bridge.cli.common import EXIT_FAILURE, cli_settings, one_line_errors
from fhir_bridge.errors import InvalidInput


@click.group()
def audit() -> None:
    """The audit trail: verify its chain, export it for auditors, apply the retention."""


def _with_audit_log(settings: Any, work: Callable[[Any], Any], keys: tuple[Path, ...] = ()) -> Any:
    """Run ``await work(log)`` with the audit log on the bridge's Redis (FHIR_BRIDGE_REDIS_URL, or the
    private server of a running `fhir-bridge serve` with the same data directory)."""
    from fhir_bridge.main import open_audit, redis_url_for

    async def run(redis_url: str) -> Any:
        async with open_audit(settings, redis_url, verify_keys=keys) as log:
            return await work(log)

    with redis_url_for(settings, may_start=False) as redis_url:
        return asyncio.run(run(redis_url))


def _manifest_for(ndjson: Path) -> Path:
    """``audit.ndjson`` → ``audit.manifest.json`` (any other name: ``<name>.manifest.json``)."""
    return ndjson.with_suffix(".manifest.json") if ndjson.suffix == ".ndjson" else ndjson.with_name(
        ndjson.name + ".manifest.json")


def _report(result: Any, what: str) -> None:
    """One line: ``ok`` and exit 0, or the first broken seq and exit 1."""
    if result.ok:
        head = f" up to seq {result.head.seq}" if result.head is not None and result.head.seq else ""
        click.echo(f"{what} ok: {result.count} events verified{head}")
        return
    where = f"broken at seq {result.first_broken_seq}" if result.first_broken_seq is not None else "refused"
    click.echo(f"{what} {where}: {result.reason} ({result.count} events verified before it)")
    sys.exit(EXIT_FAILURE)


@audit.command("verify")
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public JWK (or JWK Set) of an earlier signing key; repeatable.")
@one_line_errors
def audit_verify(keys: tuple[Path, ...]) -> None:
    """Verify the whole audit chain (hashes, order, signed checkpoints). Exit 0 when it holds, 1 when it is
    broken, naming the first broken seq."""
    settings = cli_settings()

    async def verify(log: Any) -> Any:
        return await log.verify()

    _report(_with_audit_log(settings, verify, keys), "audit chain")


@audit.command("export")
@click.option("--since", default=None, help="Events recorded at or after this FHIR date/dateTime (default: the first).")
@click.option("--until", default=None, help="Events recorded before this FHIR date/dateTime (default: now).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The NDJSON file to write (one stored AuditEvent per line).")
@click.option("--manifest", "manifest", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The signed manifest to write (default: OUT with .manifest.json for .ndjson).")
@one_line_errors
def audit_export(since: str | None, until: str | None, out: Path, manifest: Path | None) -> None:
    """Export a slice of the audit chain for auditors, with a signed manifest that verifies offline
    (`fhir-bridge audit verify-export`). A broken chain is not exported (exit 1)."""
    from fhir_bridge.case.deadlines import parse_fhir_datetime

    bounds = {}
    for name, text in (("since", since), ("until", until)):
        if text is not None:
            bounds[name] = parse_fhir_datetime(text)
            if bounds[name] is None:
                raise InvalidInput(f"--{name} {text!r} is not a FHIR date or dateTime")
    settings = cli_settings()
    manifest = manifest or _manifest_for(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    async def export(log: Any) -> Any:
        return await log.export_ndjson(out, since=bounds.get("since"), until=bounds.get("until"),
                                       manifest_path=manifest)

    written = _with_audit_log(settings, export)
    click.echo(json.dumps({"file": str(out), "manifest": str(manifest), "count": written.count,
                           "firstSeq": written.first_seq, "lastSeq": written.last_seq, "kid": written.key_id}))


@audit.command("verify-export")
@click.argument("ndjson", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--manifest", "manifest", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The export's manifest (default: NDJSON with .manifest.json).")
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The bridge's public JWK (data_dir/keys/audit-signing.jwk.json), from a channel you trust.")
@one_line_errors
def audit_verify_export(ndjson: Path, manifest: Path | None, key: Path) -> None:
    """Verify an export offline (no Redis, no bridge): the manifest's signature, every event's hash and place
    in the chain, the checkpoints inside, the count and the file's SHA-256. Exit 0 when it holds, 1 when not."""
    from fhir_bridge.adapters.signing import JwsVerifier
    from fhir_bridge.audit.chain import verify_export

    manifest = manifest or _manifest_for(ndjson)
    if not manifest.is_file():
        raise InvalidInput(f"no manifest {manifest.name} next to the export; give --manifest")
    _report(verify_export(ndjson, manifest, JwsVerifier.from_file(key)), "export")


@audit.command("purge")
@one_line_errors
def audit_purge() -> None:
    """Remove the events older than [audit] retention_days (0: keep everything); the rest still verifies from
    a signed anchor. Export first: a purged event is gone. Prints how many were removed."""
    from datetime import timedelta

    from fhir_bridge.fhir.elements import instant

    settings = cli_settings()
    days = settings.audit.retention_days
    if days == 0:
        click.echo(json.dumps({"purged": 0, "retentionDays": 0, "note": "retention_days is 0: every event is kept"}))
        return
    before = datetime.now(UTC) - timedelta(days=days)

    async def purge(log: Any) -> int:
        return int(await log.purge_before(before))

    purged = _with_audit_log(settings, purge)
    click.echo(json.dumps({"purged": purged, "retentionDays": days, "before": instant(before)}))

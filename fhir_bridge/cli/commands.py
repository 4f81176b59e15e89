"""The ``fhir-bridge`` command line (click + rich).

Exit codes, the same for every command:
0 success; 3 done but something was left out (``pull``: listed in problems.json); 2 bad input (a malformed
identifier, an unknown patient, a URL that is not a FHIR source, bad options); 1 any other failure (the
source failing or breaking the protocol, an unexpected error); 130 interrupted. Errors are one line on
stderr, never a traceback (set ``FHIR_BRIDGE_DEBUG=1`` to see one).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from fhir_bridge.errors import (
    AmbiguousPatient,
    BridgeError,
    InvalidInput,
    NotAFhirSource,
    NotFound,
)

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
F = TypeVar("F", bound=Callable[..., Any])


def exit_code_for(error: BaseException) -> int:
    """The one mapping from the error tree to exit codes."""
    if isinstance(error, InvalidInput | NotFound | NotAFhirSource | AmbiguousPatient):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def fail(message: str, code: int) -> None:
    click.echo(f"fhir-bridge: error: {message}", err=True)
    sys.exit(code)


def one_line_errors(func: F) -> F:
    """Turn every error into one line on stderr and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BridgeError as exc:
            if os.environ.get("FHIR_BRIDGE_DEBUG"):
                raise
            fail(str(exc), exit_code_for(exc))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("FHIR_BRIDGE_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", EXIT_FAILURE)
        return None

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fhir-bridge")
def cli() -> None:
    """fhir-bridge: second opinions over the national health record (IHE MHD / ANS PDSm, FHIR R4)."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click usage errors become one line with exit code 2."""
    try:
        code = cli.main(args=argv, prog_name="fhir-bridge", standalone_mode=False)
    except click.exceptions.Abort:
        fail("interrupted", EXIT_INTERRUPTED)
    except click.UsageError as exc:
        fail(exc.format_message(), EXIT_BAD_INPUT)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


@cli.command()
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
    with _progress() as progress:
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


class _progress:
    """A rich progress bar on stderr when it is a terminal; silent otherwise."""

    def __enter__(self) -> Callable[[str, int, int], None]:
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._tasks: dict[str, Any] = {}
        return self.update

    def update(self, stage: str, done: int, total: int) -> None:
        if self._bar is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(stage, total=total or 1)
        self._bar.update(self._tasks[stage], completed=done, total=total or 1)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def _settings(**overrides: Any) -> Any:
    from fhir_bridge.adapters.settings import load_settings
    from fhir_bridge.logs import configure_logging

    settings = load_settings(**overrides)
    configure_logging(settings.log_level)
    return settings


@cli.command()
@click.option("--host", default=None, help="Address to listen on (api.host).")
@click.option("--port", default=None, type=int, help="Port to listen on (api.port).")
@one_line_errors
def serve(host: str | None, port: int | None) -> None:
    """Serve the FHIR API (starts a private Redis when FHIR_BRIDGE_REDIS_URL is not set).

    HTTPS and mutual TLS come from [api] tls_cert, tls_key, tls_client_ca and tls_client_cert."""
    import uvicorn

    from fhir_bridge.adapters.tls import uvicorn_tls_options
    from fhir_bridge.main import build_app, redis_url_for

    settings = _settings(api__host=host, api__port=port)
    api = settings.api
    tls = uvicorn_tls_options(api.tls_cert, api.tls_key, api.tls_client_ca, api.tls_client_cert)  # before Redis
    # uvicorn re-raises SIGTERM/SIGINT once it has shut down gracefully; with the default handler the process
    # would die there, before the private redis-server is stopped. Ours turns it into a clean exit instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    with redis_url_for(settings, may_start=True) as redis_url:
        app = build_app(settings, redis_url)
        uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_level="warning",
                    access_log=False, lifespan="on", **tls)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@cli.command()
@click.option("--name", default=None, help="Consumer name (default: host-pid).")
@one_line_errors
def worker(name: str | None) -> None:
    """Run a job worker (collect and package cases); run as many as you like against one Redis."""
    from fhir_bridge.main import redis_url_for, run_worker

    settings = _settings()
    with redis_url_for(settings, may_start=False) as redis_url:
        asyncio.run(run_worker(settings, redis_url, name))


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=int)
@click.option("--patients", default=5, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--page-cap", default=50, show_default=True, type=click.IntRange(1, 10_000),
              help="Largest page the sandbox serves, whatever _count asks.")
@click.option("--latency", "latency_ms", default=0, show_default=True, type=click.IntRange(0, 60_000),
              help="Milliseconds added to every FHIR request.")
@click.option("--fault-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of FHIR requests answered 503/429 with Retry-After.")
@click.option("--corrupt/--no-corrupt", default=True, show_default=True,
              help="Serve one attachment whose bytes do not match its hash.")
@click.option("--big-docs", default=0, show_default=True, type=click.IntRange(0, 100_000),
              help="Extra large documents for patient 0 (benchmarks).")
@click.option("--big-total-mb", default=0, show_default=True, type=click.IntRange(0, 1_000_000))
@click.option("--archive-studies", default=0, show_default=True, type=click.IntRange(0, 10_000),
              help="Extra, older ImagingStudies for patient 0 (benchmarks).")
@click.option("--today", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Day the synthetic record is dated back from (YYYY-MM-DD); default: today's UTC date.")
@click.option("--incomplete", multiple=True, type=click.IntRange(0),
              help="Index of a patient whose case lacks its pathology report (else its first blocking document "
                   "group); repeatable.")
@click.option("--public-base-url", default=None,
              help="Base (scheme://host:port) written into the URLs it serves; default: the one each request used.")
@click.option("--require-token", is_flag=True, default=False,
              help="Require SMART Backend Services tokens from its /auth/token (needs --clients).")
@click.option("--clients", "clients_file", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The clients allowed tokens: a registry file like the bridge's (auth.clients_file).")
@click.option("--tls-cert", default="", help="Serve HTTPS with this certificate (PEM).")
@click.option("--tls-key", default="", help="The private key of --tls-cert (PEM).")
@click.option("--tls-client-ca", default="", help="Require client certificates signed by this CA (PEM).")
@one_line_errors
def sandbox(host: str, port: int, patients: int, seed: int, page_cap: int, latency_ms: int, fault_rate: float,
            corrupt: bool, big_docs: int, big_total_mb: int, archive_studies: int, today: datetime | None,
            incomplete: tuple[int, ...], public_base_url: str | None, require_token: bool, clients_file: Path | None,
            tls_cert: str, tls_key: str, tls_client_ca: str) -> None:
    """Serve the synthetic national-record FHIR source (deterministic French test patients)."""
    from fhir_bridge.adapters.tls import uvicorn_tls_options
    from fhir_bridge.sandbox.app import SandboxConfig
    from fhir_bridge.sandbox.serve import run

    if any(i >= patients for i in incomplete):
        raise click.BadParameter(f"--incomplete takes patient indexes below --patients ({patients})")
    if require_token != (clients_file is not None):
        raise click.BadParameter("--require-token and --clients FILE go together")
    tls = uvicorn_tls_options(tls_cert, tls_key, tls_client_ca, "required" if tls_client_ca else "none")
    config = SandboxConfig(seed=seed, patients=patients, page_cap=page_cap, latency_ms=latency_ms,
                           fault_rate=fault_rate, corrupt=corrupt, big_docs=big_docs,
                           big_total_bytes=big_total_mb * 1024 * 1024, archive_studies=archive_studies,
                           public_base_url=public_base_url,
                           today=today.date() if today else None, incomplete=tuple(incomplete))
    click.echo(f"sandbox FHIR source on {'https' if tls else 'http'}://{host}:{port}/fhir", err=True)
    run(config, host, port, clients_file=clients_file, tls=tls)


@cli.command()
@click.option("--out", "out_dir", default="out/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where the bundle, report and logs go.")
@click.option("--log-level", default="WARNING", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Log level of the API, worker and sandbox processes (their logs go to OUT/logs).")
@one_line_errors
def demo(out_dir: Path, log_level: str) -> None:
    """Run the whole path on embedded defaults (private Redis, sandbox, API, worker, a scripted reviewer panel)."""
    from rich.console import Console

    from fhir_bridge.dev.demo import run_demo

    console = Console(stderr=False)
    result = run_demo(out_dir.resolve(), console, log_level=log_level.upper())
    console.print()
    console.print(f"[bold green]done[/] in {result.seconds:.1f} s")
    console.print(f"  documents packaged: {result.documents}, imaging studies: {result.studies}")
    console.print(f"  left out: {len(result.left_out)}")
    for reason, where in result.left_out:
        console.print(f"    - {reason}: {where}")
    console.print(f"  conclusion: {result.conclusion}")
    console.print(f"  dissenting opinions kept: {result.dissents}; platform notified: {result.notified}")
    console.print(f"  case bundle: {result.bundle_path}")
    console.print(f"  opinion:     {result.report_path}")
    for path in result.renderings:
        console.print(f"               {path}")
    console.print(f"  in the record: {result.record_document}")
    console.print(f"  audit chain: {result.audit}")
    console.print(f"  logs:        {result.out_dir / 'logs'}")


@cli.group()
def sync() -> None:
    """Batch work for hospital IT."""


@sync.command("overdue")
@one_line_errors
def sync_overdue() -> None:
    """Flag every open case past its due date (Task extension ``overdue`` and a note); print how many."""
    from fhir_bridge.main import open_runtime, redis_url_for

    settings = _settings()

    async def scan(redis_url: str) -> int:
        async with open_runtime(settings, redis_url) as runtime:
            return len(await runtime.cases.scan_overdue())

    with redis_url_for(settings, may_start=False) as redis_url:
        flagged = asyncio.run(scan(redis_url))
    click.echo(json.dumps({"flagged": flagged}))


@cli.group()
def audit() -> None:
    """The audit trail: verify its chain, export it for auditors, apply the retention."""


def _with_audit_log(settings: Any, work: Callable[[Any], Any], keys: tuple[Path, ...] = ()) -> Any:
    """Run ``await work(log)`` with the audit log on the bridge's Redis (FHIR_BRIDGE_REDIS_URL, or the
    private server of a running `fhir-bridge serve` with the same data directory)."""
    from fhir_bridge.adapters.redis_clients import connect
    from fhir_bridge.main import open_audit_log, redis_url_for

    async def run(redis_url: str) -> Any:
        redis = connect(redis_url, cluster=settings.redis.cluster)
        try:
            return await work(open_audit_log(settings, redis, verify_keys=keys))
        finally:
            await redis.aclose()

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
    settings = _settings()

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
    settings = _settings()
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

    from fhir_bridge.audit.events import instant

    settings = _settings()
    days = settings.audit.retention_days
    if days == 0:
        click.echo(json.dumps({"purged": 0, "retentionDays": 0, "note": "retention_days is 0: every event is kept"}))
        return
    before = datetime.now(UTC) - timedelta(days=days)

    async def purge(log: Any) -> int:
        return int(await log.purge_before(before))

    purged = _with_audit_log(settings, purge)
    click.echo(json.dumps({"purged": purged, "retentionDays": days, "before": instant(before)}))


@cli.group()
def certs() -> None:
    """Certificates for development and tests (real ones come from your PKI, e.g. IGC-Santé)."""


@certs.command("dev")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for ca.pem, server.pem and client-<name>.pem, each with its -key.pem (0600).")
@click.option("--client", "client_names", multiple=True, help="A client certificate to make (CN=NAME); repeatable.")
@one_line_errors
def certs_dev(out_dir: Path, client_names: tuple[str, ...]) -> None:
    """Make a development CA (reused if OUT has one), a server certificate for localhost/127.0.0.1/::1 and client
    certificates. For development and tests only."""
    from fhir_bridge.adapters.dev_certs import make_dev_certificates

    made = make_dev_certificates(out_dir, client_names)
    click.echo(json.dumps({"ca": str(made.ca.cert), "server": str(made.server.cert),
                           "serverKey": str(made.server.key),
                           "clients": {n: {"cert": str(p.cert), "key": str(p.key)} for n, p in made.clients.items()}}))


@cli.command("verify-bundle")
@click.argument("bundle_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jwks", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The bridge's public JWK or JWK Set (default: data_dir/keys/audit-signing.jwk.json).")
@one_line_errors
def verify_bundle(bundle_file: Path, jwks: Path | None) -> None:
    """Check a served case Bundle's signature: a detached ES384 JWS over its R4 canonical form without id, meta
    and signature. Exit 0 when valid, 1 when not (changed, unsigned, another key), 2 when unreadable."""
    from fhir_bridge.adapters.signing import JwsVerifier, SigningKeyError
    from fhir_bridge.case.signature import check_bundle_signature
    from fhir_bridge.fhir.resources import parse_resource

    jwks = jwks or _settings().data_dir / "keys" / "audit-signing.jwk.json"
    try:
        verifier = JwsVerifier.from_file(jwks)
    except (OSError, ValueError, AttributeError, SigningKeyError) as exc:
        raise InvalidInput(f"cannot read the key {jwks.name}: {type(exc).__name__}") from None
    try:
        data = bundle_file.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {bundle_file.name}: {type(exc).__name__}") from None
    check = check_bundle_signature(parse_resource(data, expected_type="Bundle"), verifier.verify_unencoded,
                                   verifier.key_ids)
    if not check.ok:
        fail(f"signature invalid: {check.reason}", EXIT_FAILURE)
    click.echo(f"signature valid (kid {check.key_id}, signed {check.signed_at})")


@cli.group()
def clients() -> None:
    """Register the systems that may call the bridge (SMART Backend Services, private_key_jwt)."""


@clients.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for client-private.jwk.json (0600) and client-public.jwks.json.")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True)
@one_line_errors
def clients_keygen(out_dir: Path, alg: str) -> None:
    """Write a new client key pair; give the public JWK Set to `clients add`, keep the private one secret."""
    from fhir_bridge.adapters.clients import generate_client_keypair

    private, public = generate_client_keypair(out_dir, alg)  # type: ignore[arg-type]
    click.echo(json.dumps({"private": str(private), "public": str(public)}))


@clients.command("add")
@click.option("--id", "client_id", required=True, help="The client_id (iss and sub of its assertions).")
@click.option("--role", required=True, type=click.Choice(["platform", "reviewer", "auditor", "operator"]))
@click.option("--jwks", "jwks_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's public JWK Set (or one public JWK).")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="A scope the client may be granted, e.g. system/ServiceRequest.c; repeatable.")
@click.option("--tenant", default=None, help="The tenant whose cases the client sees (default: its id).")
@click.option("--reviewer", default=None, help="For a reviewer: its PractitionerRole id in config/reviewers.json.")
@click.option("--cert", "cert_file", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's TLS certificate (PEM): its tokens are then accepted only over mutual TLS with it.")
@click.option("--webhook", "webhook_url", default=None,
              help="Notify this client at this URL when its opinions are ready (https; http only to loopback). "
                   "The signing secret is printed once.")
@one_line_errors
def clients_add(client_id: str, role: str, jwks_file: Path, scopes: tuple[str, ...], tenant: str | None,
                reviewer: str | None, cert_file: Path | None, webhook_url: str | None) -> None:
    """Register a client in the registry file (auth.clients_file); the API reads it when it starts."""
    from fhir_bridge.adapters.clients import add_client, set_webhook
    from fhir_bridge.adapters.reference_data import ReferenceFiles, load_role_ceilings
    from fhir_bridge.adapters.settings import clients_file
    from fhir_bridge.adapters.tls import certificate_file_thumbprint

    settings = _settings()
    thumbprint = certificate_file_thumbprint(cert_file) if cert_file else None  # RFC 8705 x5t#S256
    client = add_client(clients_file(settings), client_id, role, jwks_file, list(scopes), tenant or client_id,
                        reviewer=reviewer, cert_thumbprint=thumbprint,
                        ceilings=load_role_ceilings(ReferenceFiles.of(settings).roles))
    answer: dict[str, Any] = {"id": client.id, "role": client.role, "scopes": list(client.scopes),
                              "registry": str(clients_file(settings))}
    if thumbprint:
        answer["x5t#S256"] = thumbprint
    if webhook_url:
        answer["webhook"] = {"url": webhook_url,
                             "secret": set_webhook(clients_file(settings), client.id, webhook_url)}
    click.echo(json.dumps(answer))


@clients.command("webhook")
@click.option("--id", "client_id", required=True, help="The registered client_id.")
@click.option("--url", "url", default=None, help="The new webhook URL (a new secret is made and printed once).")
@click.option("--remove", is_flag=True, default=False, help="Remove the client's webhook.")
@one_line_errors
def clients_webhook(client_id: str, url: str | None, remove: bool) -> None:
    """Set (or rotate the secret of) a client's opinion webhook, or remove it; restart serve and workers."""
    from fhir_bridge.adapters.clients import set_webhook
    from fhir_bridge.adapters.settings import clients_file

    if bool(url) == remove:
        raise click.UsageError("give either --url URL or --remove")
    secret = set_webhook(clients_file(_settings()), client_id, None if remove else url)
    click.echo(json.dumps({"id": client_id, "webhook": {"url": url, "secret": secret} if url else None}))


@clients.command("token")
@click.option("--id", "client_id", required=True, help="The registered client_id.")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's private JWK (client-private.jwk.json from `clients keygen`).")
@click.option("--scope", required=True, help='Space-separated scopes to ask for, e.g. "system/AuditEvent.rs".')
@click.option("--url", "base_url", default=None, help="The bridge's FHIR base (default: api.public_base_url, "
              "else http://api.host:api.port/fhir).")
@one_line_errors
def clients_token(client_id: str, key_file: Path, scope: str, base_url: str | None) -> None:
    """Get an access token from the bridge as a registered client and print it (for curl, or the /audit page)."""
    import httpx

    from fhir_bridge.adapters.token_client import BackendServicesAuth, load_private_jwk

    settings = _settings()
    base = (base_url or settings.api.public_base_url or f"http://{settings.api.host}:{settings.api.port}").rstrip("/")
    base = base.removesuffix("/fhir")
    auth = BackendServicesAuth(f"{base}/auth/token", client_id, load_private_jwk(key_file), scope)
    with httpx.Client(timeout=30) as http:
        request = auth.token_request()
        try:
            token = auth.take_token_response(http.send(request))
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the token endpoint {request.url}: {type(exc).__name__}") from None
    click.echo(json.dumps({"access_token": token, "scope": auth.granted_scope}))


# Commands of issue 8 (batch jobs, job queue administration) live in their own modules and attach themselves
# to the groups above when imported.
from fhir_bridge.cli import jobs as cli_jobs  # noqa: E402,F401
from fhir_bridge.cli import sync as cli_sync  # noqa: E402,F401

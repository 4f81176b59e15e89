"""``fhir-bridge sandbox`` and ``fhir-bridge demo``: the synthetic national-record source and the whole path run
on it, for development, tests and benchmarks (never part of a deployment)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from fhir_bridge.cli.common import one_line_errors


@click.command()
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


@click.command()
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

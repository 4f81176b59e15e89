"""``fhir-bridge serve`` and ``fhir-bridge worker``: the bridge's long-running processes (API and job workers)."""

from __future__ import annotations

import asyncio
import signal

import click

from fhir_bridge.cli.common import cli_settings, one_line_errors


@click.command()
@click.option("--host", default=None, help="Address to listen on (api.host).")
@click.option("--port", default=None, type=int, help="Port to listen on (api.port).")
@one_line_errors
def serve(host: str | None, port: int | None) -> None:
    """Serve the FHIR API (starts a private Redis when FHIR_BRIDGE_REDIS_URL is not set).

    HTTPS and mutual TLS come from [api] tls_cert, tls_key, tls_client_ca and tls_client_cert."""
    import uvicorn

    from fhir_bridge.adapters.tls import uvicorn_tls_options
    from fhir_bridge.main import build_app, redis_url_for

    settings = cli_settings(api__host=host, api__port=port)
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


@click.command()
@click.option("--name", default=None, help="Consumer name (default: host-pid).")
@one_line_errors
def worker(name: str | None) -> None:
    """Run a job worker (collect and package cases); run as many as you like against one Redis."""
    from fhir_bridge.main import redis_url_for, run_worker

    settings = cli_settings()
    with redis_url_for(settings, may_start=False) as redis_url:
        asyncio.run(run_worker(settings, redis_url, name))

"""``fhir-bridge certs dev``: development certificates (real ones come from your PKI)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fhir_bridge.cli.common import one_line_errors


@click.group()
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

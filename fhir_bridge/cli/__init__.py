"""The ``fhir-bridge`` command line (click + rich): the root group, joining the command groups.

One module per command group (``pull``, ``serve``, ``sandbox``, ``audit``, ``certs``, ``clients``, ``sync``,
``jobs``, ``bundles``), each importing only :mod:`fhir_bridge.cli.common` (exit codes, one-line errors,
settings, the progress bar); this module adds them to the root group explicitly. Commands import their heavy
modules inside their functions, so ``fhir-bridge --help`` starts fast. Exit codes: see
:mod:`fhir_bridge.cli.common`.
"""

from __future__ import annotations

import sys

import click

from fhir_bridge.cli.audit import audit
from fhir_bridge.cli.bundles import verify_bundle
from fhir_bridge.cli.certs import certs
from fhir_bridge.cli.clients import clients
from fhir_bridge.cli.common import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, fail
from fhir_bridge.cli.jobs import jobs
from fhir_bridge.cli.pull import pull
from fhir_bridge.cli.sandbox import demo, sandbox
from fhir_bridge.cli.serve import serve, worker
from fhir_bridge.cli.sync import sync

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fhir-bridge")
def cli() -> None:
    """fhir-bridge: second opinions over the national health record (IHE MHD / ANS PDSm, FHIR R4)."""


for command in (pull, serve, worker, sandbox, demo, sync, audit, certs, verify_bundle, clients, jobs):
    cli.add_command(command)


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

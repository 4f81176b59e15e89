"""The ``fhir-bridge`` command line."""

from fhir_bridge.cli.commands import cli, main

__all__ = ["cli", "main"]

"""`python -m fhir_bridge` is the same as the `fhir-bridge` command."""

from fhir_bridge.cli import main

main()

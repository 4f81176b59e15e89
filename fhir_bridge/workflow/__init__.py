"""Use cases of fhir-bridge, talking to the outside only through the ports."""

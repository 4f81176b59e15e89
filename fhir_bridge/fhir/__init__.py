"""FHIR on the wire: resources (the only importer of fhir.resources), JSON and XML, terminology, profiles,
search parameters, the INS/NIR, and the generic element helpers every layer shares. Imports nothing above it."""

"""The HTTP edge (FastAPI): the app factory, thin FHIR routes over the use cases, the token endpoint, the
auditor's page, and the one place errors become OperationOutcomes."""

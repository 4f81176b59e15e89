"""What the audit trail needs to know about the work in progress, carried by context variables.

An AuditEvent names the inbound request that caused an exchange (its ``X-Request-Id``), the queue job doing
it and the patient it is about, but the code making the exchange (the source client deep in a collect, the
TaskBook moving a case) does not get those as arguments. They travel the way structlog's context does:

* ``request_id``: set by the API's audit middleware for the duration of one inbound call; the source client
  sends it on as ``X-Request-Id`` so the outbound calls of an intake share it (a fresh id otherwise);
* ``job_id``: set by the worker around one job (``AuditEvent.entity`` role Job of a job step);
* ``patient``: set by the workflow around the source calls made for one patient (ITI-67/68 name no patient
  identifier in their URL, yet their audit must).

Context variables are copied into tasks made by ``asyncio.gather``, so concurrent searches of one collect
see them, and they never leak from one request or job to the next (:func:`bound` resets them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any

from fhir_bridge.fhir.identity import PatientIdentifier

request_id: ContextVar[str | None] = ContextVar("fhir_bridge_request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("fhir_bridge_job_id", default=None)
patient: ContextVar[PatientIdentifier | None] = ContextVar("fhir_bridge_audit_patient", default=None)

_VARS: dict[str, ContextVar[Any]] = {"request_id": request_id, "job_id": job_id, "patient": patient}


@contextlib.contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Set some of ``request_id``, ``job_id``, ``patient`` for the block, and put the old values back after."""
    tokens: list[tuple[ContextVar[Any], Token[Any]]] = []
    for name, value in values.items():
        var = _VARS[name]  # a KeyError names the mistake
        tokens.append((var, var.set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)

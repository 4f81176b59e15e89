"""The source client's audit hook: one AuditEvent per logical exchange with the source (STANDARDS.md §7).

The client (:mod:`fhir_bridge.adapters.source_client`) says what each exchange was (a
:class:`~fhir_bridge.adapters.source_client.SourceExchange`); this turns it into the BALP event the audit log
appends, with the bridge as the observer: the source does not audit our reads for us.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fhir_bridge.adapters.source_client import SourceExchange
from fhir_bridge.audit import context as audit_context
from fhir_bridge.audit.events import Party, rest_event, source_event
from fhir_bridge.ports import AuditPort


def source_recorder(audit: AuditPort, bridge: Party, source: Party) -> Callable[[SourceExchange], Awaitable[None]]:
    """The source client's exchange hook: one AuditEvent per logical exchange with the source.

    ITI-78, ITI-67 and ITI-68 are ``source_event``s (BALP's PDQm/MHD consumer patterns); the ImagingStudy
    search and the Endpoint reads, which have no IHE transaction, are recorded in the plain BALP RESTful
    shape with the bridge as the client and the source as the server (the bridge still observes). The
    patient is the one the workflow is working for (``audit_context.patient``) when the call does not name it.
    """

    async def record(exchange: SourceExchange) -> None:
        patient = exchange.patient or audit_context.patient.get()
        if exchange.transaction is not None:
            event = source_event(transaction=exchange.transaction, status=exchange.status, bridge=bridge,
                                 source=source, patient=patient, query=exchange.query,
                                 document=exchange.url if exchange.transaction == "ITI-68" else None,
                                 submission_set=exchange.submission_set,
                                 request_id=exchange.request_id, outcome_desc=exchange.error)  # fmt: skip
        else:
            resource_id = exchange.url.rstrip("/").rsplit("/", 1)[-1] if exchange.interaction == "read" else None
            event = rest_event(interaction=exchange.interaction, resource_type=exchange.resource_type,
                               status=exchange.status, client=bridge, bridge=source, resource_id=resource_id,
                               patient=patient, query=exchange.query, request_id=exchange.request_id,
                               outcome_desc=exchange.error)  # fmt: skip
            observer: dict[str, Any] = {"identifier": {"value": bridge.id}}
            if bridge.name:
                observer["display"] = bridge.name
            event["source"] = {**event["source"], "observer": observer}  # we record it, not the source
        await audit.append(event)

    return record

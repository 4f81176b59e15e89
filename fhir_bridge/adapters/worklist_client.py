"""Sends a worklist's requests to the bridge's own API, as a registered platform client (``sync worklist``).

Through HTTP on purpose, not straight into Redis: each line takes the path every platform's request takes
(SMART token, tenant tagging, the INS check and the patient lookup at the source, the audit trail), so a
batch can do nothing a platform could not. Each line is a conditional create (FHIR R4 http.html#ccreate,
``If-None-Exist: identifier=SYSTEM|VALUE``): 201 is a new case, 200 one that was already there.

A few lines are in flight at once. Transient answers (429, 502, 503, 504, a lost connection) are tried
again with backoff; any other refusal is that line's failure, with the OperationOutcome's text (any
occurrence of the line's patient identifier removed: the text goes to a terminal). A refused token or a
missing scope stops the run (:class:`~fhir_bridge.errors.Unauthenticated`/:class:`~fhir_bridge.errors.Forbidden`):
every line would fail the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from fhir_bridge.adapters.token_client import BackendServicesAuth
from fhir_bridge.case.worklist import WorklistLine
from fhir_bridge.errors import Forbidden, Unauthenticated
from fhir_bridge.retry import RetryPolicy

__all__ = ["LineOutcome", "submit_lines"]

SCOPE = "system/ServiceRequest.crs"
#: the source client's policy (fhir_bridge.retry): 4 tries, full jitter from 0.5 s up to 5 s, Retry-After honoured
_RETRY = RetryPolicy(max_retries=3, backoff_initial=0.5, backoff_max=5.0)
_FHIR = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json",
         "Prefer": "return=minimal"}


@dataclass(frozen=True, slots=True)
class LineOutcome:
    """What became of one line: ``created``, ``exists`` (already there) or ``failed`` with a reason."""

    number: int
    outcome: str
    reason: str = ""
    request_id: str = ""  # the ServiceRequest's id at the bridge, when known


async def submit_lines(lines: Sequence[WorklistLine], *, api: str, auth: BackendServicesAuth, concurrency: int = 4,
                       on_done: Callable[[LineOutcome], None] | None = None,
                       transport: httpx.AsyncBaseTransport | None = None) -> list[LineOutcome]:
    """POST every line's ServiceRequest to ``api`` (the FHIR base); outcomes in line order."""
    base = api.rstrip("/")
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60, transport=transport) as http:
        await _first_token(http, auth)  # a refused client stops here, before any line is sent
        http.auth = auth

        async def one(line: WorklistLine) -> LineOutcome:
            async with limit:
                outcome = await _submit(http, base, line)
            if on_done is not None:
                on_done(outcome)
            return outcome

        return list(await asyncio.gather(*(one(line) for line in lines)))


async def _first_token(http: httpx.AsyncClient, auth: BackendServicesAuth) -> None:
    request = auth.token_request()
    try:
        response = await http.send(request)
    except httpx.HTTPError as exc:
        raise Unauthenticated(f"cannot reach the token endpoint {request.url}: {type(exc).__name__}") from None
    auth.take_token_response(response)


async def _submit(http: httpx.AsyncClient, base: str, line: WorklistLine) -> LineOutcome:
    body = json.dumps(line.request, ensure_ascii=False).encode()
    headers = {**_FHIR, "If-None-Exist": line.if_none_exist}
    reason, retry_after, attempt = "", None, 0
    while True:
        if attempt:
            if not _RETRY.can_retry(attempt):
                break
            await asyncio.sleep(_RETRY.delay(attempt, retry_after))
        attempt += 1
        try:
            response = await http.post(f"{base}/ServiceRequest", content=body, headers=headers)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            reason, retry_after = f"the API did not answer ({type(exc).__name__})", None
            continue
        if response.status_code in (200, 201):
            outcome = "created" if response.status_code == 201 else "exists"
            return LineOutcome(line.number, outcome, request_id=_id_from(response))
        reason = _refusal(response, line)
        if response.status_code == 401:
            raise Unauthenticated(f"the API refused the token: {reason}")
        if response.status_code == 403:
            raise Forbidden(f"the API refused the client: {reason}")
        if not _RETRY.should_retry_status(response.status_code):
            break
        retry_after = response.headers.get("Retry-After")
    return LineOutcome(line.number, "failed", reason)


def _id_from(response: httpx.Response) -> str:
    """The ServiceRequest id from ``Location`` (``…/ServiceRequest/<id>/_history/<v>``) or the body."""
    parts: list[str] = str(response.headers.get("Location", "")).split("/")
    if "ServiceRequest" in parts and parts.index("ServiceRequest") + 1 < len(parts):
        return parts[parts.index("ServiceRequest") + 1]
    try:
        return str(response.json().get("id", ""))
    except ValueError:
        return ""


def _refusal(response: httpx.Response, line: WorklistLine) -> str:
    """``HTTP <status>: <the OperationOutcome's first issue>``, without the line's patient identifier."""
    text = ""
    try:
        outcome: Any = response.json()
        issue = (outcome.get("issue") or [{}])[0]
        text = str(issue.get("diagnostics") or (issue.get("details") or {}).get("text") or "")
    except (ValueError, AttributeError, IndexError):
        text = ""
    value = str(line.request["subject"]["identifier"]["value"])
    text = text.replace(value, "<patient>")[:300]
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")

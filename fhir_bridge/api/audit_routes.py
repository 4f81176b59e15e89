"""The audit trail for auditors: ``GET /fhir/AuditEvent`` (search), ``GET /fhir/AuditEvent/{id}`` (read) and
``GET|POST /fhir/AuditEvent/$verify`` (the chain's verification), issue 7 item 3.

Search parameters (the CapabilityStatement declares them from ``fhir_bridge.api.capability.AUDIT_SEARCH_PARAMS``):

* ``date``: ``recorded``, with the R4 prefixes ``eq`` (the default: within the precision given), ``ge``, ``gt``,
  ``le``, ``lt``; repeat it for a range (``date=ge2026-05-01&date=lt2026-06-01``). A date or a time without a
  zone is taken in UTC;
* ``patient`` (or ``patient:identifier``): the patient's identifier as a token ``system|value``. The bridge
  records identifiers, not Patient references, so this is a token search on the patient entity;
* ``agent``: a client id, the bridge (``fhir-bridge``) or the source's base URL; ``subtype``: ``code`` or
  ``system|code`` (``read``, ``ITI-67``, ``collecting``…); ``outcome``: 0, 4, 8 or 12; ``entity``: a
  resource reference (``Task/12``);
* comma-separated values are ORed, different parameters ANDed; ``_count`` and ``_offset`` page, newest first.

The answer is an R4 searchset Bundle with self/next/previous links. ``$verify`` answers a ``Parameters``
(``result``, ``count``, and when broken ``firstBrokenSeq`` and ``reason``; the chain's end and last
checkpoint) with 200 whatever the verdict: the operation worked, the chain may not have.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from redis.exceptions import RedisError
from starlette.responses import Response

from fhir_bridge.access.scopes import AccessContext, Interaction
from fhir_bridge.access.tenancy import require_scope
from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.api.capability import AUDIT_OPERATIONS
from fhir_bridge.api.deps import Caller, base_url, fhir_router, search_form
from fhir_bridge.api.fhir_io import fhir_response, paging, searchset
from fhir_bridge.audit.events import OUTCOMES
from fhir_bridge.errors import AuditUnavailable, Forbidden, Gone, InvalidInput, NotFound
from fhir_bridge.fhir.resources import loads

__all__ = ["AUDIT_OPERATIONS", "date_bounds", "parse_audit_search", "router", "stored_event"]

_DATE = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?")  # fmt: skip
_PREFIXES = ("eq", "ge", "gt", "le", "lt")
_FILTERS = {"patient": "patient", "patient:identifier": "patient", "agent": "agent", "subtype": "subtype",
            "outcome": "outcome", "entity": "entity"}  # fmt: skip
_MAX_SEQ_DIGITS = 15

router = fhir_router()


def audit_log(request: Request) -> RedisAuditLog:
    log: RedisAuditLog | None = getattr(request.app.state, "audit", None)
    if log is None:
        raise AuditUnavailable("no audit log is configured")
    return log


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """Redis failing under a read of the log is the audit being unavailable (503), not an internal error."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise AuditUnavailable(f"the audit log cannot be read ({type(exc).__name__})") from exc


def date_bounds(value: str) -> tuple[datetime | None, datetime | None]:
    """``[low, high)`` of one ``date`` parameter value (R4 search.html#date, prefixes eq ge gt le lt)."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    match = _DATE.fullmatch(text)
    if prefix not in _PREFIXES or match is None:
        raise InvalidInput(f"date {value!r}: give [eq|ge|gt|le|lt]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][zone]]]]",
                           expression=["date"])  # fmt: skip
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    tz = UTC
    if zone and zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    try:
        start = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         int(second or 0), round(float(fraction or 0) * 1_000_000), tzinfo=tz)  # fmt: skip
    except ValueError:
        raise InvalidInput(f"date {value!r} is not a valid date", expression=["date"]) from None
    if fraction:
        end = start + timedelta(seconds=10 ** -(len(fraction) - 1))
    elif second:
        end = start + timedelta(seconds=1)
    elif minute:
        end = start + timedelta(minutes=1)
    elif day:
        end = start + timedelta(days=1)
    elif month:
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    else:
        end = start.replace(year=start.year + 1)
    return {"eq": (start, end), "ge": (start, None), "gt": (end, None), "lt": (None, start),
            "le": (None, end)}[prefix]  # fmt: skip


def parse_audit_search(params: list[tuple[str, str]]) -> dict[str, Any]:
    """Search parameters → keyword arguments of ``RedisAuditLog.search`` (unknown parameters are refused)."""
    low: datetime | None = None
    high: datetime | None = None
    filters: dict[str, Any] = {}
    for name, value in params:
        if name.startswith("_"):
            continue  # _count, _offset, _format: the caller's
        if name == "date":
            if "," in value:
                raise InvalidInput("date does not take comma-separated values; repeat it for a range",
                                   expression=["date"])  # fmt: skip
            lo, hi = date_bounds(value.strip())
            low = lo if low is None else max(low, lo) if lo else low
            high = hi if high is None else min(high, hi) if hi else high
            continue
        key = _FILTERS.get(name)
        if key is None:
            raise InvalidInput(f"search parameter {name!r} is not supported on AuditEvent", expression=[name])
        if key in filters:
            raise InvalidInput(f"search parameter {name!r} repeated: not supported; use one with comma-separated "
                               "values for OR", expression=[name])  # fmt: skip
        values = [v.strip() for v in value.split(",") if v.strip()]
        if not values:
            raise InvalidInput(f"search parameter {name!r} has no value", expression=[name])
        if key == "patient" and any(not all(v.partition("|")[::2]) for v in values):
            raise InvalidInput("give the patient as its identifier, system|value", expression=[name])
        if key == "outcome" and any(v not in OUTCOMES for v in values):
            raise InvalidInput("outcome is one of 0, 4, 8, 12", expression=[name])
        if key == "entity":
            values = [_reference(v) for v in values]
        filters[key] = values
    return {**filters, "date_ge": low, "date_lt": high}


def _reference(value: str) -> str:
    """``http://host/fhir/Task/1/_history/2`` or ``Task/1/_history/2`` → ``Task/1`` (how the index keeps it)."""
    parts = value.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:])


async def _search(request: Request, params: list[tuple[str, str]]) -> Response:
    count, offset = paging(request, params)
    filters = parse_audit_search(params)
    events, total = await audit_log(request).search(**filters, count=count, offset=offset)
    return fhir_response(request, searchset(base_url(request), "AuditEvent", events, total, params, count, offset))


async def search(request: Request) -> Response:
    return await _search(request, list(request.query_params.multi_items()))


async def search_post(request: Request) -> Response:
    return await _search(request, await search_form(request))


async def stored_event(request: Request, seq: int) -> bytes:
    """The stored bytes of event ``seq``; NotFound, Gone when retention removed it, AuditUnavailable."""
    log = audit_log(request)
    with _reading():
        body = None
        async for _, stored in log.read_range(seq, seq):
            body = stored
        if body is None:
            floor = (await log.state()).floor
            if floor is not None and seq <= floor.seq:
                raise Gone("that AuditEvent was removed by the retention policy")
            raise NotFound("no such AuditEvent")
    return body


async def read(request: Request, resource_id: str) -> Response:
    # ASCII digits only: str.isdigit() also takes "³" and "١", which int() refuses or reads as another number
    if not (resource_id.isascii() and resource_id.isdigit()) or len(resource_id) > _MAX_SEQ_DIGITS or \
            int(resource_id) < 1:
        raise NotFound("no such AuditEvent")
    return fhir_response(request, loads(await stored_event(request, int(resource_id))))


async def verify(request: Request) -> Response:
    log = audit_log(request)
    result = await log.verify()
    with _reading():
        state = await log.state()
    parameters: list[dict[str, Any]] = [{"name": "result", "valueBoolean": result.ok},
                                        {"name": "count", "valueInteger": result.count}]  # fmt: skip
    if not result.ok:
        if result.first_broken_seq is not None:
            parameters.append({"name": "firstBrokenSeq", "valueInteger": result.first_broken_seq})
        parameters.append({"name": "reason", "valueString": result.reason})
    parameters += [{"name": "headSeq", "valueInteger": state.seq},
                   {"name": "headHash", "valueString": state.hash},
                   {"name": "lastCheckpointSeq", "valueInteger": state.checkpoint_seq}]  # fmt: skip
    if state.floor is not None:
        parameters.append({"name": "retentionFloorSeq", "valueInteger": state.floor.seq})
    return fhir_response(request, {"resourceType": "Parameters", "parameter": parameters})


def auditor_only(interaction: Interaction) -> Callable[[AccessContext], Awaitable[None]]:
    """The audit is for auditors alone (issue 6 "Roles"): their role and ``system/AuditEvent.<interaction>``."""

    async def check(who: Caller) -> None:
        require_scope(who, "AuditEvent", interaction)
        if who.role != "auditor":
            raise Forbidden("only auditor clients read the audit trail")

    return check


def register(target: APIRouter) -> None:
    reads, searches = [Depends(auditor_only("r"))], [Depends(auditor_only("s"))]
    # $verify before {resource_id}: the read's path would take "$verify" as an id
    target.add_api_route("/AuditEvent/$verify", verify, methods=["GET", "POST"], name="audit-verify",
                         dependencies=reads)
    target.add_api_route("/AuditEvent", search, methods=["GET"], name="search-AuditEvent", dependencies=searches)
    target.add_api_route("/AuditEvent/_search", search_post, methods=["POST"], name="search-post-AuditEvent",
                         dependencies=searches)
    target.add_api_route("/AuditEvent/{resource_id}", read, methods=["GET"], name="read-AuditEvent",
                         dependencies=reads)


register(router)

"""FHIR searches of the sandbox: parameter parsing, matching and paged searchset Bundles.

Pure: a search takes the world, the query as ``(name, value)`` pairs and the base URLs, and returns a
Bundle; wrong input raises :class:`~fhir_bridge.errors.InvalidInput` and the app turns it into a 400
OperationOutcome. Unknown parameters are ignored and left out of the ``self`` link, which shows the
parameters actually used (FHIR R4 search.html §3.1.1.3 "Handling errors").

Paging: results are sorted on a stable key, each page is ``_count`` long (at most the server's cap) and
``next`` carries ``_offset`` (FHIR R4 http.html#paging). MHD ITI-67 (§2:3.67.4.1.2) requires ``patient``
or ``patient.identifier`` and ``status``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.sandbox import render
from fhir_bridge.sandbox.model import DOCUMENT_STATUSES, SandboxDocument, SandboxPatient, SandboxStudy, World
from fhir_bridge.sandbox.render import Urls, entry_uuid, instant

Params = Sequence[tuple[str, str]]
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


@dataclass(frozen=True, slots=True)
class DateFilter:
    """One date search value: the prefix and the interval its precision covers, ``[start, end)``."""

    prefix: str
    start: datetime
    end: datetime

    def matches(self, when: datetime) -> bool:
        p = self.prefix
        if p in ("gt", "sa"):
            return when >= self.end
        if p == "ge":
            return when >= self.start
        if p in ("lt", "eb"):
            return when < self.start
        if p == "le":
            return when < self.end
        if p == "ne":
            return not self.start <= when < self.end
        return self.start <= when < self.end  # eq, ap


def parse_date_filter(name: str, text: str) -> DateFilter:
    """``[prefix]YYYY[-MM[-DD[Thh:mm[:ss[.fff]][tz]]]]``; a value without zone is taken as UTC."""
    prefix, value = ("eq", text)
    if text[:2] in _PREFIXES:
        prefix, value = text[:2], text[2:]
    match = _DATE.match(value.strip())
    if not match:
        raise InvalidInput(f"{name}: not a FHIR date or instant", expression=[name])
    g = match.groupdict()
    try:
        tz = UTC
        if g["tz"] and g["tz"] != "Z":
            sign = 1 if g["tz"][0] == "+" else -1
            tz = timezone(sign * timedelta(hours=int(g["tz"][1:3]), minutes=int(g["tz"][4:6])))
        start = datetime(int(g["y"]), int(g["m"] or 1), int(g["d"] or 1), int(g["H"] or 0), int(g["M"] or 0),
                         int(g["S"] or 0), int(float(g["f"]) * 1_000_000) if g["f"] else 0, tzinfo=tz)
    except ValueError:
        raise InvalidInput(f"{name}: not a valid date", expression=[name]) from None
    if g["f"]:  # a value is the range its precision covers (search.html#date): .345 is [.345, .346)
        end = start + timedelta(microseconds=10 ** max(0, 7 - len(g["f"])))
    elif g["S"]:
        end = start + timedelta(seconds=1)
    elif g["M"]:
        end = start + timedelta(minutes=1)
    elif g["d"]:
        end = start + timedelta(days=1)
    elif g["m"]:
        end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    else:
        end = start.replace(year=start.year + 1)
    return DateFilter(prefix, start.astimezone(UTC), end.astimezone(UTC))


@dataclass(frozen=True, slots=True)
class Paging:
    count: int
    offset: int


def paging(params: Params, cap: int) -> Paging:
    """``_count`` (default and maximum: the server's cap) and ``_offset``."""
    count, offset = cap, 0
    for name, value in params:
        if name in ("_count", "_offset"):
            if not (value.isascii() and value.isdigit()):
                raise InvalidInput(f"{name} must be a non-negative integer", expression=[name])
            if name == "_count":
                count = min(int(value), cap)
            else:
                offset = int(value)
    return Paging(count, offset)


def _values(params: Params, name: str) -> list[list[str]]:
    """Each occurrence of ``name`` (AND) as its comma-separated values (OR); an empty one counts as absent."""
    found = [[v.strip() for v in value.split(",") if v.strip()] for key, value in params if key == name]
    return [values for values in found if values]


def _token(value: str) -> tuple[str | None, str]:
    if "|" in value:
        system, _, code = value.partition("|")
        return system or None, code
    return None, value


def reference_id(value: str, resource_type: str) -> str:
    """``id``, ``Type/id`` or an absolute URL ending in ``Type/id``."""
    marker = f"{resource_type}/"
    return value.rsplit(marker, 1)[1].split("/")[0] if marker in value else value


def _patients_matching(world: World, params: Params) -> tuple[set[str] | None, list[tuple[str, str]]]:
    """Patient ids allowed by ``patient`` / ``patient.identifier`` (None: no such parameter)."""
    allowed: set[str] | None = None
    used: list[tuple[str, str]] = []
    for name in ("patient", "patient.identifier", "subject"):
        for values in _values(params, name):
            if name == "patient.identifier":
                found = {p.id for v in values for p in [world.find_patient(*_token(v))] if p is not None}
            else:
                found = {reference_id(v, "Patient") for v in values}
            allowed = found if allowed is None else allowed & found
            used.append((name, ",".join(values)))
    return allowed, used


def _in(attr: str, allowed: set[str]) -> Callable[[SandboxDocument], bool]:
    return lambda d: getattr(d, attr) in allowed


def _token_check(attr: str, system: str, tokens: list[tuple[str | None, str]]) -> Callable[[SandboxDocument], bool]:
    return lambda d: any(code == getattr(d, attr) and sys in (None, system) for sys, code in tokens)


def _identifier_check(wanted: set[str]) -> Callable[[SandboxDocument], bool]:
    return lambda d: d.master_identifier in wanted or entry_uuid(d.id) in wanted


def _date_check(attr: str, date_filter: DateFilter) -> Callable[[SandboxDocument], bool]:
    return lambda d: date_filter.matches(getattr(d, attr))


def document_matches(world: World, params: Params) -> tuple[list[SandboxDocument], list[tuple[str, str]]]:
    """ITI-67 Find Document References (MHD §2:3.67.4.1.2): the matches and the parameters used."""
    allowed, used = _patients_matching(world, params)
    if allowed is None:
        raise InvalidInput("ITI-67 needs patient or patient.identifier", expression=["patient"])
    statuses = _values(params, "status")
    if not statuses:
        raise InvalidInput("ITI-67 needs status (current, superseded or entered-in-error)", expression=["status"])
    for values in statuses:
        if bad := [v for v in values if v not in DOCUMENT_STATUSES]:
            raise InvalidInput(f"unknown status {bad[0]!r}", expression=["status"])
        used.append(("status", ",".join(values)))
    checks: list[Callable[[SandboxDocument], bool]] = [_in("patient_id", allowed)]
    checks.extend(_in("status", set(values)) for values in statuses)
    for name, attr, system in (("type", "type_code", render.LOINC), ("category", "class_code", render.CLASS_SYSTEM)):
        for values in _values(params, name):
            checks.append(_token_check(attr, system, [_token(v) for v in values]))
            used.append((name, ",".join(values)))
    for name, attr in (("_lastUpdated", "last_updated"), ("date", "date")):
        for value in (v for k, v in params if k == name):
            checks.append(_date_check(attr, parse_date_filter(name, value)))
            used.append((name, value))
    for values in _values(params, "identifier"):  # MHD: masterIdentifier or identifier (the entryUUID)
        checks.append(_identifier_check({_token(v)[1] for v in values}))
        used.append(("identifier", ",".join(values)))
    # only the named patients' documents: a world of 10,000 patients (the sync benchmark) has 120,000
    candidates = (d for pid in allowed if (p := world.patient(pid)) is not None for d in p.documents)
    found = [d for d in candidates if all(check(d) for check in checks)]
    return sorted(found, key=lambda d: (d.date, d.id)), used


def patient_matches(world: World, params: Params) -> tuple[list[SandboxPatient], list[tuple[str, str]]]:
    """Patient search by ``identifier`` (token) and ``_id``; no criteria lists every patient."""
    found, used = list(world.patients), []
    for values in _values(params, "identifier"):
        tokens = [_token(v) for v in values]
        keep = {p.id for s, v in tokens for p in [world.find_patient(s, v)] if p is not None}
        found = [p for p in found if p.id in keep]
        used.append(("identifier", ",".join(values)))
    for values in _values(params, "_id"):
        found = [p for p in found if p.id in values]
        used.append(("_id", ",".join(values)))
    return found, used


def study_matches(world: World, params: Params) -> tuple[list[SandboxStudy], list[tuple[str, str]]]:
    """ImagingStudy search by ``patient`` / ``patient.identifier`` and ``_lastUpdated`` (incremental sync)."""
    allowed, used = _patients_matching(world, params)
    people = world.patients if allowed is None else [p for pid in allowed if (p := world.patient(pid)) is not None]
    found = [s for p in people for s in p.studies if s.patient_id == p.id]
    for value in (v for k, v in params if k == "_lastUpdated"):
        date_filter = parse_date_filter("_lastUpdated", value)
        found = [s for s in found if date_filter.matches(s.last_updated)]
        used.append(("_lastUpdated", value))
    return sorted(found, key=lambda s: (s.started, s.id)), used


def searchset(
    resource_type: str,
    matches: Sequence[Any],
    used: list[tuple[str, str]],
    page: Paging,
    world: World,
    urls: Urls,
    *,
    include_endpoints: bool = False,
) -> Resource:
    """One page of a searchset Bundle, with ``self``, ``next`` and ``previous`` links (absolute URLs)."""
    window = matches[page.offset : page.offset + page.count] if page.count else []

    def link(offset: int) -> str:
        query = [*used, ("_count", str(page.count)), ("_offset", str(offset))]
        if include_endpoints:
            query.append(("_include", "ImagingStudy:endpoint"))
        return f"{urls.fhir}/{resource_type}?{urlencode(query)}"

    links = [{"relation": "self", "url": link(page.offset)}]
    if page.count and page.offset + page.count < len(matches):
        links.append({"relation": "next", "url": link(page.offset + page.count)})
    if page.count and page.offset > 0:
        links.append({"relation": "previous", "url": link(max(0, page.offset - page.count))})
    entries = [
        {"fullUrl": urls.full(resource_type, item.id),
         "resource": render.any_resource(resource_type, item, world, urls),
         "search": {"mode": "match"}}
        for item in window
    ]
    if include_endpoints:
        for endpoint_id in sorted({s.endpoint_id for s in window}):
            e = world.endpoint(endpoint_id)
            if e is not None:
                entries.append({"fullUrl": urls.full("Endpoint", e.id), "resource": render.endpoint(e, urls),
                                "search": {"mode": "include"}})
    bundle: Resource = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": instant(datetime.now(UTC))},
        "type": "searchset",
        "total": len(matches),
        "link": links,
    }
    if entries:
        bundle["entry"] = entries
    return bundle

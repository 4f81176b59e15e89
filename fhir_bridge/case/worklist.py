"""Worklists for hospital IT: a file of second-opinion requests, one per line (``fhir-bridge sync worklist``).

A tumor board's weekly list, or any batch, comes as CSV (a header line, then one request per line; ``,`` or
``;`` as the separator, the one the header uses) or as NDJSON (one JSON object per line). Both name the same
fields:

=================  ========  =============================================================================
field              needed    becomes
=================  ========  =============================================================================
``patient``        yes       ``subject.identifier``: ``SYSTEM|NIR``, or a bare NIR in the default INS system
``patient_system`` no        the INS system of a bare ``patient`` value
``specialty``      yes       ``category`` (a code of ``mappings/specialty.json``)
``question``       yes       ``reasonCode.text``: the clinical question
``deadline``       no        ``occurrenceDateTime`` (a FHIR date or dateTime)
``requester``      no        ``requester.display``
``id``             no        the request identifier's value (also ``request_id``)
``kind``           no        ``second-opinion`` (default) or ``tumor-board-opinion``
``priority``       no        routine, urgent, asap or stat
``plan``           no        a ``note``: the proposed treatment plan
=================  ========  =============================================================================

Idempotency: every line gets a stable request identifier, the ``id`` column when there is one, else
``wl-`` and 32 hex digits of the SHA-256 of the line's normalised fields (spaces collapsed, the NIR in its
normal form, the line number left out), so the same line sent again — in this file or the next week's — is
the same request, and the API's conditional create (``If-None-Exist: identifier=SYSTEM|VALUE``) makes no
second case. Editing any field of a line without an ``id`` makes it a new request.

Each line is read on its own, so one bad line (broken CSV quoting, a bad NIR, an unknown specialty, not
JSON) is reported with its number and the rest proceeds; a quoted field can therefore not span lines. A
line is checked with the API's own rules (:func:`fhir_bridge.case.intake.check_request`) before anything is
sent. Reasons never repeat a field's value: the file holds patient identifiers.

Pure: bytes in, requests and per-line errors out; the HTTP side is :mod:`fhir_bridge.adapters.worklist_client`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from fhir_bridge.case.deadlines import PRIORITIES, parse_fhir_datetime
from fhir_bridge.case.intake import REQUEST_CODES, SPECIALTY, check_request
from fhir_bridge.errors import BridgeError, InvalidIdentifier, InvalidInput
from fhir_bridge.fhir.identity import INS_NIR, NIR_SYSTEMS, validate_nir
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE, CASE_CODES, Terminology

__all__ = ["DEFAULT_REQUEST_SYSTEM", "LineError", "Worklist", "WorklistLine", "read_worklist"]

DEFAULT_REQUEST_SYSTEM = f"{CANONICAL_BASE}/NamingSystem/worklist-request"
REQUIRED = ("patient", "specialty", "question")
OPTIONAL = ("patient_system", "deadline", "requester", "id", "request_id", "kind", "priority", "plan")
_MAX_ID = 128
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class WorklistLine:
    """One request ready to send: its line number, the ServiceRequest and its identifier."""

    number: int
    request: Resource
    system: str
    value: str

    @property
    def if_none_exist(self) -> str:
        """The conditional-create search (FHIR R4 http.html#ccreate) that makes the line idempotent."""
        return f"identifier={self.system}|{self.value}"


@dataclass(frozen=True, slots=True)
class LineError:
    """A line that will not be sent, and why (never quoting the line's values)."""

    number: int
    reason: str


@dataclass
class Worklist:
    lines: list[WorklistLine]
    errors: list[LineError]
    total: int  # request lines read (blank lines and the CSV header not counted)


def read_worklist(data: bytes, *, filename: str, terminology: Terminology,
                  request_system: str = DEFAULT_REQUEST_SYSTEM, patient_system: str = INS_NIR) -> Worklist:
    """Read a worklist file; a file that is not a worklist at all (unknown columns, no header, empty) raises
    :class:`InvalidInput` (exit 2), a bad line becomes a :class:`LineError` and the others are kept."""
    raw = data.removeprefix(b"\xef\xbb\xbf").splitlines()
    numbered = [(n, line) for n, line in enumerate(raw, start=1) if line.strip()]
    if not numbered:
        raise InvalidInput("the worklist is empty")
    ndjson = filename.lower().endswith((".ndjson", ".jsonl")) or numbered[0][1].lstrip().startswith(b"{")
    rows = _ndjson_rows(numbered) if ndjson else _csv_rows(numbered)
    worklist = Worklist([], [], 0)
    first_seen: dict[str, tuple[int, str]] = {}
    for number, fields in rows:
        worklist.total += 1
        if isinstance(fields, LineError):
            worklist.errors.append(fields)
            continue
        try:
            line = _line(number, fields, terminology, request_system, patient_system)
        except BridgeError as exc:
            worklist.errors.append(LineError(number, exc.message))
            continue
        fingerprint = _fingerprint(line.request)
        earlier = first_seen.setdefault(line.value, (number, fingerprint))
        if earlier[1] != fingerprint:
            worklist.errors.append(LineError(number, f"request id already used on line {earlier[0]} with other fields"))
            continue
        worklist.lines.append(line)
    return worklist


Row = tuple[int, dict[str, str] | LineError]


def _ndjson_rows(numbered: list[tuple[int, bytes]]) -> Iterator[Row]:
    for number, raw in numbered:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield number, LineError(number, "not UTF-8 text")
            continue
        except ValueError:
            yield number, LineError(number, "not a JSON object (NDJSON: one object per line)")
            continue
        if not isinstance(obj, dict):
            yield number, LineError(number, "not a JSON object (NDJSON: one object per line)")
            continue
        fields = {_column(k): v for k, v in obj.items()}
        if unknown := sorted(k for k in fields if k not in REQUIRED + OPTIONAL):
            yield number, LineError(number, f"unknown field {unknown[0]!r} (known: {', '.join(REQUIRED + OPTIONAL)})")
            continue
        if bad := sorted(k for k, v in fields.items() if v is not None and not isinstance(v, str | int)):
            yield number, LineError(number, f"field {bad[0]!r} must be a string")
            continue
        yield number, {k: "" if v is None else str(v) for k, v in fields.items()}


def _csv_rows(numbered: list[tuple[int, bytes]]) -> Iterator[Row]:
    header_number, header_raw = numbered[0]
    try:
        header_text = header_raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the worklist's header line is not UTF-8 text") from None
    delimiter = ";" if header_text.count(";") > header_text.count(",") else ","
    try:
        header = [_column(name) for name in _split(header_text, delimiter)]
    except csv.Error:
        raise InvalidInput(f"line {header_number}: the header line has broken CSV quoting") from None
    if unknown := [name for name in header if name not in REQUIRED + OPTIONAL]:
        raise InvalidInput(f"unknown column {unknown[0]!r} in the header; the columns are "
                           f"{', '.join(REQUIRED)} (needed) and {', '.join(OPTIONAL)}")
    if missing := [name for name in REQUIRED if name not in header]:
        raise InvalidInput(f"the header has no {missing[0]!r} column (needed: {', '.join(REQUIRED)})")
    if len(set(header)) != len(header):
        raise InvalidInput("a column is named twice in the header")
    for number, raw in numbered[1:]:
        try:
            cells = _split(raw.decode("utf-8"), delimiter)
        except UnicodeDecodeError:
            yield number, LineError(number, "not UTF-8 text")
            continue
        except csv.Error:
            yield number, LineError(number, "broken CSV quoting (a quoted field must be closed on its line, "
                                            "and a quote inside it doubled)")
            continue
        if len(cells) != len(header):
            yield number, LineError(number, f"{len(cells)} fields where the header has {len(header)}")
            continue
        yield number, dict(zip(header, cells, strict=True))


def _split(text: str, delimiter: str) -> list[str]:
    """One CSV record from one line; strict, so a stray or unclosed quote is an error, not a guess."""
    return next(csv.reader([text], delimiter=delimiter, strict=True))


def _column(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def _line(number: int, fields: dict[str, str], terminology: Terminology, request_system: str,
          patient_system: str) -> WorklistLine:
    f = {k: _SPACES.sub(" ", v).strip() for k, v in fields.items()}
    for name in REQUIRED:
        if not f.get(name):
            raise InvalidInput(f"{name} is empty")
    system, _, value = f["patient"].rpartition("|")
    system = system or f.get("patient_system") or patient_system
    value = value.replace(" ", "").upper()
    kind = f.get("kind") or "second-opinion"
    if kind not in REQUEST_CODES:
        raise InvalidInput(f"kind must be {' or '.join(sorted(REQUEST_CODES))}")
    sr: Resource = {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "code": {"coding": [{"system": CASE_CODES, "code": kind}]},
        "category": [{"coding": [{"system": SPECIALTY, "code": f["specialty"]}]}],
        "subject": {"identifier": {"system": system, "value": value}},
        "reasonCode": [{"text": f["question"]}],
    }
    if deadline := f.get("deadline"):
        if parse_fhir_datetime(deadline) is None:
            raise InvalidInput("deadline must be a date (YYYY-MM-DD) or a FHIR dateTime")
        sr["occurrenceDateTime"] = deadline
    if priority := f.get("priority"):
        if priority not in PRIORITIES:
            raise InvalidInput(f"priority must be one of {', '.join(sorted(PRIORITIES))}")
        sr["priority"] = priority
    if requester := f.get("requester"):
        sr["requester"] = {"display": requester}
    if plan := f.get("plan"):
        sr["note"] = [{"text": plan}]
    _check(sr, terminology)
    explicit = f.get("id") or f.get("request_id")
    if explicit and f.get("id") and f.get("request_id") and f["id"] != f["request_id"]:
        raise InvalidInput("id and request_id differ")
    if explicit and (len(explicit) > _MAX_ID or not explicit.isprintable()):
        raise InvalidInput(f"id must be printable and at most {_MAX_ID} characters")
    ident = explicit or "wl-" + hashlib.sha256(_fingerprint(sr).encode()).hexdigest()[:32]
    sr["identifier"] = [{"system": request_system, "value": ident}]
    return WorklistLine(number, sr, request_system, ident)


def _check(sr: Resource, terminology: Terminology) -> None:
    """The API's own rules (the same function), after friendlier checks of the fields a worklist names; a
    NIR error names the field, never its value."""
    identifier = sr["subject"]["identifier"]
    if identifier["system"] not in NIR_SYSTEMS:
        raise InvalidInput("the patient's system must be an INS system (INS-NIR, INS-NIA, test or demo)")
    try:
        identifier["value"] = validate_nir(identifier["value"])
    except InvalidIdentifier as exc:
        raise InvalidInput(f"patient: {exc.message}") from None
    known = {c["code"] for c in terminology.resources.get("specialty", {}).get("concept", [])}
    if sr["category"][0]["coding"][0]["code"] not in known:
        raise InvalidInput(f"unknown specialty (known: {', '.join(sorted(known))})")
    check_request(sr, terminology)


def _fingerprint(sr: Resource) -> str:
    """The request's content, canonical, without its identifier: what makes two lines the same request."""
    content = {k: v for k, v in sr.items() if k != "identifier"}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

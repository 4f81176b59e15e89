"""FHIR R4 resources on the wire: parsing, validating and emitting JSON.

The only module that imports ``fhir.resources`` (R4B models: 8.x ships no plain R4 package, and every
resource we use is identical in R4 and R4B). The rest of the bridge works on plain JSON dicts, because
the models are slow (~0.4 ms per DocumentReference) and lossy on round trips (decimals, time precision):
we validate once at the boundary and then keep, hash and sign the bytes we emit, never a re-serialised
model (STANDARDS.md §6).

JSON numbers are parsed as :class:`decimal.Decimal` so that a FHIR ``decimal`` such as ``1.50`` keeps its
precision when we write it back (FHIR R4 datatypes §2.24.0.1 "decimal": precision is significant).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from functools import cache
from typing import Any, Protocol

from pydantic import ValidationError

from fhir_bridge.errors import MalformedResource, TooLarge

Resource = dict[str, Any]

FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"


def loads(data: bytes | str, *, max_bytes: int | None = None) -> Any:
    """Parse JSON text keeping decimals exact; raise :class:`MalformedResource` on bad JSON."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(f"body of {len(data)} bytes is over the limit of {max_bytes}")
    try:
        return json.loads(data, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedResource(f"not valid JSON: {type(exc).__name__} at position {_pos(exc)}") from None


_FORBIDDEN_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def check_characters(obj: Any, path: str = "") -> None:
    """Refuse control characters FHIR forbids in strings and keys (R4 datatypes.html#string: "Strings SHALL NOT
    contain Unicode character points below 32, except for u0009 (horizontal tab), u0010 (carriage return) and
    u0013 (line feed)"). They would be stored and later break an XML answer or a terminal; the error names the
    element, never the value."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if _FORBIDDEN_CHARS.search(value):
                raise MalformedResource("a string holds a control character FHIR forbids (below U+0020 other than "
                                        "tab, CR and LF)", expression=[where or "(root)"])
        elif isinstance(value, dict):
            for key, item in value.items():
                if _FORBIDDEN_CHARS.search(key):
                    raise MalformedResource("a property name holds a control character", expression=[where])
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _pos(exc: Exception) -> str:
    return str(getattr(exc, "pos", "?"))


def parse_resource(
    data: bytes | str, *, expected_type: str | Iterable[str] | None = None, max_bytes: int | None = None
) -> Resource:
    """Parse a JSON FHIR resource and check its ``resourceType`` (no full model validation)."""
    obj = loads(data, max_bytes=max_bytes)
    return check_resource_type(obj, expected_type)


def check_resource_type(obj: Any, expected_type: str | Iterable[str] | None = None) -> Resource:
    """Return ``obj`` when it is a JSON object with the expected ``resourceType``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        raise MalformedResource("not a FHIR resource: a JSON object with a resourceType is expected")
    if expected_type is not None:
        allowed = {expected_type} if isinstance(expected_type, str) else set(expected_type)
        if obj["resourceType"] not in allowed:
            raise MalformedResource(
                f"resourceType {obj['resourceType']!r} where {' or '.join(sorted(allowed))} was expected",
                expression=["resourceType"],
            )
    return obj


@cache
def _model_class(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError):
        return None


def validate(resource: Resource) -> None:
    """Validate a resource against the base R4 structure (fhir.resources R4B model).

    Raises :class:`MalformedResource` naming the failing elements but never their values.
    """
    rtype = resource.get("resourceType")
    cls = _model_class(str(rtype)) if isinstance(rtype, str) else None
    if cls is None:
        raise MalformedResource(f"unknown resourceType {rtype!r}", expression=["resourceType"])
    try:
        cls.model_validate(_jsonable(resource))
    except ValidationError as exc:
        locs = sorted({".".join(str(p) for p in err["loc"]) or str(rtype) for err in exc.errors()})
        raise MalformedResource(
            f"{rtype} is not valid R4: problem at {', '.join(locs[:5])}", expression=locs[:5]
        ) from None


def _jsonable(obj: Any) -> Any:
    """Turn Decimals into floats/ints for the pydantic models (which reject Decimal in some fields)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Decimal):
        return int(obj) if obj == obj.to_integral_value() and "." not in str(obj) else float(obj)
    return obj


class StreamedText(Protocol):
    """A JSON string value too large to hold in memory (a Binary's base64 ``data``), written in chunks."""

    def iter_chunks(self) -> Iterator[str]:
        """Yield the string's characters, already JSON-safe (base64 needs no escaping)."""
        ...


def dumps(resource: Any, *, canonical: bool = False) -> bytes:
    """Serialise to UTF-8 JSON bytes. ``canonical``: keys sorted, no whitespace (FHIR R4 json.html §2.6.2.6).

    The standard library's C encoder writes exactly what :func:`iterencode` writes for plain JSON values (same
    string escaping, key order and number forms) about ten times faster, and every audit append, store write and
    API answer goes through here; values it cannot write the same way (a Decimal, a :class:`StreamedText`, NaN)
    make it refuse, and :func:`iterencode` writes those.
    """
    try:
        text = _FAST_ENCODERS[canonical].encode(resource)
    except (TypeError, ValueError):
        text = "".join(iterencode(resource, canonical=canonical))
    return text.encode("utf-8")


_FAST_ENCODERS = {
    False: json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": ")),
    True: json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")),
}


def iterencode(obj: Any, *, canonical: bool = False) -> Iterator[str]:
    """Encode JSON in chunks, with exact decimals and :class:`StreamedText` values written as they stream.

    Written by hand because the standard encoder can neither write a Decimal's digits as a JSON number
    nor stream a value without building it; ``canonical`` sorts keys and drops whitespace.
    """
    sep_item, sep_key = (",", ":") if canonical else (", ", ": ")
    if isinstance(obj, dict):
        yield "{"
        items = sorted(obj.items()) if canonical else obj.items()
        first = True
        for key, value in items:
            if not isinstance(key, str):
                raise TypeError("JSON object keys must be strings")
            if not first:
                yield sep_item
            first = False
            yield _ENCODE_STR(key)
            yield sep_key
            yield from iterencode(value, canonical=canonical)
        yield "}"
    elif isinstance(obj, list | tuple):
        yield "["
        for i, value in enumerate(obj):
            if i:
                yield sep_item
            yield from iterencode(value, canonical=canonical)
        yield "]"
    elif isinstance(obj, str):
        yield _ENCODE_STR(obj)
    elif obj is True:
        yield "true"
    elif obj is False:
        yield "false"
    elif obj is None:
        yield "null"
    elif isinstance(obj, int):
        yield int.__repr__(obj)
    elif isinstance(obj, Decimal):
        if not obj.is_finite():
            raise ValueError("NaN and infinity are not JSON")
        yield _decimal_text(obj)
    elif isinstance(obj, float):
        yield float.__repr__(obj)
    elif hasattr(obj, "iter_chunks"):
        yield '"'
        yield from obj.iter_chunks()
        yield '"'
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


_ENCODE_STR = json.JSONEncoder(ensure_ascii=False).encode


def _decimal_text(value: Decimal) -> str:
    text = str(value)
    if "E" in text or "e" in text:  # 2.0E+3 is valid JSON, but keep the plain digits FHIR examples use
        text = format(value, "f")
    return text


def operation_outcome(
    severity: str, issue_type: str, text: str, *, code: str | None = None, expression: list[str] | None = None
) -> Resource:
    """A one-issue OperationOutcome (R4 operationoutcome.html)."""
    issue: Resource = {"severity": severity, "code": issue_type, "diagnostics": text}
    if code:
        issue["details"] = {
            "coding": [{"system": "https://fhir-bridge.dev/fhir/CodeSystem/error", "code": code}],
            "text": text,
        }
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}

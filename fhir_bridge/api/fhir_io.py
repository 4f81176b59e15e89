"""FHIR over HTTP: reading bodies and writing resources (FHIR R4 http.html).

* bodies: ``application/fhir+json`` (or ``application/json``), at most ``max_body_bytes`` (413), parsed
  keeping decimals exact; anything else is 415;
* answers: ``application/fhir+json; charset=utf-8``, ``ETag: W/"<versionId>"`` and ``Last-Modified`` for a
  resource (http.html#versioning), ``_format`` overriding ``Accept`` (http.html#mime-type);
* ``Prefer: return=minimal | representation | OperationOutcome`` on create/update (http.html#ops).
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from starlette.responses import Response

from fhir_bridge.errors import InvalidInput, NotAcceptable, TooLarge, UnsupportedMediaType
from fhir_bridge.resources import FHIR_JSON, Resource, dumps, loads, operation_outcome

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_FORMATS = {"json": FHIR_JSON, "application/json": FHIR_JSON, "application/fhir+json": FHIR_JSON,
            "application/json+fhir": FHIR_JSON}


def negotiate(request: Request) -> str:
    """The answer's media type: ``_format`` first, then ``Accept``; JSON is all we write for now."""
    wanted = request.query_params.get("_format")
    if wanted is not None:
        if wanted.split(";")[0].strip() not in _FORMATS:
            raise NotAcceptable(f"_format {wanted!r} is not supported; use json")
        return FHIR_JSON
    accept = request.headers.get("accept", "")
    if not accept:
        return FHIR_JSON
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in JSON_TYPES or media in ("*/*", "application/*"):
            return FHIR_JSON
    raise NotAcceptable("only application/fhir+json is served")


async def read_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, size-limited while it is read (a lying Content-Length changes nothing)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {content_type or 'none'} is not supported; send "
                                   "application/fhir+json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"request body over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"request body over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return loads(b"".join(chunks))


def fhir_response(request: Request | None, body: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, media_type=f"{FHIR_JSON}; charset=utf-8", headers=headers)


def version_headers(resource: Resource) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {}
    if meta.get("versionId"):
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    if meta.get("lastUpdated"):
        moment = datetime.fromisoformat(str(meta["lastUpdated"]).replace("Z", "+00:00"))
        headers["Last-Modified"] = format_datetime(moment, usegmt=True)
    return headers


def parse_if_match(value: str | None) -> str | None:
    """``W/"3"`` or ``"3"`` → ``3`` (http.html#concurrency)."""
    if value is None:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"') or None


def written(request: Request, resource: Resource, *, status: int, location: str | None) -> Response:
    """The answer to a create/update, honouring ``Prefer: return=…``."""
    headers = version_headers(resource)
    if location:
        headers["Location"] = location
    prefer = request.headers.get("prefer", "")
    if "return=minimal" in prefer:
        return Response(status_code=status, headers=headers)
    if "return=OperationOutcome" in prefer:
        outcome = operation_outcome("information", "informational", "created" if status == 201 else "done")
        return fhir_response(request, outcome, status=status, headers=headers)
    return fhir_response(request, resource, status=status, headers=headers)


def int_param(params: list[tuple[str, str]], name: str, default: int, high: int) -> int:
    """A non-negative integer result parameter (``_count``, ``_offset``), capped at ``high``."""
    values = [v for k, v in params if k == name]
    if not values:
        return default
    if not values[-1].isdigit():
        raise InvalidInput(f"{name} must be a non-negative integer", expression=[name])
    return min(high, int(values[-1]))


def paging(request: Request, params: list[tuple[str, str]]) -> tuple[int, int]:
    """``_count`` (default and cap from settings) and ``_offset`` of a search."""
    settings = request.app.state.settings.api
    return (int_param(params, "_count", settings.page_size, settings.max_page_size),
            int_param(params, "_offset", 0, 10_000_000))


def searchset(base: str, resource_type: str, resources: list[Resource], total: int,
              params: list[tuple[str, str]], count: int, offset: int) -> Resource:
    """A searchset page with self/next/previous links (FHIR R4 http.html#paging, search.html)."""
    kept = [(k, v) for k, v in params if k not in ("_count", "_offset")]

    def link(relation: str, at: int) -> dict[str, str]:
        query = urlencode([*kept, ("_count", str(count)), ("_offset", str(at))])
        return {"relation": relation, "url": f"{base}/{resource_type}?{query}"}

    links = [link("self", offset)]
    if count > 0 and offset + count < total:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(0, offset - count)))
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [{"fullUrl": f"{base}/{resource_type}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                  for r in resources],
    }


async def read_form(request: Request, max_bytes: int, what: str) -> list[tuple[str, str]]:
    """An ``application/x-www-form-urlencoded`` body, size-limited while read.

    Parsed here rather than by Starlette's ``request.form()``, which needs python-multipart."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(f"{what} takes application/x-www-form-urlencoded parameters")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise TooLarge(f"request body over the limit of {max_bytes} bytes")
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput(f"the {what} body is not UTF-8 form encoding") from None

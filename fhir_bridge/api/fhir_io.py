"""FHIR over HTTP: reading bodies and writing resources (FHIR R4 http.html).

* bodies: ``application/fhir+json`` (or ``application/json``), parsed keeping decimals exact, or
  ``application/fhir+xml`` (or ``application/xml``, ``text/xml``), parsed by the hardened parser
  (:mod:`fhir_bridge.fhir.xml_safety`: no DTD, no entity, no network) and converted to the same JSON dict
  (:mod:`fhir_bridge.fhir.xml`); at most ``max_body_bytes`` (413); anything else is 415;
* answers: FHIR JSON or FHIR XML (``application/fhir+xml; charset=utf-8``) as negotiated by :func:`negotiate`,
  ``_format`` overriding ``Accept`` (http.html#mime-type; ``Accept: application/json`` gets FHIR JSON), error
  OperationOutcomes included; ``ETag: W/"<versionId>"`` and ``Last-Modified`` for a resource
  (http.html#versioning);
* ``Prefer: return=minimal | representation | OperationOutcome`` on create/update (http.html#ops);
* where this server is and how much it reads, from its settings: :func:`base_url` (the FHIR base, also the
  access tokens' audience) and :func:`max_body` (the body limit). They live here, below every route module and
  the security layer that needs the base too; the routes take them from :mod:`fhir_bridge.api.deps`.

The streamed case Bundle (``GET /fhir/Bundle/{id}``, possibly gigabytes of base64) is written as JSON while it
streams and has no XML form: asking it in XML is a 406 (:data:`JSON_ONLY_ROUTES`, and the CapabilityStatement
says so).
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from starlette.responses import Response

from fhir_bridge.errors import InvalidInput, MalformedResource, NotAcceptable, TooLarge, UnsupportedMediaType
from fhir_bridge.fhir.resources import FHIR_JSON, FHIR_XML, Resource, check_characters, dumps, loads, operation_outcome
from fhir_bridge.fhir.search_index import SEARCH_PARAMS
from fhir_bridge.fhir.xml import from_xml, to_xml

JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
XML_TYPES = ("application/fhir+xml", "application/xml", "text/xml", "application/xml+fhir")
#: ``_format`` values (http.html#mime-type: the short forms ``json`` and ``xml``, or a media type)
_FORMATS = {"json": FHIR_JSON, "xml": FHIR_XML, **dict.fromkeys(JSON_TYPES, FHIR_JSON),
            **dict.fromkeys(XML_TYPES, FHIR_XML)}
_ANY = ("*/*", "application/*")
#: routes whose answer is streamed as JSON and has no XML form (route path as mounted)
JSON_ONLY_ROUTES = frozenset({"/fhir/Bundle/{resource_id}"})


def _accepted(accept: str) -> list[str]:
    """The media types of an ``Accept`` header, most wanted first (RFC 9110 §12.5.1 q-values; q=0 refuses)."""
    ranked: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if media and weight > 0:
            ranked.append((-weight, i, media.lower()))
    return [media for _, _, media in sorted(ranked)]


def _wanted(request: Request) -> tuple[str | None, str]:
    """``(format or None when nothing we write was asked for, what was asked)``; never raises."""
    wanted = request.query_params.get("_format")
    if wanted is not None:
        # an unencoded "+" in the query arrives as a space (application/fhir xml)
        media = wanted.split(";")[0].strip().lower().replace(" ", "+")
        return _FORMATS.get(media), f"_format {wanted[:80]!r}"
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return FHIR_JSON, "no Accept"
    for media in _accepted(accept):
        if media in _FORMATS:
            return _FORMATS[media], media
        if media in _ANY:
            return FHIR_JSON, media
    return None, f"Accept {accept[:80]!r}"


def answer_format(request: Request | None) -> str:
    """The media type answers to ``request`` are written in, errors included: FHIR JSON unless XML was asked."""
    if request is None:
        return FHIR_JSON
    chosen = getattr(request.state, "fhir_format", None)
    if chosen is None:
        chosen = _wanted(request)[0] or FHIR_JSON
    return str(chosen)


async def negotiate(request: Request) -> str:
    """The answer's media type: ``_format`` first, then ``Accept`` (FHIR R4 http.html#mime-type).

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker thread, a hop
    per request that showed in the API profile (BENCHMARKS.md part 3); the same goes for the routes' others.

    JSON for ``application/fhir+json``, ``application/json``, ``json``, ``*/*`` or no preference; XML for
    ``application/fhir+xml``, ``application/xml``, ``text/xml``, ``xml``. Anything else is a 406 answered in
    JSON; XML on a route that only streams JSON is a 406 answered in XML. The choice is kept on
    ``request.state.fhir_format`` for :func:`answer_format`.
    """
    chosen, asked = _wanted(request)
    if chosen is None:
        raise NotAcceptable(f"{asked} is not supported; use application/fhir+json or application/fhir+xml")
    route = request.scope.get("route")
    if chosen == FHIR_XML and getattr(route, "path", None) in JSON_ONLY_ROUTES:
        raise NotAcceptable("the case Bundle is streamed as application/fhir+json only; ask for JSON")
    request.state.fhir_format = chosen
    return chosen


async def read_body(request: Request, max_bytes: int) -> Any:
    """The request's body as FHIR JSON, from a JSON or an XML body, size-limited while it is read.

    A lying Content-Length changes nothing; XML goes through the hardened parser (FHIR R4 xml.html, issue 6:
    a DTD or an entity declaration is refused, 400, before anything is expanded, fetched or stored).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_TYPES and content_type not in XML_TYPES:
        raise UnsupportedMediaType(f"Content-Type {content_type[:80] or 'none'} is not supported; send "
                                   "application/fhir+json or application/fhir+xml")
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"request body over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"request body over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = from_xml(b"".join(chunks), max_bytes=max_bytes) if content_type in XML_TYPES else loads(b"".join(chunks))
    check_characters(body)
    return body


def fhir_response(request: Request | None, body: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    """A resource answer in the negotiated format (:func:`answer_format`), errors included."""
    if answer_format(request) == FHIR_XML:
        try:
            xml = to_xml(body)
        except MalformedResource as exc:  # our own data with no XML form: the server's limit, not a bad request
            if status < 400:
                raise NotAcceptable(f"this answer has no FHIR XML form ({exc.message}); ask for "
                                    "application/fhir+json", expression=exc.expression) from None
            # an error answer must get out whatever it carries (an error handler can not raise): in JSON
        else:
            return Response(xml, status_code=status, media_type=f"{FHIR_XML}; charset=utf-8", headers=headers)
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


def base_url(request: Request) -> str:
    """The FHIR base of this server as its clients name it (``api.public_base_url``, else the request's) + ``/fhir``."""
    configured: str = request.app.state.settings.api.public_base_url
    return (configured.rstrip("/") if configured else str(request.base_url).rstrip("/")) + "/fhir"


def max_body(request: Request) -> int:
    """The largest request body read (``api.max_body_bytes``); a larger one is 413."""
    return int(request.app.state.settings.api.max_body_bytes)


def int_param(params: list[tuple[str, str]], name: str, default: int, high: int) -> int:
    """A non-negative integer result parameter (``_count``, ``_offset``), capped at ``high``."""
    values = [v for k, v in params if k == name]
    if not values:
        return default
    if not (values[-1].isascii() and values[-1].isdigit()):
        raise InvalidInput(f"{name} must be a non-negative integer", expression=[name])
    return min(high, int(values[-1]))


def paging(request: Request, params: list[tuple[str, str]]) -> tuple[int, int]:
    """``_count`` (default and cap from settings) and ``_offset`` of a search."""
    settings = request.app.state.settings.api
    return (int_param(params, "_count", settings.page_size, settings.max_page_size),
            int_param(params, "_offset", 0, 10_000_000))


def searchset(base: str, resource_type: str, resources: list[Resource], total: int,
              params: list[tuple[str, str]], count: int, offset: int) -> Resource:
    """A searchset page with self/next/previous links (FHIR R4 http.html#paging, search.html).

    The links carry only the parameters the search applied (search.html#errors: the self link tells the client
    which criteria were used): unknown criteria were refused (400), but other ``_`` parameters (``_id``,
    ``_sort``…) are ignored, so they are left out; ``_format`` and the type's declared ``_lastUpdated`` stay."""
    applied = {"_format", *(n for n in SEARCH_PARAMS.get(resource_type, {}) if n.startswith("_"))}
    kept = [(k, v) for k, v in params if not k.startswith("_") or k in applied]

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

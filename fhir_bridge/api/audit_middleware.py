"""One AuditEvent per inbound call, stored before the answer leaves: fail closed (issue 7, STANDARDS.md §7).

A pure ASGI middleware around every ``/fhir`` call (and ``/auth/*`` once the security layer serves it;
``/healthz``, ``/readyz`` and ``/metrics`` are not audited). It lets the handler produce its answer, holds the
answer's first message back, builds a BALP RESTful event (``fhir_bridge.audit.events.rest_event``) and appends it to
the audit log (``app.state.audit``); only then does the answer go out. When the append fails
(:class:`~fhir_bridge.errors.AuditUnavailable`, or anything else going wrong while recording), the client
gets ``503`` and an OperationOutcome instead of the answer: no audit, no exchange.

What the event says and where it comes from:

* **interaction** from the method and the path's shape (``GET T/id`` read, ``GET T/id/_history/v`` vread,
  ``GET T/id/_history`` history-instance, ``GET T`` and ``POST T/_search`` search-type, ``POST T`` create,
  ``PUT T/id`` update, ``$name`` operation, ``GET metadata`` capabilities), so calls that match no route
  (a 404, a 405) are recorded too;
* **resource** id and version: ``request.state.audit_resource = (type, id, version)`` when the handler set
  it, else the answer (the resource in the body, the ``Location`` and ``ETag`` headers), else the path;
* **patient**: ``request.state.audit_patient`` when the handler set it (the streamed Bundle read does), else
  the answered resource's own (``Task.for.identifier``, ``subject.identifier``, an AuditEvent's patient
  entity; a history's first version), else for a search the one patient it names
  (``subject:identifier``, ``patient``);
* **query** of a search: the raw request, method, path and query string and, for ``POST _search``, the
  form body (BALP: what was asked, exactly, malicious patterns included), stored base64;
* **client**: :func:`client_party`, the one seam for the security layer (``request.state.client_id`` and
  ``request.state.jti``; ``anonymous`` until then) with the peer address;
* **X-Request-Id**: the client's (visible ASCII, at most 200 characters) or a new UUID, echoed in the
  answer's ``X-Request-Id`` header, recorded as BALP's XrequestId entity and passed to the outbound calls the
  request makes (``fhir_bridge.audit.context``).

A streamed answer (the case Bundle) is recorded when its first part is ready and before any of it is sent;
its status is then final. An exception no handler turned into an answer is recorded as a 500.

A write refused by the audit (fail closed on a create, an update or an operation): the write has happened and
**stands**; only its answer is replaced by the 503. The client is told to retry, and a retry is safe: a create
retried with the same ``If-None-Exist`` finds the stored resource and creates nothing (200), an update
retried with ``If-Match`` on the old version gets 412 and re-reads, the Task operations are idempotent per
state. Undoing the write instead would need a second write to the same Redis that has just failed us.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_bridge.audit import context as audit_context
from fhir_bridge.audit.events import OBJECT_ROLE, Party, rest_event
from fhir_bridge.errors import AuditUnavailable, BridgeError
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import FHIR_JSON, dumps, operation_outcome
from fhir_bridge.fhir.xml import from_xml

log = structlog.get_logger("fhir_bridge.audit")

REQUEST_ID_HEADER = "X-Request-Id"
ANONYMOUS = "anonymous"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")
_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PEEK_BYTES = 4 * 1024 * 1024  # answers bigger than this are not parsed for their patient (searches are not)
_SEARCH_BODY_BYTES = 64 * 1024  # the part of a POST _search form body kept for entity.query
_REST_BY_METHOD = {"GET": "read", "HEAD": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
_TYPE_BY_METHOD = {"GET": "search-type", "HEAD": "search-type", "POST": "create", "PUT": "update",
                   "PATCH": "patch", "DELETE": "delete"}  # fmt: skip
_PATIENT_SEARCH_PARAMS = ("subject:identifier", "patient", "patient:identifier")


def audited(path: str) -> bool:
    return path == "/fhir" or path.startswith(("/fhir/", "/auth/"))


def client_party(request: Request) -> Party:
    """The client of an inbound call as an AuditEvent agent: the one seam for the security layer.

    Until authentication exists every client is ``anonymous``; a security layer that has checked a token sets
    ``request.state.client_id`` (the OAuth client id) and ``request.state.jti`` (the token's id) and they are
    recorded (BALP: the client id as ``agent.who``, the jti in ``agent.policy``). The address is the peer's.
    """
    state = request.state
    client_id = getattr(state, "client_id", None)
    jti = getattr(state, "jti", None)
    return Party(str(client_id) if client_id else ANONYMOUS, address=request.client.host if request.client else None,
                 jti=str(jti) if jti else None)  # fmt: skip


def refusal(request_id: str | None) -> tuple[int, dict[str, str], bytes]:
    """The 503 that replaces an answer the audit log could not record (status, headers, body)."""
    body = dumps(operation_outcome(
        "error", "transient",
        "the audit trail is unavailable, so the exchange was refused; retry later. A write this request made "
        "stands: retry it with the same If-None-Exist or If-Match, which is safe",
        code=AuditUnavailable.code,
    ))  # fmt: skip
    headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Retry-After": "5"}
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return 503, headers, body


class AuditMiddleware:
    """See the module docstring. Records into ``app.state.audit`` (no log there: nothing is recorded, as in
    unit tests of the routes), the bridge agent is ``app.state.audit_bridge``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not audited(scope["path"]):
            await self.app(scope, receive, send)
            return
        call = _Call(scope, send)
        if scope["method"] == "POST" and scope["path"].endswith("/_search"):
            receive = call.tee(receive)
        with audit_context.bound(request_id=call.request_id):
            try:
                await self.app(scope, receive, call.send)
            except _Refused:
                return  # a streamed answer refused by the audit: its 503 is out, the rest is dropped
            except Exception:
                if not call.decided:
                    await call.record_crash()
                raise


class _Refused(Exception):
    pass


class _Call:
    """One inbound call on its way out."""

    def __init__(self, scope: Scope, send: Send) -> None:
        self.scope = scope
        self._send = send
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        self.request_id = given if given and _REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = self.request_id
        self.search_body = bytearray()
        self.start: Message | None = None
        self.decided = False  # the answer (or its refusal) has started to go out
        self.refused = False

    def tee(self, receive: Receive) -> Receive:
        async def tee_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(self.search_body) < _SEARCH_BODY_BYTES:
                self.search_body += message.get("body", b"")[: _SEARCH_BODY_BYTES - len(self.search_body)]
            return message

        return tee_receive

    async def send(self, message: Message) -> None:
        if self.refused:
            if message["type"] == "http.response.body" and message.get("more_body", False):
                raise _Refused  # stop the streamed answer nobody will get
            return
        if message["type"] == "http.response.start" and not self.decided:
            self.start = message  # held until the body says whether the answer is complete
            return
        if message["type"] == "http.response.body" and not self.decided and self.start is not None:
            self.decided = True
            complete = not message.get("more_body", False)
            try:
                await self._record(self.start, message.get("body", b"") if complete else None)
            except Exception as exc:
                if not isinstance(exc, AuditUnavailable):
                    log.error("audit.record_failed", error=type(exc).__name__, path=self.scope["path"])
                self.refused = True
                await self._refuse()
                if message.get("more_body", False):
                    raise _Refused from None
                return
            headers = MutableHeaders(scope=self.start)
            headers[REQUEST_ID_HEADER] = self.request_id
            await self._send(self.start)
        await self._send(message)

    async def _refuse(self) -> None:
        status, headers, body = refusal(self.request_id)
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": body})

    async def record_crash(self) -> None:
        """An exception escaped every handler: the server answers 500; record that (best effort)."""
        self.decided = True
        try:
            await self._record({"type": "http.response.start", "status": 500, "headers": []}, None)
        except Exception as exc:
            log.error("audit.record_failed", error=type(exc).__name__, path=self.scope["path"])

    async def _record(self, start: Message, body: bytes | None) -> None:
        app = self.scope.get("app")
        audit = getattr(getattr(app, "state", None), "audit", None)
        if audit is None:
            return
        request = Request(self.scope)
        event = build_event(request, start["status"], Headers(raw=start["headers"]), body, bytes(self.search_body),
                            self.request_id, _server_party(request))  # fmt: skip
        await audit.append(event)


def _server_party(request: Request) -> Party:
    bridge: Party = getattr(request.app.state, "audit_bridge", None) or Party("fhir-bridge", name="fhir-bridge")
    settings = getattr(request.app.state, "settings", None)
    configured = settings.api.public_base_url.rstrip("/") if settings is not None else ""
    base = configured or str(request.base_url).rstrip("/")
    return Party(bridge.id, system=bridge.system, address=f"{base}/fhir", name=bridge.name)


def describe(method: str, path: str) -> tuple[str, str, str | None, str | None, str | None]:
    """``(interaction, resource type, id, version, operation)`` of a call, from its method and path alone."""
    if not path.startswith("/fhir"):  # /auth/*: the security layer's endpoints, recorded as operations
        return "operation", "Resource", None, None, path[:200]
    parts = [p for p in path[len("/fhir"):].split("/") if p]
    if not parts:
        return ("search-system" if method in ("GET", "HEAD") else "transaction"), "Bundle", None, None, None
    if parts == ["metadata"]:
        return "capabilities", "CapabilityStatement", None, None, None
    rtype = parts[0] if _TYPE.fullmatch(parts[0]) else "Resource"
    rest = parts[1:]

    def ident(text: str) -> str | None:
        return text if _ID.fullmatch(text) else None

    if not rest:
        interaction = _TYPE_BY_METHOD.get(method)
        return (interaction, rtype, None, None, None) if interaction else ("operation", rtype, None, None, method)
    if rest == ["_search"]:
        return "search-type", rtype, None, None, None
    if rest == ["_history"]:
        return "history-type", rtype, None, None, None
    if len(rest) == 1 and rest[0].startswith("$"):
        return "operation", rtype, None, None, rest[0][:100]
    if len(rest) == 1:
        interaction = _REST_BY_METHOD.get(method)
        if interaction:
            return interaction, rtype, ident(rest[0]), None, None
        return "operation", rtype, ident(rest[0]), None, method
    if len(rest) == 2 and rest[1] == "_history":
        return "history-instance", rtype, ident(rest[0]), None, None
    if len(rest) == 3 and rest[1] == "_history":
        return "vread", rtype, ident(rest[0]), ident(rest[2]), None
    if len(rest) == 2 and rest[1].startswith("$"):
        return "operation", rtype, ident(rest[0]), None, rest[1][:100]
    return "operation", rtype, None, None, f"{method} {path}"[:200]


def build_event(request: Request, status: int, headers: Headers, body: bytes | None, search_body: bytes,
                request_id: str, server: Party) -> dict[str, Any]:
    """The AuditEvent of one answered call (see the module docstring for where each part comes from)."""
    method = request.method
    interaction, rtype, resource_id, version, operation = describe(method, request.url.path)
    state = request.state
    searching = interaction in ("search-type", "search-system")
    answer = _peek(headers, body) if status >= 400 or not searching else None  # a searchset is not needed
    hinted = getattr(state, "audit_resource", None)
    if hinted is not None:
        rtype, resource_id, version = hinted[0], hinted[1] or resource_id, hinted[2] or version
    elif isinstance(answer, dict) and answer.get("resourceType") == rtype and isinstance(answer.get("id"), str):
        resource_id, version = answer["id"], (answer.get("meta") or {}).get("versionId") or version
    if resource_id is None or (version is None and status < 400):
        located = _from_location(headers.get("location"), rtype)
        resource_id, version = resource_id or located[0], version or located[1]
    if version is None and resource_id and status < 400 and interaction not in ("history-instance", "operation"):
        version = _from_etag(headers.get("etag"))
    patient = getattr(state, "audit_patient", None)
    if patient is None and isinstance(answer, dict):
        patient = resource_patient(answer)
    query: bytes | None = None
    if interaction.startswith("search"):
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        qs = request.scope.get("query_string") or b""
        query = method.encode() + b" " + raw_path + (b"?" + qs if qs else b"") + (b"\n\n" + search_body
                                                                                   if search_body else b"")
        if patient is None:
            patient = _searched_patient([*parse_qsl(qs.decode("latin-1")), *parse_qsl(search_body.decode("latin-1"))])
    return rest_event(interaction=interaction, resource_type=rtype, status=status, client=client_party(request),
                      bridge=server, resource_id=resource_id, version_id=version,
                      patient=patient if isinstance(patient, PatientIdentifier) else None, query=query,
                      operation=operation, request_id=request_id,
                      outcome_desc=_problem(answer) if status >= 400 else None)  # fmt: skip


def resource_patient(resource: Mapping[str, Any]) -> PatientIdentifier | None:
    """The patient a resource the bridge serves is about, by identifier."""
    rtype = resource.get("resourceType")
    identifier: Any = None
    if rtype == "Task":
        identifier = (resource.get("for") or {}).get("identifier")
    elif rtype in ("ServiceRequest", "DiagnosticReport"):
        identifier = (resource.get("subject") or {}).get("identifier")
    elif rtype == "AuditEvent":
        for entity in resource.get("entity") or []:
            role = entity.get("role") or {}
            if role.get("system") == OBJECT_ROLE and role.get("code") == "1":
                identifier = (entity.get("what") or {}).get("identifier")
                break
    elif rtype == "Bundle" and resource.get("type") == "history":
        first = next(iter(resource.get("entry") or []), None)
        return resource_patient(first.get("resource") or {}) if isinstance(first, dict) else None
    return PatientIdentifier.from_element(identifier)


def _searched_patient(params: list[tuple[str, str]]) -> PatientIdentifier | None:
    values = [v for k, v in params if k in _PATIENT_SEARCH_PARAMS]
    if len(values) != 1 or "," in values[0]:
        return None  # none, or several: the search is not about one patient
    system, _, value = values[0].partition("|")
    return PatientIdentifier(system, value) if system and value else None


def _peek(headers: Headers, body: bytes | None) -> Any:
    content_type = headers.get("content-type", "")
    if not body or len(body) > _PEEK_BYTES or ("json" not in content_type and "xml" not in content_type):
        return None
    try:  # an answer in FHIR XML (fhir_bridge.api.fhir_io) is read back to the same JSON
        return from_xml(body, max_bytes=_PEEK_BYTES) if "xml" in content_type else json.loads(body)
    except (ValueError, BridgeError):
        return None


def _from_location(location: str | None, rtype: str) -> tuple[str | None, str | None]:
    """``…/T/id/_history/v`` (FHIR R4 http.html#create) → (id, v)."""
    if not location:
        return None, None
    parts = location.split("?")[0].rstrip("/").split("/")
    for i in range(len(parts) - 1):
        if parts[i] == rtype and _ID.fullmatch(parts[i + 1]):
            version = parts[i + 3] if len(parts) > i + 3 and parts[i + 2] == "_history" else None
            return parts[i + 1], version if version and _ID.fullmatch(version) else None
    return None, None


def _from_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    value = etag.strip().removeprefix("W/").strip('"')
    return value if _ID.fullmatch(value) else None


def _problem(answer: Any) -> str | None:
    """The first issue of an OperationOutcome answer (our messages never carry patient data)."""
    if not isinstance(answer, dict) or answer.get("resourceType") != "OperationOutcome":
        return None
    for issue in answer.get("issue") or []:
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if isinstance(text, str) and text:
            return text[:300]
    return None

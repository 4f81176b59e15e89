"""The one place where errors become HTTP: error class → status, error → OperationOutcome.

FHIR R4 http.html §3.1.0.4 and operationoutcome.html: every error answer carries an OperationOutcome.
Routes never build error bodies; they raise from :mod:`fhir_bridge.errors` and this module answers, in the
format the client negotiated (:func:`fhir_bridge.api.fhir_io.fhir_response`: FHIR XML when ``_format`` or
``Accept`` asked for it, even on a 404 of an unknown endpoint; JSON when the negotiation itself failed).
Unexpected exceptions answer 500 with a generic text (the detail goes to the log, without patient data).
"""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from fhir_bridge import errors as e
from fhir_bridge.adapters.auth import OAuthError, oauth_error_body
from fhir_bridge.api.fhir_io import fhir_response
from fhir_bridge.fhir.resources import operation_outcome

log = structlog.get_logger("fhir_bridge.api")

#: most specific first: the first class an error is an instance of decides its status
STATUS: list[tuple[type[e.BridgeError], int]] = [
    (e.TooLarge, 413),
    (e.UnsupportedMediaType, 415),
    (e.NotAcceptable, 406),
    (e.InvalidInput, 400),
    (e.Gone, 410),
    (e.NotFound, 404),
    (e.PreconditionFailed, 412),
    (e.Conflict, 409),
    (e.AmbiguousPatient, 422),
    (e.BusinessRuleViolation, 422),
    (e.Unauthenticated, 401),
    (e.Forbidden, 403),
    (e.Unsupported, 501),
    (e.SourceUnavailable, 503),
    (e.DeliveryFailed, 503),
    (e.SourceError, 502),
]

_HTTP_ISSUE = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 413: "too-long", 415: "not-supported", 422: "invalid"}


def status_for(error: e.BridgeError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OAuthError)
    async def oauth_error(request: Request, exc: OAuthError) -> Response:
        # the token endpoint speaks OAuth 2.0, not FHIR: RFC 6749 §5.2 JSON, 401 only for invalid_client
        status = 401 if exc.code == "invalid_client" else 400
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        return JSONResponse(oauth_error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(e.BridgeError)
    async def bridge_error(request: Request, exc: e.BridgeError) -> Response:
        status = status_for(exc)
        body = operation_outcome("error", exc.issue_type, exc.message, code=exc.code, expression=exc.expression)
        headers = _challenge(exc, status)
        return fhir_response(request, body, status=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        where = sorted({".".join(str(p) for p in err.get("loc", ())) for err in exc.errors()})
        body = operation_outcome("error", "invalid", f"invalid request: {', '.join(where)}", code="invalid-input")
        return fhir_response(request, body, status=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        text = {404: "no such FHIR endpoint", 405: "method not allowed on this endpoint"}.get(
            exc.status_code, str(exc.detail))
        body = operation_outcome("error", _HTTP_ISSUE.get(exc.status_code, "exception"), text)
        return fhir_response(request, body, status=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("api.unexpected", error=type(exc).__name__, path=request.url.path)
        body = operation_outcome("fatal", "exception", "internal error; the request was not completed")
        return fhir_response(request, body, status=500)


def _challenge(exc: e.BridgeError, status: int) -> dict[str, str] | None:
    """RFC 6750 §3: the ``WWW-Authenticate`` of a refused bearer token (no error code when none was sent)."""
    if status == 401:
        code = getattr(exc, "code", "")
        return {"WWW-Authenticate": 'Bearer realm="fhir-bridge"'
                + (', error="invalid_token"' if code == "invalid_token" else "")}
    if isinstance(exc, e.InsufficientScope):
        return {"WWW-Authenticate": 'Bearer realm="fhir-bridge", error="insufficient_scope"'}
    return None

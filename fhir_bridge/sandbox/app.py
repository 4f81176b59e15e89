"""The sandbox as an ASGI app: configuration, state, faults, request log, and the one error edge.

The whole stack, outside in::

    FaultsAndLog (only /fhir: latency, injected 503/429, request log)
      └── FastAPI: /fhir routes (routes.py), /_sandbox test hooks, /healthz
            └── error edge: BridgeError / HTTP errors → OperationOutcome + status

Faults are drawn from a ``random.Random`` seeded with the world seed, so a client sending the same requests
in the same order meets the same faults. Test hooks and ``/healthz`` never fail and are never logged.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_bridge import errors
from fhir_bridge.fhir.resources import Resource, operation_outcome
from fhir_bridge.sandbox.routes import router
from fhir_bridge.sandbox.state import FhirResponse, SandboxConfig, SandboxState, StateDep
from fhir_bridge.sandbox.world import build_world, world_summary

__all__ = ["SandboxConfig", "create_app"]

# -- the error edge: the one place where errors become statuses ------------------------------------------

_STATUS: list[tuple[type[errors.BridgeError], int]] = [
    (errors.TooLarge, 413),
    (errors.InvalidInput, 400),
    (errors.Gone, 410),
    (errors.NotFound, 404),
    (errors.PreconditionFailed, 412),
    (errors.Conflict, 409),
    (errors.BusinessRuleViolation, 422),
    (errors.UnsupportedMediaType, 415),
    (errors.NotAcceptable, 406),
    (errors.Unsupported, 400),
    (errors.Forbidden, 403),
    (errors.Unauthenticated, 401),
]


def outcome_response(status: int, issue_type: str, text: str, *, code: str | None = None,
                     expression: list[str] | None = None, headers: dict[str, str] | None = None,
                     severity: str = "error") -> FhirResponse:
    body = operation_outcome(severity, issue_type, text, code=code, expression=expression)
    return FhirResponse(body, status_code=status, headers=headers)


async def _bridge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.BridgeError)
    status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
    return outcome_response(status, exc.issue_type, exc.message, code=exc.code, expression=exc.expression)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    issue = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "exception")
    text = "no such FHIR resource or route" if exc.status_code == 404 else str(exc.detail)
    return outcome_response(exc.status_code, issue, text, headers=dict(exc.headers or {}))


async def _validation_error(request: Request, exc: Exception) -> Response:
    return outcome_response(400, "invalid", "the request is malformed")


async def _unexpected(request: Request, exc: Exception) -> Response:
    return outcome_response(500, "exception", f"sandbox error: {type(exc).__name__}", severity="fatal")


# -- faults and request log ---------------------------------------------------------------------------


class FaultsAndLog:
    """ASGI middleware for ``/fhir``: added latency, injected 503/429 with ``Retry-After``, request log.

    Pure ASGI (not BaseHTTPMiddleware) so streamed attachments pass through untouched.
    """

    def __init__(self, app: ASGIApp, state: SandboxState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope["path"]).startswith("/fhir"):
            await self.app(scope, receive, send)
            return
        config, rng = self.state.config, self.state.rng
        started, status = time.perf_counter(), 500
        record: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "query": bytes(scope.get("query_string", b"")).decode("latin-1"),
            "time": datetime.now(UTC).isoformat(),
            "fault": False,
        }
        try:
            if config.latency_ms:
                await asyncio.sleep(config.latency_ms / 1000)
            if config.fault_rate and rng.random() < config.fault_rate:
                status = rng.choice((503, 429))
                record["fault"] = True
                retry_after = rng.choice(("0", "1"))
                issue = "transient" if status == 503 else "throttled"
                response = outcome_response(status, issue, "injected fault: try again later",
                                            headers={"Retry-After": retry_after})
                await response(scope, receive, send)
                return

            async def send_and_note(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            await self.app(scope, receive, send_and_note)
        finally:
            record["status"] = status
            record["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            self.state.requests.append(record)


# -- the app ------------------------------------------------------------------------------------------


def create_app(config: SandboxConfig) -> FastAPI:
    """Build the world for ``config`` and the app serving it."""
    today = config.today if config.today is not None else datetime.now(UTC).date()
    world = build_world(config.seed, config.patients, big_docs=config.big_docs,
                        big_total_bytes=config.big_total_bytes, corrupt_patients=config.corrupt_patients,
                        today=today, incomplete=config.incomplete,
                        archive_studies=config.archive_studies)
    state = SandboxState(config=config, world=world, rng=random.Random(f"fhir-bridge-sandbox-faults:{config.seed}"))
    app = FastAPI(title="fhir-bridge sandbox", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.sandbox = state
    app.include_router(router)
    app.add_exception_handler(errors.BridgeError, _bridge_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/_sandbox/requests", include_in_schema=False)
    async def requests_log(state: StateDep) -> JSONResponse:
        return JSONResponse(list(state.requests))

    @app.delete("/_sandbox/requests", include_in_schema=False, status_code=204)
    async def clear_requests(state: StateDep) -> Response:
        state.requests.clear()
        return Response(status_code=204)

    @app.get("/_sandbox/world", include_in_schema=False)
    async def world_expectations(state: StateDep) -> JSONResponse:
        summary: Resource = world_summary(state.world, faults=state.config.corrupt)
        summary["config"] = {"seed": config.seed, "patients": config.patients, "page_cap": config.page_cap,
                             "corrupt": config.corrupt, "fault_rate": config.fault_rate,
                             "today": state.world.today.isoformat(), "incomplete": list(config.incomplete)}
        return JSONResponse(summary)

    app.add_middleware(FaultsAndLog, state=state)
    return app

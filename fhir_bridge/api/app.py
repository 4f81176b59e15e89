"""The FastAPI application factory: the whole stack in a few lines.

Built inside the composition root (``fhir_bridge.main``) or a test, never at import. The app gets its
collaborators as arguments and keeps them on ``app.state``. Every ``/fhir`` call is audited on its way out
(:mod:`fhir_bridge.api.audit_middleware`) into ``app.state.audit`` when there is one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api import audit_page, audit_routes, auth_routes  # noqa: F401  (audit_routes mounts the AuditEvent routes)
from fhir_bridge.api.audit_middleware import REQUEST_ID_HEADER, AuditMiddleware, refusal
from fhir_bridge.api.errors import install_error_handlers
from fhir_bridge.api.metrics import router as metrics_router
from fhir_bridge.api.operations import router  # routes plus the Task operations
from fhir_bridge.audit.events import Party
from fhir_bridge.errors import AuditUnavailable
from fhir_bridge.fhir.profiles import Profiles
from fhir_bridge.ports import AuditPort
from fhir_bridge.workflow.cases import CaseService

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(settings: Settings, cases: CaseService | None, *, lifespan: Lifespan | None = None,
               ready: Callable[[], Any] | None = None, audit: AuditPort | None = None,
               audit_bridge: Party | None = None, profiles: Profiles) -> FastAPI:
    @asynccontextmanager
    async def no_lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="fhir-bridge", version="0.1.0", lifespan=lifespan or no_lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.cases = cases
    app.state.audit = audit  # the lifespan of fhir_bridge.main sets the runtime's
    app.state.audit_bridge = audit_bridge
    app.state.profiles = profiles  # the CapabilityStatement's (profiles_dir, from the settings)
    install_error_handlers(app)

    @app.exception_handler(AuditUnavailable)
    async def audit_unavailable(request: Request, exc: AuditUnavailable) -> Response:
        # raised inside a handler (an outbound call or a case change could not be audited): refused the same way
        status, headers, body = refusal(getattr(request.state, "request_id", None) or
                                        request.headers.get(REQUEST_ID_HEADER))  # fmt: skip
        return Response(body, status_code=status, headers=headers)

    app.add_middleware(AuditMiddleware)
    app.include_router(router)
    app.include_router(metrics_router)
    app.include_router(audit_page.router)
    app.include_router(auth_routes.router)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Response:
        if ready is not None:
            try:
                await ready()
            except Exception as exc:  # readiness reports, it does not raise
                return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    return app

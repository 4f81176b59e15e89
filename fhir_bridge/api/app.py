"""The FastAPI application factory: the whole stack in a few lines.

Built inside the composition root (``fhir_bridge.main``) or a test, never at import. The app gets its
collaborators as arguments and keeps them on ``app.state``. Every ``/fhir`` call is audited on its way out
(:mod:`fhir_bridge.api.audit_middleware`) into ``app.state.audit`` when there is one.

Each module of routes has its own router and :func:`create_app` mounts each one here; nothing is registered by
importing a module. The FHIR surface is :data:`FHIR_ROUTERS`, in the order its routes are matched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response

from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api import audit_page, audit_routes, auth_routes, metrics, operations, routes
from fhir_bridge.api.audit_middleware import REQUEST_ID_HEADER, AuditMiddleware, refusal
from fhir_bridge.api.errors import install_error_handlers
from fhir_bridge.audit.events import Party
from fhir_bridge.errors import AuditUnavailable
from fhir_bridge.fhir.profiles import Profiles
from fhir_bridge.ports import AuditPort
from fhir_bridge.workflow.bridge import Bridge

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

#: The FHIR REST surface (base ``/fhir``), one router per module, in the order their routes are matched: the
#: reads, searches and writes; the AuditEvent routes (``$verify`` before the read's ``{resource_id}``); the Task
#: operations (``Task/{id}/$name``). The CapabilityStatement test and the audit walk take the routes from here.
FHIR_ROUTERS: tuple[APIRouter, ...] = (routes.router, audit_routes.router, operations.router)


def create_app(settings: Settings, bridge: Bridge | None, *, lifespan: Lifespan | None = None,
               ready: Callable[[], Any] | None = None, audit: AuditPort | None = None,
               audit_bridge: Party | None = None, profiles: Profiles) -> FastAPI:
    @asynccontextmanager
    async def no_lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="fhir-bridge", version="0.1.0", lifespan=lifespan or no_lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.bridge = bridge  # the use cases; the lifespan of fhir_bridge.main sets the runtime's
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
    for fhir in FHIR_ROUTERS:
        app.include_router(fhir)
    app.include_router(metrics.router)  # /metrics
    app.include_router(audit_page.router)  # /audit, the auditor's page
    app.include_router(auth_routes.router)  # /auth/token, /auth/jwks, /fhir/.well-known/smart-configuration

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

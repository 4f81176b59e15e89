"""The FastAPI application factory: the whole stack in a few lines.

Built inside the composition root (``fhir_bridge.main``) or a test, never at import. The app gets its
collaborators as arguments and keeps them on ``app.state``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api.errors import install_error_handlers
from fhir_bridge.api.metrics import router as metrics_router
from fhir_bridge.api.operations import router  # routes plus the Task operations
from fhir_bridge.workflow.cases import CaseService

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(settings: Settings, cases: CaseService | None, *, lifespan: Lifespan | None = None,
               ready: Callable[[], Any] | None = None) -> FastAPI:
    @asynccontextmanager
    async def no_lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(title="fhir-bridge", version="0.1.0", lifespan=lifespan or no_lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.cases = cases
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(metrics_router)

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

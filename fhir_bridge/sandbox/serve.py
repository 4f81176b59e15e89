"""Run the sandbox over real HTTP (``fhir-bridge sandbox`` calls :func:`run`)."""

from __future__ import annotations

import uvicorn

from fhir_bridge.sandbox.app import SandboxConfig, create_app


def run(config: SandboxConfig, host: str, port: int) -> None:
    """Serve the sandbox with uvicorn until interrupted; blocks. Logs only warnings and errors."""
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")

"""Run the sandbox over real HTTP (``fhir-bridge sandbox`` calls :func:`run`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import uvicorn

from fhir_bridge.sandbox.app import SandboxConfig, create_app


def run(config: SandboxConfig, host: str, port: int, *, clients_file: Path | None = None,
        tls: dict[str, Any] | None = None) -> None:
    """Serve the sandbox with uvicorn until interrupted; blocks. Logs only warnings and errors.

    ``clients_file``: require SMART Backend Services tokens of these clients (:mod:`fhir_bridge.sandbox.auth`);
    ``tls``: uvicorn's TLS options (:func:`fhir_bridge.adapters.tls.uvicorn_tls_options`), client certificates
    included.
    """
    app = create_app(config)
    if clients_file is not None:
        from fhir_bridge.sandbox.auth import require_tokens

        require_tokens(app, clients_file)
    uvicorn.run(app, host=host, port=port, log_level="warning", **(tls or {}))

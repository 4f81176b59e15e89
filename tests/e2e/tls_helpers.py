"""End-to-end helpers for TLS children: start ``fhir-bridge serve`` or ``sandbox`` over HTTPS on a free port and
wait for it with a client that trusts the development CA (and presents a certificate when mutual TLS needs one).

``tests/e2e/conftest.py``'s ``start_on_free_port`` waits over plain HTTP, which a TLS server never answers.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from fhir_bridge.adapters.dev_certs import CertAndKey, DevCertificates
from fhir_bridge.adapters.tls import client_ssl_context
from fhir_bridge.dev.processes import Child, ProcessGroup, free_port


def tls_context(certs: DevCertificates, client: CertAndKey | None = None) -> Any:
    """Trust the development CA; present ``client`` when given."""
    return client_ssl_context(str(certs.ca.cert), str(client.cert) if client else "", str(client.key) if client else "")


def server_env(certs: DevCertificates, mode: str) -> dict[str, str]:
    """The environment that makes ``fhir-bridge serve`` speak HTTPS with client certificates ``mode``."""
    return {"FHIR_BRIDGE_API__TLS_CERT": str(certs.server.cert), "FHIR_BRIDGE_API__TLS_KEY": str(certs.server.key),
            "FHIR_BRIDGE_API__TLS_CLIENT_CA": str(certs.ca.cert), "FHIR_BRIDGE_API__TLS_CLIENT_CERT": mode}


def start_tls(group: ProcessGroup, name: str, args: Sequence[str], health_path: str, certs: DevCertificates | None,
              client: CertAndKey | None = None, extra_env: Mapping[str, str] | None = None,
              timeout: float = 30.0) -> int:
    """Start ``python -m fhir_bridge *args --port P`` (``{port}`` in ``args`` is replaced by P) and wait until
    ``https://127.0.0.1:P<health_path>`` answers 200 (``http://`` when ``certs`` is None); another port is tried
    if P was taken meanwhile."""
    scheme, context = ("https", tls_context(certs, client)) if certs is not None else ("http", True)
    for attempt in range(3):
        port = free_port()
        child = group.start(name, [*(a.replace("{port}", str(port)) for a in args), "--port", str(port)],
                            extra_env=extra_env)
        try:
            _wait_healthy(child, f"{scheme}://127.0.0.1:{port}{health_path}", context, timeout)
            return port
        except RuntimeError:
            group.stop(child)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _wait_healthy(child: Child, url: str, context: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            if httpx.get(url, verify=context, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} was not healthy within {timeout:g} s:\n{child.log_tail()}")

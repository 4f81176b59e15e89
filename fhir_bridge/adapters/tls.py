"""TLS for the servers we run (``fhir-bridge serve``, ``fhir-bridge sandbox``): HTTPS, mutual TLS, and the ASGI
TLS extension that tells the app which client certificate the connection presented.

Why this module exists. Certificate-bound access tokens (RFC 8705 §3) are accepted only over a connection
presenting the certificate they are bound to, so the API must see the client certificate of each request. The
ASGI way is the TLS extension (asgi.readthedocs.io specs/tls.html): ``scope["extensions"]["tls"]`` with
``client_cert_chain`` (PEM strings, the client's certificate first), ``client_cert_name``, ``tls_version``…,
which :mod:`fhir_bridge.api.security` reads. uvicorn does not implement that extension (encode/uvicorn#745 and
the pull request #1119 were never merged): its HTTP protocols build the scope in ``HttpToolsProtocol
.on_message_begin`` and ``H11Protocol.handle_events`` with no ``extensions`` at all, and pass it to
``self.app``, which they read per request. The least invasive fix is therefore a subclass of uvicorn's
protocol that, once the handshake is over (``connection_made``; asyncio calls it after the TLS handshake),
reads the peer certificate from ``transport.get_extra_info("ssl_object")`` and replaces ``self.app`` for that
connection by a thin ASGI wrapper adding the extension to each scope. Give it to uvicorn as ``http=``
(:func:`uvicorn_tls_options` does). Nothing of uvicorn is patched; plain-HTTP connections get no extension,
as the spec demands.

The client certificate modes (``[api] tls_client_cert``) map to OpenSSL's verify modes: ``required``
(``CERT_REQUIRED``) fails the TLS handshake of a client without a certificate signed by ``tls_client_ca``,
before any HTTP is read, so nothing is recorded or stored; ``optional`` (``CERT_OPTIONAL``) asks for one and
verifies it if sent; ``none`` asks for none. Python's ``ssl`` (before 3.13) exposes the peer's own
certificate only, so ``client_cert_chain`` holds that one certificate, which is all token binding needs.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from fhir_bridge.adapters.clients import certificate_thumbprint
from fhir_bridge.errors import InvalidInput

__all__ = [
    "CLIENT_CERT_MODES",
    "certificate_file_thumbprint",
    "client_ssl_context",
    "tls_extension",
    "tls_http_protocol",
    "uvicorn_tls_options",
    "with_tls_extension",
]

#: ``[api] tls_client_cert`` → the verify mode of the server's SSL context
CLIENT_CERT_MODES: Mapping[str, ssl.VerifyMode] = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303, "TLSv1.1": 0x0302, "TLSv1": 0x0301}
_CIPHER_IDS: dict[str, int] = {}

ASGIApp = Any  # an ASGI 3 callable; uvicorn's own alias is private


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension (specs/tls.html, version 0.2) for one established TLS connection."""
    client_der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name: str | None = None
    if client_der:
        chain = [ssl.DER_cert_to_PEM_cert(client_der)]
        name = x509.load_der_x509_certificate(client_der).subject.rfc4514_string()
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,  # the stdlib does not hand back the certificate we presented; the spec allows None
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,  # an unverifiable certificate never gets this far: the handshake failed
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": _cipher_id(ssl_object.context, cipher[0]) if cipher else None,
    }


def _cipher_id(context: ssl.SSLContext, name: str) -> int | None:
    """The IANA cipher suite number: OpenSSL's cipher id carries it in its low 16 bits."""
    if name not in _CIPHER_IDS:
        for cipher in context.get_ciphers():
            _CIPHER_IDS.setdefault(str(cipher["name"]), int(cipher["id"]) & 0xFFFF)
    return _CIPHER_IDS.get(name)


def with_tls_extension(app: ASGIApp, tls: Mapping[str, Any]) -> ASGIApp:
    """``app`` seeing ``tls`` as ``scope["extensions"]["tls"]`` (the scope is copied, never shared)."""

    async def app_with_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") in ("http", "websocket"):
            scope = {**scope, "extensions": {**(scope.get("extensions") or {}), "tls": dict(tls)}}
        await app(scope, receive, send)

    return app_with_tls


class _TlsExtensionMixin:
    """Adds the TLS extension to every request of a TLS connection (see the module docstring)."""

    app: ASGIApp

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.app = with_tls_extension(self.app, tls_extension(ssl_object))


@functools.cache
def tls_http_protocol() -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn as ``http=``: what ``http="auto"`` picks (httptools when installed,
    else h11), with the TLS extension. uvicorn is imported here, not by the clients of this module."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover  (httptools comes with uvicorn[standard])
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class TlsH11Protocol(_TlsExtensionMixin, H11Protocol):
            """uvicorn's h11 protocol with the ASGI TLS extension."""

        return TlsH11Protocol

    class TlsHttpToolsProtocol(_TlsExtensionMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol with the ASGI TLS extension."""

    return TlsHttpToolsProtocol


def uvicorn_tls_options(cert: str, key: str, client_ca: str, client_cert: str) -> dict[str, Any]:
    """The ``uvicorn.run``/``uvicorn.Config`` keyword arguments for these TLS settings (``[api] tls_*``).

    No certificate: ``{}`` (plain HTTP), and any other TLS setting is then refused rather than silently ignored.
    ``optional`` and ``required`` need ``client_ca``. Files are checked here so that a typo is a one-line error
    at start-up, not a traceback from inside uvicorn.
    """
    if client_cert not in CLIENT_CERT_MODES:
        raise InvalidInput(f"tls_client_cert must be one of {', '.join(CLIENT_CERT_MODES)}, not {client_cert!r}")
    if not cert:
        if key or client_ca or client_cert != "none":
            raise InvalidInput("tls_key, tls_client_ca and tls_client_cert need tls_cert (the server certificate)")
        return {}
    if client_cert != "none" and not client_ca:
        raise InvalidInput(f"tls_client_cert = {client_cert!r} needs tls_client_ca (the CA of client certificates)")
    for setting, path in (("tls_cert", cert), ("tls_key", key), ("tls_client_ca", client_ca)):
        if path and not Path(path).is_file():
            raise InvalidInput(f"{setting}: no such file {path}")
    options: dict[str, Any] = {
        "ssl_certfile": cert,
        "ssl_keyfile": key or None,
        "ssl_cert_reqs": CLIENT_CERT_MODES[client_cert],
        "http": tls_http_protocol(),
    }
    if client_ca and client_cert != "none":
        options["ssl_ca_certs"] = client_ca
    return options


def certificate_file_thumbprint(path: Path) -> str:
    """RFC 8705 ``x5t#S256`` of the first certificate in a PEM file (``fhir-bridge clients add --cert``)."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        raise InvalidInput(f"{path} is not a PEM certificate") from None
    return certificate_thumbprint(certificate.public_bytes(Encoding.DER))


def client_ssl_context(ca_bundle: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """The TLS context of an outbound client: verify the server against ``ca_bundle`` (PEM; empty: certifi's
    bundle, what httpx trusts by default) and present the certificate ``cert`` (PEM, with ``key`` unless the key
    is in the same file) when given. httpx 0.28 wants this rather than its deprecated ``verify=<path>``/``cert=``.
    """
    import certifi

    for setting, path in (("ca_bundle", ca_bundle), ("client_cert", cert), ("client_key", key)):
        if path and not Path(path).is_file():
            raise InvalidInput(f"{setting}: no such file {path}")
    context = ssl.create_default_context(cafile=ca_bundle or certifi.where())
    if cert:
        try:
            context.load_cert_chain(cert, key or None)
        except (ssl.SSLError, ValueError):
            raise InvalidInput("client_cert/client_key do not hold a PEM certificate and its private key") from None
    return context

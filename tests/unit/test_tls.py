"""TLS building blocks: development certificates, the settings → uvicorn mapping, and the ASGI TLS extension
filled in by our uvicorn protocol over a real TLS connection (an in-process uvicorn on a free port)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from fhir_bridge.adapters.dev_certs import DevCertificates, make_client_certificate, make_dev_certificates
from fhir_bridge.adapters.tls import (
    certificate_file_thumbprint,
    client_ssl_context,
    tls_http_protocol,
    uvicorn_tls_options,
    with_tls_extension,
)
from fhir_bridge.errors import Conflict, InvalidInput


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return make_dev_certificates(tmp_path_factory.mktemp("certs"), ("alice", "bob"))


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ------------------------------------------------------------------------------------------- certificates


def test_dev_certificates_chain_to_the_dev_ca_and_private_keys_are_0600(certs: DevCertificates) -> None:
    ca = load(certs.ca.cert)
    server, alice = load(certs.server.cert), load(certs.clients["alice"].cert)
    for leaf in (server, alice):
        leaf.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in alice.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert alice.subject.rfc4514_string().startswith("CN=alice")
    for key in (certs.ca.key, certs.server.key, certs.clients["alice"].key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_client_certificate_added_later_is_signed_by_the_same_ca(certs: DevCertificates) -> None:
    before = certs.ca.cert.read_bytes()
    carol = make_client_certificate(certs.ca.cert.parent, "carol")
    assert certs.ca.cert.read_bytes() == before
    load(carol.cert).verify_directly_issued_by(load(certs.ca.cert))
    with pytest.raises(Conflict):
        make_client_certificate(certs.ca.cert.parent, "carol")  # never replaced: its thumbprint may be registered
    with pytest.raises(InvalidInput):
        make_client_certificate(certs.ca.cert.parent, "../escape")


def test_the_thumbprint_of_a_certificate_file_is_rfc8705_x5t_s256(certs: DevCertificates, tmp_path: Path) -> None:
    der = load(certs.clients["alice"].cert).public_bytes(Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert certificate_file_thumbprint(certs.clients["alice"].cert) == expected
    assert certificate_file_thumbprint(certs.clients["bob"].cert) != expected
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(InvalidInput):
        certificate_file_thumbprint(tmp_path / "not.pem")


# --------------------------------------------------------------------------------------- settings → uvicorn


def test_no_server_certificate_means_plain_http() -> None:
    assert uvicorn_tls_options("", "", "", "none") == {}


@pytest.mark.parametrize("key, ca, mode, complaint", [
    ("k.pem", "", "none", "need tls_cert"),
    ("", "ca.pem", "none", "need tls_cert"),
    ("", "", "required", "need tls_cert"),
    ("", "", "sometimes", "one of none, optional, required"),
])
def test_tls_settings_without_a_server_certificate_are_refused(key: str, ca: str, mode: str, complaint: str) -> None:
    with pytest.raises(InvalidInput, match=complaint):
        uvicorn_tls_options("", key, ca, mode)


def test_client_certificate_modes_need_a_ca_and_map_to_openssl_verify_modes(certs: DevCertificates) -> None:
    cert, key, ca = str(certs.server.cert), str(certs.server.key), str(certs.ca.cert)
    with pytest.raises(InvalidInput, match="needs tls_client_ca"):
        uvicorn_tls_options(cert, key, "", "optional")
    with pytest.raises(InvalidInput, match="no such file"):
        uvicorn_tls_options(cert, key, "/nowhere/ca.pem", "required")
    required = uvicorn_tls_options(cert, key, ca, "required")
    assert required["ssl_cert_reqs"] == ssl.CERT_REQUIRED and required["ssl_ca_certs"] == ca
    assert uvicorn_tls_options(cert, key, ca, "optional")["ssl_cert_reqs"] == ssl.CERT_OPTIONAL
    plain_tls = uvicorn_tls_options(cert, key, "", "none")
    assert plain_tls["ssl_cert_reqs"] == ssl.CERT_NONE and "ssl_ca_certs" not in plain_tls


def test_an_outbound_context_refuses_missing_files_and_a_key_that_does_not_match(certs: DevCertificates) -> None:
    with pytest.raises(InvalidInput, match="ca_bundle"):
        client_ssl_context("/nowhere/ca.pem")
    with pytest.raises(InvalidInput, match="private key"):
        client_ssl_context(str(certs.ca.cert), str(certs.clients["alice"].cert), str(certs.clients["bob"].key))
    assert client_ssl_context(str(certs.ca.cert), str(certs.clients["alice"].cert), str(certs.clients["alice"].key))


# -------------------------------------------------------------------------------------- the ASGI extension


async def test_the_wrapper_adds_the_extension_to_a_copy_of_the_scope() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    original = {"type": "http", "extensions": {"http.response.trailers": {}}}
    await with_tls_extension(app, {"client_cert_chain": []})(original, None, None)
    await with_tls_extension(app, {"client_cert_chain": []})({"type": "lifespan"}, None, None)
    assert seen[0]["extensions"] == {"http.response.trailers": {}, "tls": {"client_cert_chain": []}}
    assert original["extensions"] == {"http.response.trailers": {}}
    assert "extensions" not in seen[1]


async def _echo_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps((scope.get("extensions") or {}).get("tls", "absent")).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(**options: Any) -> Iterator[int]:
    """uvicorn in a thread on a socket bound here (no race for the port); yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_echo_tls, log_level="critical", lifespan="off", **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def tls_of(port: int, certs: DevCertificates, client: str | None) -> Any:
    pair = certs.clients[client] if client else None
    context = client_ssl_context(str(certs.ca.cert), str(pair.cert) if pair else "", str(pair.key) if pair else "")
    return httpx.get(f"https://localhost:{port}/", verify=context, timeout=10).json()


def test_the_client_certificate_of_the_connection_reaches_the_app(certs: DevCertificates) -> None:
    options = uvicorn_tls_options(str(certs.server.cert), str(certs.server.key), str(certs.ca.cert), "optional")
    with serving(**options) as port:
        alice, anonymous = tls_of(port, certs, "alice"), tls_of(port, certs, None)
    assert len(alice["client_cert_chain"]) == 1
    presented = ssl.PEM_cert_to_DER_cert(alice["client_cert_chain"][0])
    assert presented == load(certs.clients["alice"].cert).public_bytes(Encoding.DER)
    assert alice["client_cert_name"].startswith("CN=alice")
    assert alice["tls_version"] in (0x0303, 0x0304) and isinstance(alice["cipher_suite"], int)
    assert alice["client_cert_error"] is None
    assert anonymous["client_cert_chain"] == [] and anonymous["client_cert_name"] is None


def test_plain_http_connections_get_no_tls_extension() -> None:
    with serving(http=tls_http_protocol()) as port:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).json() == "absent"


def test_required_mode_refuses_the_handshake_of_a_client_without_a_certificate(certs: DevCertificates) -> None:
    options = uvicorn_tls_options(str(certs.server.cert), str(certs.server.key), str(certs.ca.cert), "required")
    with serving(**options) as port:
        assert tls_of(port, certs, "bob")["client_cert_name"].startswith("CN=bob")
        tls12 = client_ssl_context(str(certs.ca.cert))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # TLS 1.2: the server's refusal ends the handshake itself
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            tls12.wrap_socket(raw, server_hostname="localhost")
        # TLS 1.3: the client's side of the handshake ends first; the server then drops it without a byte of HTTP
        tls13 = client_ssl_context(str(certs.ca.cert))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                tls13.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            try:
                answer = tls.recv(1024)
            except (ssl.SSLError, ConnectionError):
                answer = b""
        assert answer == b""
        with pytest.raises(httpx.TransportError):
            tls_of(port, certs, None)

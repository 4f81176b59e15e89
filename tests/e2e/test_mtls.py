"""Mutual TLS for the API over real processes (issue 6 item 3, STANDARDS.md §8, RFC 8705).

Two ``fhir-bridge serve`` processes on one Redis and data directory, both HTTPS with the development CA's server
certificate: one with ``tls_client_cert = "required"``, one with ``"optional"``. A client without a certificate
(or with one from another CA) never gets past the TLS handshake of the first, so nothing is recorded or stored.
A client registered with ``fhir-bridge clients add --cert`` gets tokens bound to its certificate
(``cnf.x5t#S256``), which the FHIR routes accept only over a connection presenting that certificate.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from fhir_bridge.adapters.auth import BridgeKeys, InvalidToken, verify_access_token
from fhir_bridge.adapters.clients import generate_client_keypair
from fhir_bridge.adapters.dev_certs import CertAndKey, DevCertificates, make_dev_certificates
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.tls import certificate_file_thumbprint
from fhir_bridge.adapters.token_client import BackendServicesAuth, load_private_jwk
from fhir_bridge.dev.clients import PLATFORM_TENANT, DevClients, provision
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Sandbox
from tests.e2e.tls_helpers import server_env, start_tls, tls_context

pytestmark = pytest.mark.e2e
BOUND = "platform-bound"
BOUND_SCOPE = "system/Task.rs system/ServiceRequest.rs"


@dataclass
class TlsBridges:
    required: str  # FHIR base of the API requiring client certificates
    optional: str  # FHIR base of the API asking for them
    certs: DevCertificates
    rogue: DevCertificates  # another CA: its client certificate must not get in
    clients: DevClients
    bound_key: dict[str, Any]
    data_dir: Path
    redis_url: str

    def cert(self, name: str) -> CertAndKey:
        return self.certs.clients[name]

    def bound_auth(self, api: str) -> BackendServicesAuth:
        return BackendServicesAuth(api.removesuffix("/fhir") + "/auth/token", BOUND, self.bound_key, BOUND_SCOPE)


def fhir_bridge(data_dir: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "fhir_bridge", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FHIR_BRIDGE_DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def bridges(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[TlsBridges]:
    data_dir = tmp_path_factory.mktemp("mtls")
    certs = make_dev_certificates(data_dir / "certs", ("platform-host", BOUND, "other-host"))
    rogue = make_dev_certificates(data_dir / "rogue-certs", ("platform-host",))
    clients = provision(data_dir / "clients.json", data_dir / "client-keys")
    private, public = generate_client_keypair(data_dir / "client-keys" / BOUND)
    added = fhir_bridge(data_dir, "clients", "add", "--id", BOUND, "--role", "platform", "--tenant", PLATFORM_TENANT,
                        "--jwks", str(public), "--scope", "system/Task.rs", "--scope", "system/ServiceRequest.rs",
                        "--cert", str(certs.clients[BOUND].cert))
    assert added["x5t#S256"] == certificate_file_thumbprint(certs.clients[BOUND].cert)
    with EmbeddedRedis(data_dir) as redis, ProcessGroup(data_dir / "logs") as group:
        env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": sandbox.url,
               "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_AUDIT__CHECKPOINT_SECONDS": "3600"}
        required = start_tls(group, "api-required", ["serve"], "/readyz", certs, certs.clients["platform-host"],
                              {**env, **server_env(certs, "required")})
        optional = start_tls(group, "api-optional", ["serve"], "/readyz", certs, None,
                             {**env, **server_env(certs, "optional")})
        yield TlsBridges(required=f"https://127.0.0.1:{required}/fhir", optional=f"https://127.0.0.1:{optional}/fhir",
                         certs=certs, rogue=rogue, clients=clients, bound_key=load_private_jwk(private),
                         data_dir=data_dir, redis_url=redis.url)


def root(api: str) -> str:
    return api.removesuffix("/fhir")


def stored(redis_url: str) -> dict[bytes, bytes | None]:
    """Everything in Redis but the assertion-replay keys (they expire on their own)."""
    with Redis.from_url(redis_url) as redis:
        return {key: redis.dump(key) for key in redis.scan_iter() if b":auth:jti:" not in key}


# ------------------------------------------------------------------------------------------- handshake


def test_required_mode_refuses_a_connection_without_a_certificate_and_nothing_is_recorded(
        bridges: TlsBridges) -> None:
    before = stored(bridges.redis_url)
    port = int(bridges.required.split(":")[2].split("/")[0])
    for rejected in (None, bridges.rogue.clients["platform-host"]):  # no certificate; one from another CA
        context = tls_context(bridges.certs, rejected)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{root(bridges.required)}/readyz", verify=context, timeout=10)
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{bridges.required}/ServiceRequest", json={"resourceType": "ServiceRequest"},
                       headers={"Content-Type": "application/fhir+json"}, verify=context, timeout=10)
        context.maximum_version = ssl.TLSVersion.TLSv1_2  # where the refusal ends the handshake itself
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
    assert stored(bridges.redis_url) == before  # no AuditEvent, no resource, no key of any kind


def test_required_mode_serves_a_client_presenting_a_dev_certificate(bridges: TlsBridges) -> None:
    context = tls_context(bridges.certs, bridges.cert("platform-host"))
    assert httpx.get(f"{root(bridges.required)}/readyz", verify=context, timeout=10).status_code == 200
    # a client not bound to a certificate uses its token over any verified connection
    with httpx.Client(auth=bridges.clients.auth("platform", bridges.required), verify=context, timeout=30) as http:
        answer = http.get(f"{bridges.required}/Task", params={"_count": "0"})
    assert answer.status_code == 200 and answer.json()["resourceType"] == "Bundle"


# ---------------------------------------------------------------------------------- certificate binding


def bound_token(bridges: TlsBridges, api: str, over: CertAndKey | None) -> str:
    auth = bridges.bound_auth(api)
    with httpx.Client(verify=tls_context(bridges.certs, over), timeout=30) as http:
        return auth.take_token_response(http.send(auth.token_request()))


def task_search(bridges: TlsBridges, api: str, token: str, over: CertAndKey | None) -> httpx.Response:
    with httpx.Client(verify=tls_context(bridges.certs, over), timeout=30) as http:
        return http.get(f"{api}/Task", params={"_count": "0"}, headers={"Authorization": f"Bearer {token}"})


def test_a_bound_clients_token_carries_its_certificate_thumbprint(bridges: TlsBridges) -> None:
    token = bound_token(bridges, bridges.required, bridges.cert(BOUND))
    keys = BridgeKeys.load_or_create(bridges.data_dir / "keys")
    thumbprint = certificate_file_thumbprint(bridges.cert(BOUND).cert)
    context = verify_access_token(token, keys=keys, audience=bridges.required, now=time.time(),
                                  cert_thumbprint=thumbprint)
    assert context.client_id == BOUND
    for presented in (None, certificate_file_thumbprint(bridges.cert("other-host").cert)):
        with pytest.raises(InvalidToken, match="bound to a client certificate"):
            verify_access_token(token, keys=keys, audience=bridges.required, now=time.time(),
                                cert_thumbprint=presented)


def test_a_bound_token_works_over_its_certificate_and_not_over_another(bridges: TlsBridges) -> None:
    token = bound_token(bridges, bridges.required, bridges.cert(BOUND))
    assert task_search(bridges, bridges.required, token, bridges.cert(BOUND)).status_code == 200
    other = task_search(bridges, bridges.required, token, bridges.cert("other-host"))  # a valid cert, not its own
    assert other.status_code == 401, other.text[:300]
    assert 'error="invalid_token"' in other.headers["WWW-Authenticate"]
    assert "certificate" in json.dumps(other.json())  # refused for the binding, not for anything else


def test_in_optional_mode_a_bound_token_without_its_certificate_is_refused(bridges: TlsBridges) -> None:
    token = bound_token(bridges, bridges.optional, bridges.cert(BOUND))
    anonymous = task_search(bridges, bridges.optional, token, None)
    assert anonymous.status_code == 401 and 'error="invalid_token"' in anonymous.headers["WWW-Authenticate"]
    assert "certificate" in json.dumps(anonymous.json())
    assert task_search(bridges, bridges.optional, token, bridges.cert(BOUND)).status_code == 200
    # optional mode: clients that are not bound still come in without a certificate
    with httpx.Client(auth=bridges.clients.auth("platform", bridges.optional), verify=tls_context(bridges.certs),
                      timeout=30) as http:
        assert http.get(f"{bridges.optional}/Task", params={"_count": "0"}).status_code == 200


def test_a_bound_client_gets_no_token_without_its_certificate(bridges: TlsBridges) -> None:
    """RFC 8705 §3: the token endpoint itself refuses a bound client that does not present its certificate."""
    for over in (None, bridges.cert("other-host")):
        auth = bridges.bound_auth(bridges.optional)
        with httpx.Client(verify=tls_context(bridges.certs, over), timeout=30) as http:
            answer = http.send(auth.token_request())
        assert answer.status_code == 401 and answer.json()["error"] == "invalid_client", answer.text
        assert "certificate" in answer.json()["error_description"]

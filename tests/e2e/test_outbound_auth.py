"""Outbound authentication to the source over real processes (issue 6 item 4, STANDARDS.md §8).

Two sandboxes play a national-record source that hands out tokens only to registered systems
(``--require-token --clients FILE``, the bridge's public JWK Set registered there): one over plain HTTP whose
URLs all name ``127.0.0.1`` (``--public-base-url``), one over HTTPS requiring client certificates of the
development CA. ``fhir-bridge pull`` configured with ``[source] token_url``/``client_id``/``private_key_jwk``
(and ``client_cert``/``client_key``/``ca_bundle``) gets its case; a wrong key, no token configuration or no
client certificate fail in one line with exit code 1; the token never goes to another origin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.clients import Client, generate_client_keypair
from fhir_bridge.adapters.dev_certs import DevCertificates, make_dev_certificates
from fhir_bridge.adapters.settings import DEFAULT_SOURCE_SCOPE
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.tls_helpers import start_tls, tls_context

pytestmark = pytest.mark.e2e
SANDBOX = ["sandbox", "--patients", "2", "--no-corrupt", "--page-cap", "100"]


@dataclass
class Sources:
    plain: int  # port of the token-requiring HTTP sandbox (its URLs name 127.0.0.1)
    mutual: int  # port of the token- and client-certificate-requiring HTTPS sandbox
    certs: DevCertificates
    key: Path  # the bridge's private JWK, registered at both sources
    wrong_key: Path  # a key pair nobody registered
    world: dict[str, Any]

    def patient(self, index: int = 1) -> tuple[str, list[str]]:
        patient = self.world["patients"][index]
        ident = patient["identifier"]
        return f"{ident['system']}|{ident['value']}", list(patient["documents"]["intact"])

    def auth_log(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"http://127.0.0.1:{self.plain}/_sandbox/auth-log", timeout=10).json())


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sources]:
    base = tmp_path_factory.mktemp("outbound")
    certs = make_dev_certificates(base / "certs", ("bridge",))
    key, public = generate_client_keypair(base / "bridge-key")
    wrong_key, _ = generate_client_keypair(base / "wrong-key")
    registry = base / "source-clients.json"  # the source's own registry: it knows the bridge by its public keys
    bridge = Client.from_dict({"id": "fhir-bridge", "role": "operator", "tenant": "bridge",
                               "scopes": DEFAULT_SOURCE_SCOPE.split(), "jwks": json.loads(public.read_text())})
    registry.write_text(json.dumps([bridge.to_dict()]))
    gate = ["--require-token", "--clients", str(registry)]
    with ProcessGroup(base / "logs") as group:
        plain = start_tls(group, "source-plain", [*SANDBOX, *gate, "--public-base-url", "http://127.0.0.1:{port}"],
                          "/healthz", None)
        mutual = start_tls(group, "source-mutual", [*SANDBOX, *gate, "--tls-cert", str(certs.server.cert),
                                                    "--tls-key", str(certs.server.key),
                                                    "--tls-client-ca", str(certs.ca.cert)],
                           "/healthz", certs, certs.clients["bridge"])
        world = httpx.get(f"http://127.0.0.1:{plain}/_sandbox/world", timeout=10).json()
        yield Sources(plain, mutual, certs, key, wrong_key, world)


def smart_env(token_url: str, key: Path) -> dict[str, str]:
    return {"FHIR_BRIDGE_SOURCE__TOKEN_URL": token_url, "FHIR_BRIDGE_SOURCE__CLIENT_ID": "fhir-bridge",
            "FHIR_BRIDGE_SOURCE__PRIVATE_KEY_JWK": str(key)}


def pull(source: str, patient: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fhir_bridge", "pull", "--source", source, "--patient", patient, "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "FHIR_BRIDGE_SOURCE__BACKOFF_INITIAL": "0.05",
             "FHIR_BRIDGE_SOURCE__MAX_RETRIES": "1", **env},
    )


def assert_packaged(done: subprocess.CompletedProcess[str], intact: list[str]) -> None:
    """Every intact document packaged; only what the record itself holds back left out (exit 3 lists those)."""
    assert done.returncode in (0, 3), done.stderr
    summary = json.loads(done.stdout)
    assert summary["documentsPackaged"] == len(intact) > 0
    assert set(summary["reasons"]) <= {"masked", "superseded", "entered-in-error"}, summary["reasons"]


def assert_one_line_failure(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fhir-bridge: error: "), done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ SMART tokens


def test_pull_gets_a_token_from_the_source_and_packages_the_case(sources: Sources, tmp_path: Path) -> None:
    patient, intact = sources.patient()
    logged = len(sources.auth_log())
    root = f"http://127.0.0.1:{sources.plain}"
    done = pull(f"{root}/fhir", patient, tmp_path, smart_env(f"{root}/auth/token", sources.key))
    assert_packaged(done, intact)
    requests = sources.auth_log()[logged:]
    assert requests and all(r["bearer"] and r["status"] == "passed" for r in requests)


def test_a_key_the_source_does_not_know_fails_in_one_line(sources: Sources, tmp_path: Path) -> None:
    patient, _ = sources.patient()
    root = f"http://127.0.0.1:{sources.plain}"
    logged = len(sources.auth_log())
    done = pull(f"{root}/fhir", patient, tmp_path, smart_env(f"{root}/auth/token", sources.wrong_key))
    assert_one_line_failure(done, "token endpoint refused client fhir-bridge", "invalid_client")
    assert not (tmp_path / "bundle.json").exists()
    assert sources.auth_log()[logged:] == []  # no FHIR request went out without a token


def test_without_token_settings_the_source_refuses_in_one_line(sources: Sources, tmp_path: Path) -> None:
    patient, _ = sources.patient()
    done = pull(f"http://127.0.0.1:{sources.plain}/fhir", patient, tmp_path, {})
    assert_one_line_failure(done, "HTTP 401")


def test_the_token_is_never_sent_to_another_origin(sources: Sources, tmp_path: Path) -> None:
    """Reached as ``localhost``, the sandbox still names ``127.0.0.1`` in its attachment URLs: another origin
    (RFC 6454: the host differs), so the documents are asked for without the token, and refused."""
    patient, intact = sources.patient()
    logged = len(sources.auth_log())
    root = f"http://localhost:{sources.plain}"
    done = pull(f"{root}/fhir", patient, tmp_path, smart_env(f"{root}/auth/token", sources.key))
    assert done.returncode == 3, done.stderr  # written, with the documents left out
    summary = json.loads(done.stdout)
    assert summary["reasons"]["retrieve-failed"] == len(intact) and summary["documentsPackaged"] == 0
    requests = sources.auth_log()[logged:]
    ours = [r for r in requests if r["host"] == f"localhost:{sources.plain}"]
    elsewhere = [r for r in requests if r["host"] != f"localhost:{sources.plain}"]
    assert ours and all(r["bearer"] for r in ours)
    assert len(elsewhere) == len(intact)
    assert all(r["host"] == f"127.0.0.1:{sources.plain}" and not r["bearer"] and r["status"] == 401 for r in elsewhere)


# ----------------------------------------------------------------------------------------- mutual TLS


def mtls_env(sources: Sources, *, cert: bool = True, ca: bool = True) -> dict[str, str]:
    env = smart_env(f"https://127.0.0.1:{sources.mutual}/auth/token", sources.key)
    if ca:
        env["FHIR_BRIDGE_SOURCE__CA_BUNDLE"] = str(sources.certs.ca.cert)
    if cert:
        env["FHIR_BRIDGE_SOURCE__CLIENT_CERT"] = str(sources.certs.clients["bridge"].cert)
        env["FHIR_BRIDGE_SOURCE__CLIENT_KEY"] = str(sources.certs.clients["bridge"].key)
    return env


def test_pull_presents_its_client_certificate_and_token_over_mutual_tls(sources: Sources, tmp_path: Path) -> None:
    patient, intact = sources.patient(0)
    done = pull(f"https://127.0.0.1:{sources.mutual}/fhir", patient, tmp_path, mtls_env(sources))
    assert_packaged(done, intact)
    log = httpx.get(f"https://127.0.0.1:{sources.mutual}/_sandbox/auth-log", timeout=10,
                    verify=tls_context(sources.certs, sources.certs.clients["bridge"])).json()
    assert log and all(r["bearer"] and r["status"] == "passed" for r in log)


def test_without_a_client_certificate_the_pull_fails_in_one_line(sources: Sources, tmp_path: Path) -> None:
    patient, _ = sources.patient(0)
    done = pull(f"https://127.0.0.1:{sources.mutual}/fhir", patient, tmp_path, mtls_env(sources, cert=False))
    assert_one_line_failure(done, "did not answer", "token endpoint")
    assert not (tmp_path / "bundle.json").exists()


def test_a_source_certificate_we_do_not_trust_fails_at_once_in_one_line(sources: Sources, tmp_path: Path) -> None:
    patient, _ = sources.patient(0)
    done = pull(f"https://127.0.0.1:{sources.mutual}/fhir", patient, tmp_path, mtls_env(sources, ca=False))
    assert_one_line_failure(done, "TLS with the source failed", "did not verify")

"""The sandbox served by a real uvicorn process on a free port, talked to over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

_RUN = (
    "import sys; from fhir_bridge.sandbox.app import SandboxConfig; from fhir_bridge.sandbox.serve import run; "
    "run(SandboxConfig(seed=5, patients=2, page_cap=3, big_docs=1, big_total_bytes=3_000_000), "
    "'127.0.0.1', int(sys.argv[1]))"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def sandbox_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    output = tmp_path_factory.mktemp("sandbox") / "server.log"
    with output.open("wb") as sink:  # a file, not a pipe: an unread pipe could fill up and block the server
        process = subprocess.Popen([sys.executable, "-c", _RUN, str(port)], stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"sandbox exited: {output.read_text(errors='replace')}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sandbox did not start within 30 s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_metadata_over_real_http(sandbox_url: str) -> None:
    async with httpx.AsyncClient(base_url=sandbox_url) as client:
        response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    statement = response.json()
    assert statement["fhirVersion"] == "4.0.1" and statement["implementation"]["url"] == f"{sandbox_url}/fhir"


async def test_a_big_document_streams_over_real_http_with_its_declared_size_and_hash(sandbox_url: str) -> None:
    async with httpx.AsyncClient(base_url=sandbox_url) as client:
        p0 = (await client.get("/_sandbox/world")).json()["patients"][0]
        doc_id = p0["documents"]["big"][0]
        reference = (await client.get(f"/fhir/DocumentReference/{doc_id}")).json()
        attachment = reference["content"][0]["attachment"]
        assert attachment["url"].startswith(sandbox_url)
        sha1, size = hashlib.sha1(), 0
        async with client.stream("GET", attachment["url"]) as response:
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == attachment["size"] == 3_000_000
            async for chunk in response.aiter_bytes():
                sha1.update(chunk)
                size += len(chunk)
    assert size == attachment["size"]
    assert base64.b64encode(sha1.digest()).decode() == attachment["hash"]

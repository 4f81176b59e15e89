"""A FHIR "source" that breaks the protocol on purpose, served over real HTTP by uvicorn in a thread.

``/not-a-bundle``: the document search answers a Patient instead of a searchset Bundle.
``/loop``: the document search's next links go round in a circle.
``/html``: a web site, not FHIR at all.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

NIR = {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "295109912611193"}
FHIR = "application/fhir+json"


def searchset(resources: list[dict], next_url: str | None = None) -> dict:
    bundle: dict = {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                    "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def liar_app() -> FastAPI:
    app = FastAPI()

    @app.get("/html/{anything:path}")
    async def html(anything: str) -> HTMLResponse:
        return HTMLResponse("<html><body>Welcome to our intranet</body></html>")

    @app.get("/{mode}/Patient")
    async def patient(mode: str) -> JSONResponse:
        return JSONResponse(searchset([{"resourceType": "Patient", "id": "p1", "identifier": [NIR]}]),
                            media_type=FHIR)

    @app.get("/{mode}/ImagingStudy")
    async def studies(mode: str) -> JSONResponse:
        return JSONResponse(searchset([]), media_type=FHIR)

    @app.get("/{mode}/DocumentReference")
    async def documents(mode: str, request: Request) -> JSONResponse:
        if mode == "not-a-bundle":
            return JSONResponse({"resourceType": "Patient", "id": "p1"}, media_type=FHIR)
        page = int(request.query_params.get("page", "0"))
        base = str(request.base_url).rstrip("/")
        return JSONResponse(searchset([], f"{base}/loop/DocumentReference?page={(page + 1) % 3}"), media_type=FHIR)

    return app


@pytest.fixture(scope="session")
def liar() -> Iterator[str]:
    # bind the socket here and hand it to uvicorn: no window in which another process could take the port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(liar_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the lying source did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)

"""The FHIR clients people already use, unmodified, against a running bridge (issue 10, item 5).

* fhirpy (beda-software, async, aiohttp): ``AsyncFHIRClient(url, authorization="Bearer …")``;
* fhirclient (SMART on FHIR, requests): a ``FHIRClient`` whose server carries a ``FHIROAuth2Auth`` built from
  its own saved-state form (``{"access_token": …}``), so every call goes out with ``Authorization: Bearer``
  through the library's own signing (``FHIRServer._get`` / ``post_json``), nothing patched.

Each creates a second-opinion ServiceRequest, reads the Task the bridge opens for it and pages through the
platform's DiagnosticReports with ``_count=1`` following ``Bundle.link[next]`` (FHIR R4 http.html#paging).
The tokens are real SMART Backend Services tokens of the ``platform`` client (STANDARDS.md §8).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fhirclient import client as smart_client
from fhirclient.auth import FHIROAuth2Auth
from fhirclient.models.diagnosticreport import DiagnosticReport as SmartDiagnosticReport
from fhirclient.models.servicerequest import ServiceRequest as SmartServiceRequest
from fhirclient.models.task import Task as SmartTask
from fhirpy import AsyncFHIRClient

from fhir_bridge.dev.demo import second_opinion_request
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.test_exchange import opinion_as_seen, post, wait_task

pytestmark = pytest.mark.e2e


def bearer(bridge: Bridge, client_id: str = "platform") -> str:
    """A real access token of ``client_id``, fetched the way any SMART backend client does."""
    auth = bridge.auth(client_id)
    return auth.take_token_response(httpx.Client(timeout=30).send(auth.token_request()))


def smart(bridge: Bridge) -> smart_client.FHIRClient:
    """fhirclient as shipped: settings, then the server's OAuth2 auth from a saved state holding the token."""
    fhir = smart_client.FHIRClient(settings={"app_id": "fhir-bridge-tests", "api_base": bridge.api + "/"})
    fhir.server.auth = FHIROAuth2Auth(state={"access_token": bearer(bridge)})
    return fhir


@pytest.fixture(scope="module")
def patients(sandbox: Sandbox) -> list[dict[str, Any]]:
    return list(sandbox.world()["patients"])


@pytest.fixture(scope="module")
def opinions(bridge: Bridge, patients: list[dict[str, Any]]) -> Iterator[list[str]]:
    """Two cases created over plain HTTP, each answered by its reviewer: the DiagnosticReports to page through."""
    ids = []
    with bridge.client("platform") as platform:
        for n, patient in enumerate(patients[:2]):
            answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, f"CLIENTS-DR-{n}"))
            assert answer.status_code == 201, answer.text
            sr_id = answer.json()["id"]
            task = wait_task(platform, bridge.api, sr_id)
            assert task["status"] == "ready", task.get("statusReason")
            with bridge.client(bridge.reviewer_of(task)) as reviewer:
                report = post(reviewer, bridge.api, "DiagnosticReport", opinion_as_seen(reviewer, bridge.api, sr_id))
                assert report.status_code == 201, report.text
                ids.append(report.json()["id"])
    yield ids


def wait_task_with(find: Any, timeout: float = 60) -> dict[str, Any]:
    """The first Task ``find()`` returns once the worker has moved it past ``requested``."""
    deadline = time.monotonic() + timeout
    task: dict[str, Any] = {}
    while time.monotonic() < deadline:
        task = find() or {}
        if task.get("status") not in (None, "requested", "received", "accepted", "in-progress"):
            return task
        time.sleep(0.2)
    raise AssertionError(f"task stayed {task.get('status')}")


async def test_fhirpy_creates_a_request_reads_its_task_and_pages_the_opinions(
    bridge: Bridge, patients: list[dict[str, Any]], opinions: list[str]
) -> None:
    client = AsyncFHIRClient(bridge.api, authorization=f"Bearer {bearer(bridge)}")
    request = client.resource("ServiceRequest", **second_opinion_request(patients[2], "CLIENTS-FHIRPY"))
    await request.save()
    assert request.id and request["status"] == "active"

    tasks = await client.resources("Task").search(focus=f"ServiceRequest/{request.id}").fetch()
    assert len(tasks) == 1 and tasks[0]["code"]["coding"][0]["code"] == "fulfill"
    read = await client.reference("Task", tasks[0].id).to_resource()
    assert read.id == tasks[0].id and read["focus"]["reference"] == f"ServiceRequest/{request.id}"

    # fetch_all follows Bundle.link[next] page after page
    pages = client.resources("DiagnosticReport").limit(1)
    every = await pages.fetch_all()
    assert set(opinions) <= {r.id for r in every}
    assert len(await pages.fetch()) == 1
    assert await client.resources("DiagnosticReport").count() == len(every)


def test_fhirclient_creates_a_request_reads_its_task_and_pages_the_opinions(
    bridge: Bridge, patients: list[dict[str, Any]], opinions: list[str]
) -> None:
    fhir = smart(bridge)
    request = SmartServiceRequest(second_opinion_request(patients[3], "CLIENTS-SMART"))
    created = request.create(fhir.server)
    assert created is not None and created["status"] == "active" and created["id"]
    request_id = created["id"]

    def find() -> dict[str, Any] | None:
        found = SmartTask.where({"focus": f"ServiceRequest/{request_id}"}).perform_resources_iter(fhir.server)
        first = next(iter(found), None)
        return first.as_json() if first is not None else None

    task = wait_task_with(find)
    read = SmartTask.read(task["id"], fhir.server)
    assert read.focus.reference == f"ServiceRequest/{request_id}" and read.code.coding[0].code == "fulfill"

    search = SmartDiagnosticReport.where({"_count": "1"})
    pages = list(search.perform_iter(fhir.server))
    assert len(pages) >= 2 and all(len(page.entry or []) <= 1 for page in pages)
    seen = [entry.resource.id for page in pages for entry in page.entry or []]
    assert set(opinions) <= set(seen) and len(seen) == len(set(seen))

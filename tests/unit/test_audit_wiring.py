"""The audit trail wired in (issue 7): the API middleware (one event per call, before the answer, fail closed),
the source client's exchange hook (one event per logical exchange), the TaskBook's job events, and the
AuditEvent search parameters. In process, on the in-memory fakes; the real thing is tests/e2e/test_audit_trail.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.adapters.reference_data import load_profiles
from fhir_bridge.adapters.settings import Settings, SourceSettings
from fhir_bridge.adapters.source_client import SourceClient, SourceExchange
from fhir_bridge.api.app import create_app
from fhir_bridge.api.audit_middleware import describe
from fhir_bridge.api.audit_routes import date_bounds, parse_audit_search
from fhir_bridge.api.capability import AUDIT_SEARCH_PARAMS
from fhir_bridge.audit.events import BALP_ENTITY_TYPE, JTI_PREFIX, Party
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.errors import AttachmentError, AuditUnavailable, InvalidInput, SourceUnavailable
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.fhir.resources import validate
from fhir_bridge.workflow.bridge import Bridge as UseCases
from fhir_bridge.workflow.taskbook import TaskBook
from tests.callers import Callers, assigned_reviewer, caller
from tests.fakes import FakeSource, InMemoryBlobs, InMemoryQueue, InMemoryStore, fake_source_factory, make_bridge
from tests.unit.test_cases import LAB_ONLY_RULES, PATIENT, REQUESTS, TERMS, output_reference, world

FHIR = {"Content-Type": "application/fhir+json"}
NIR = PATIENT["identifier"]["value"]
Event = dict[str, Any]


class FakeAudit:
    """:class:`~fhir_bridge.ports.AuditPort` in memory; ``down`` makes every append fail as Redis would."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.down = False

    async def append(self, event: Event) -> Event:
        if self.down:
            raise AuditUnavailable("the audit log cannot be written (ConnectionError)")
        stored = {**event, "id": str(len(self.events) + 1)}
        self.events.append(stored)
        return stored

    def by_request(self, request_id: str) -> list[Event]:
        return [e for e in self.events if request_id in request_ids(e)]


def request_ids(event: Event) -> list[str]:
    return [e["what"]["identifier"]["value"] for e in event.get("entity", [])
            if e.get("type", {}).get("system") == BALP_ENTITY_TYPE and e["type"]["code"] == "XrequestId"]


def subtypes(event: Event) -> list[str]:
    return [c["code"] for c in event.get("subtype", [])]


def patient_of(event: Event) -> str | None:
    return next((e["what"]["identifier"]["value"] for e in event["entity"] if e.get("role", {}).get("code") == "1"),
                None)


def object_reference(event: Event) -> str | None:
    return next((e["what"].get("reference") for e in event["entity"] if e.get("role", {}).get("code") == "4"), None)


def query_of(event: Event) -> bytes:
    return base64.b64decode(next(e["query"] for e in event["entity"] if "query" in e))


def client_agent(event: Event) -> Event:
    return next(a for a in event["agent"] if a["requestor"])


class Api:
    def __init__(self, client: httpx.AsyncClient, audit: FakeAudit, service: UseCases, queue: InMemoryQueue,
                 callers: Callers):
        self.client, self.audit, self.service, self.queue, self.callers = client, audit, service, queue, callers

    @property
    def caller(self) -> AccessContext | None:
        return self.callers.current

    @caller.setter
    def caller(self, who: AccessContext | None) -> None:
        self.callers.current = who

    async def create_request(self, request_id: str = "W-1", **headers: str) -> httpx.Response:
        body = second_opinion_request(PATIENT, request_id)
        return await self.client.post("/fhir/ServiceRequest", content=json.dumps(body),
                                      headers={**FHIR, "If-None-Exist": f"identifier={REQUESTS}|{request_id}",
                                               **headers})  # fmt: skip


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    audit = FakeAudit()
    store, queue, blobs = InMemoryStore(), InMemoryQueue(max_attempts=3), InMemoryBlobs()
    service = make_bridge(store=store, queue=queue, blobs=blobs, source=fake_source_factory(FakeSource(world())),
                          terminology=TERMS, work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES, audit=audit)
    app = create_app(Settings(), service, audit=audit, audit_bridge=Party("fhir-bridge", name="fhir-bridge api"),
                     profiles=load_profiles())
    callers = Callers(app, caller("platform"))  # a platform client unless a test says otherwise
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
        yield Api(client, audit, service, queue, callers)


# -- the API: one event per call, before the answer ----------------------------------------------------


async def test_a_create_is_recorded_with_its_resource_patient_client_and_request_id(api: Api) -> None:
    answer = await api.create_request(**{"X-Request-Id": "req-create-1"})
    assert answer.status_code == 201 and answer.headers["X-Request-Id"] == "req-create-1"
    [event] = api.audit.by_request("req-create-1")
    validate(event)
    sr = answer.json()
    assert subtypes(event) == ["create"] and event["action"] == "C" and event["outcome"] == "0"
    assert object_reference(event) == f"ServiceRequest/{sr['id']}/_history/1"
    assert patient_of(event) == NIR
    client = client_agent(event)
    # BALP: the OAuth client id as the client agent, the token's jti in its policy
    assert client["who"]["identifier"]["value"] == "platform" and client["network"]["address"] == "10.1.2.3"
    assert api.caller is not None and client["policy"] == [JTI_PREFIX + api.caller.jti]
    assert client["type"]["coding"][0]["code"] == "110153"  # a create: the client is the Source


async def test_a_request_id_is_generated_when_absent_or_unusable_and_echoed(api: Api) -> None:
    for given in (None, "has spaces in it", "x" * 201):
        headers = {"X-Request-Id": given} if given else {}
        answer = await api.client.get("/fhir/metadata", headers=headers)
        made = answer.headers["X-Request-Id"]
        assert made != given and len(made) == 36
        [event] = api.audit.by_request(made)
        assert subtypes(event) == ["capabilities"] and event["action"] == "R"
        validate(event)


async def test_searches_keep_the_raw_query_and_the_form_body_and_name_the_one_patient(api: Api) -> None:
    token = f"{INS_NIR_TEST}|{NIR}"
    await api.client.get("/fhir/ServiceRequest", params={"subject:identifier": token},
                         headers={"X-Request-Id": "s-get"})  # fmt: skip
    await api.client.post("/fhir/DiagnosticReport/_search", content=f"status=final&subject:identifier={token}",
                          headers={"Content-Type": "application/x-www-form-urlencoded", "X-Request-Id": "s-post"})
    [get], [post] = api.audit.by_request("s-get"), api.audit.by_request("s-post")
    assert subtypes(get) == ["search-type"] and get["action"] == "E"
    assert query_of(get).startswith(b"GET /fhir/ServiceRequest?subject%3Aidentifier=") and NIR.encode() in query_of(get)
    assert query_of(post) == f"POST /fhir/DiagnosticReport/_search\n\nstatus=final&subject:identifier={token}".encode()
    assert patient_of(get) == NIR and patient_of(post) == NIR
    validate(get)
    validate(post)


async def test_failed_and_unknown_calls_are_recorded_too_and_health_is_not(api: Api) -> None:
    for path, status, interaction in [("/fhir/Task/nope", 404, "read"), ("/fhir/Nothing", 404, "search-type"),
                                      ("/fhir/Task/1/_history/2", 404, "vread")]:
        answer = await api.client.get(path, headers={"X-Request-Id": f"r{status}{interaction}"})
        assert answer.status_code == status
        [event] = api.audit.by_request(f"r{status}{interaction}")
        assert subtypes(event) == [interaction] and event["outcome"] == "4"
        assert event["outcomeDesc"]  # the OperationOutcome's text, never patient data
        validate(event)
    api.caller = None  # no token: refused, and recorded with the anonymous client and no jti
    answer = await api.client.get("/fhir/Task", headers={"X-Request-Id": "r401"})
    assert answer.status_code == 401
    [event] = api.audit.by_request("r401")
    assert subtypes(event) == ["search-type"] and event["outcome"] == "4"
    assert client_agent(event)["who"]["identifier"]["value"] == "anonymous" and "policy" not in client_agent(event)
    validate(event)
    before = len(api.audit.events)
    for path in ("/healthz", "/readyz", "/metrics"):
        await api.client.get(path)
    assert len(api.audit.events) == before


async def test_no_audit_no_exchange_a_refused_create_stands_and_its_retry_is_safe(api: Api) -> None:
    api.audit.down = True
    refused = await api.create_request("W-2", **{"X-Request-Id": "refused-1"})
    assert refused.status_code == 503 and refused.headers["X-Request-Id"] == "refused-1"
    outcome = refused.json()
    validate(outcome)
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "audit-unavailable"
    assert "ServiceRequest" not in refused.text and NIR not in refused.text
    api.audit.down = False
    retried = await api.create_request("W-2", **{"X-Request-Id": "retry-1"})
    assert retried.status_code == 200  # the write stood; If-None-Exist finds it, nothing new is created
    page = await api.client.get("/fhir/ServiceRequest", params={"identifier": f"{REQUESTS}|W-2"})
    assert page.json()["total"] == 1


async def test_a_streamed_bundle_is_recorded_before_any_byte_and_refused_whole(api: Api) -> None:
    sr = (await api.create_request("W-3")).json()
    await api.queue.drain(api.service.cases.run_collect_job)
    task = await api.service.book.for_request(sr["id"])
    bundle_ref = output_reference(task, "case-bundle")
    api.caller = caller("reviewer", reviewer=assigned_reviewer(task, api.service.rules.registry))
    answer = await api.client.get(f"/fhir/{bundle_ref}", headers={"X-Request-Id": "bundle-1"})
    assert answer.status_code == 200 and answer.json()["resourceType"] == "Bundle"
    [event] = api.audit.by_request("bundle-1")
    assert object_reference(event) == f"{bundle_ref}/_history/1" and patient_of(event) == NIR
    assert client_agent(event)["who"]["identifier"]["value"] == api.caller.client_id
    api.audit.down = True
    refused = await api.client.get(f"/fhir/{bundle_ref}")
    assert refused.status_code == 503 and refused.json()["resourceType"] == "OperationOutcome"
    assert b"DocumentReference" not in refused.content


async def test_case_changes_are_job_events_with_the_task_version_and_patient(api: Api) -> None:
    sr = (await api.create_request("W-4")).json()
    await api.queue.drain(api.service.cases.run_collect_job)
    task = await api.service.book.for_request(sr["id"])
    jobs = [e for e in api.audit.events if e["type"]["code"] == "110110"]
    assert [subtypes(e) for e in jobs] == [["collecting"], ["triaged-ready"]]
    assert [object_reference(e) for e in jobs] == [f"Task/{task['id']}/_history/2", f"Task/{task['id']}/_history/3"]
    assert all(patient_of(e) == NIR for e in jobs)
    assert jobs[0]["outcomeDesc"] == "requested/requested → in-progress/collecting"
    for event in jobs:
        validate(event)


async def test_a_refused_case_change_fails_the_job_for_the_queue_to_retry() -> None:
    audit = FakeAudit()
    store = InMemoryStore()
    task, _ = await store.create({"resourceType": "Task", "status": "requested", "intent": "order",
                                  "for": {"identifier": PATIENT["identifier"]}}, index={})  # fmt: skip
    book = TaskBook(store, TERMS, audit=audit)
    audit.down = True
    with pytest.raises(AuditUnavailable):
        await book.move(task, "in-progress", "collecting")
    audit.down = False
    moved = await book.edit(await book.read(task["id"]), lambda t: t.update(note=[{"text": "x"}]))
    [event] = audit.events
    assert subtypes(event) == ["case-edit"] and event["outcomeDesc"] == "changed: note"
    assert object_reference(event) == f"Task/{task['id']}/_history/{moved['meta']['versionId']}"


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/fhir/metadata", ("capabilities", "CapabilityStatement", None, None, None)),
    ("GET", "/fhir/Task/12", ("read", "Task", "12", None, None)),
    ("GET", "/fhir/Task/12/_history/3", ("vread", "Task", "12", "3", None)),
    ("GET", "/fhir/Task/12/_history", ("history-instance", "Task", "12", None, None)),
    ("GET", "/fhir/Task", ("search-type", "Task", None, None, None)),
    ("POST", "/fhir/Task/_search", ("search-type", "Task", None, None, None)),
    ("POST", "/fhir/ServiceRequest", ("create", "ServiceRequest", None, None, None)),
    ("PUT", "/fhir/DiagnosticReport/9", ("update", "DiagnosticReport", "9", None, None)),
    ("POST", "/fhir/Task/12/$decline", ("operation", "Task", "12", None, "$decline")),
    ("GET", "/fhir/AuditEvent/$verify", ("operation", "AuditEvent", None, None, "$verify")),
    ("DELETE", "/fhir/Task/12", ("delete", "Task", "12", None, None)),
    ("GET", "/fhir/Task/bad id!", ("read", "Task", None, None, None)),
])  # fmt: skip
def test_the_interaction_comes_from_the_method_and_the_path(method: str, path: str, expected: tuple[Any, ...]) -> None:
    assert describe(method, path) == expected


# -- the source client: one event per logical exchange ---------------------------------------------------


async def test_one_exchange_per_search_with_retries_and_pages_and_one_request_id() -> None:
    seen: list[httpx.Request] = []
    exchanges: list[SourceExchange] = []
    patient = {"resourceType": "Patient", "id": "p1", "identifier": [PATIENT["identifier"]]}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"})
        page = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": patient}]}
        if len(seen) == 2:
            page["link"] = [{"relation": "next", "url": "https://source.test/fhir/Patient?page=2"}]
        return httpx.Response(200, json=page, headers={"Content-Type": "application/fhir+json"})

    async def record(exchange: SourceExchange) -> None:
        exchanges.append(exchange)

    settings = SourceSettings(backoff_initial=0, backoff_max=0)
    identifier = PatientIdentifier(INS_NIR_TEST, NIR)
    async with SourceClient("https://source.test/fhir", settings, transport=httpx.MockTransport(handler),
                            on_exchange=record) as source:  # fmt: skip
        with pytest.raises(Exception, match="more than one"):  # the same Patient on two pages: ambiguous
            await source.find_patient(identifier)
    [exchange] = exchanges
    assert (exchange.transaction, exchange.interaction, exchange.status) == ("ITI-78", "search-type", 200)
    assert exchange.url == "https://source.test/fhir/Patient" and exchange.patient == identifier
    assert exchange.query is not None and exchange.query.startswith("GET https://source.test/fhir/Patient?")
    assert NIR in exchange.query and exchange.error is None
    assert len(seen) == 3 and {r.headers["X-Request-Id"] for r in seen} == {exchange.request_id}


async def test_a_failed_retrieve_is_one_exchange_with_its_final_status_and_reason() -> None:
    exchanges: list[SourceExchange] = []

    async def record(exchange: SourceExchange) -> None:
        exchanges.append(exchange)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/down"):
            return httpx.Response(503)
        return httpx.Response(200, content=b"not the declared bytes")

    settings = SourceSettings(backoff_initial=0, backoff_max=0, max_retries=1)
    async with SourceClient("https://source.test/fhir", settings, transport=httpx.MockTransport(handler),
                            on_exchange=record) as source:  # fmt: skip
        with pytest.raises(AttachmentError):
            await source.retrieve("Binary/d1?token=secret", Path("/nonexistent/dir/d1"),
                                  expected_sha1_b64=base64.b64encode(b"x" * 20).decode())
        with pytest.raises((SourceUnavailable, AttachmentError)):
            await source.retrieve("Binary/down", Path("/nonexistent/dir/d2"))
    first, second = exchanges
    assert (first.transaction, first.status, first.url) == ("ITI-68", 200, "https://source.test/fhir/Binary/d1")
    assert first.error is not None and first.error.startswith("attachment-error:")
    assert (second.transaction, second.status) == ("ITI-68", 503)


async def test_an_audit_refusal_fails_the_exchange() -> None:
    async def refuse(exchange: SourceExchange) -> None:
        raise AuditUnavailable("down")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"},
                              headers={"Content-Type": "application/fhir+json"})  # fmt: skip

    async with SourceClient("https://source.test/fhir", SourceSettings(), transport=httpx.MockTransport(handler),
                            on_exchange=refuse) as source:  # fmt: skip
        with pytest.raises(AuditUnavailable):
            await source.find_document_references("p1")


# -- AuditEvent search parameters ------------------------------------------------------------------------


def test_date_prefixes_bound_recorded() -> None:
    may = datetime(2026, 5, 1, tzinfo=UTC)
    june = datetime(2026, 6, 1, tzinfo=UTC)
    assert date_bounds("2026-05") == (may, june)
    assert date_bounds("ge2026-05") == (may, None)
    assert date_bounds("gt2026-05") == (june, None)
    assert date_bounds("lt2026-05") == (None, may)
    assert date_bounds("le2026-05") == (None, june)
    assert date_bounds("2026-05-01T10:00:00.5+02:00")[0] == datetime(2026, 5, 1, 8, 0, 0, 500000, tzinfo=UTC)
    for bad in ("2026-13", "ap2026", "yesterday", "2026-05-01T10"):
        with pytest.raises(InvalidInput):
            date_bounds(bad)


def test_search_parameters_become_filters_and_unknown_ones_are_refused() -> None:
    filters = parse_audit_search([("date", "ge2026-05-01"), ("date", "lt2026-06"), ("patient", "urn:x|1,urn:x|2"),
                                  ("subtype", "read"), ("outcome", "0,4"), ("_count", "5"),
                                  ("entity", "http://b.test/fhir/Task/1/_history/2")])  # fmt: skip
    assert filters == {"date_ge": datetime(2026, 5, 1, tzinfo=UTC), "date_lt": datetime(2026, 6, 1, tzinfo=UTC),
                       "patient": ["urn:x|1", "urn:x|2"], "subtype": ["read"], "outcome": ["0", "4"],
                       "entity": ["Task/1"]}  # fmt: skip
    for bad in [("color", "blue"), ("patient", "12345"), ("outcome", "3"), ("date", "ge2026,lt2027")]:
        with pytest.raises(InvalidInput):
            parse_audit_search([bad])
    with pytest.raises(InvalidInput, match="repeated"):
        parse_audit_search([("agent", "a"), ("agent", "b")])
    for name in AUDIT_SEARCH_PARAMS:  # every parameter the CapabilityStatement declares is understood
        parse_audit_search([(name, "ge2026" if name == "date" else "0" if name == "outcome" else "a|b")])


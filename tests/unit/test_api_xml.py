"""FHIR XML over the API (issue 10 item 3, issue 6 item 5): every FHIR endpoint answers application/fhir+xml
when asked (``_format`` over ``Accept``, STANDARDS.md §9), takes XML bodies as it takes JSON ones, answers its
errors in XML too, and refuses hostile XML (XXE, billion laughs, external DTDs, parameter entities, deep
nesting, oversized) with a 400/413 OperationOutcome, nothing stored and nothing read or fetched.

In process, on the in-memory fakes, with the callers of tests/callers.py (the routes' own scope, tenant and
reviewer rules still decide).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from fhir_bridge.adapters.reference_data import load_profiles
from fhir_bridge.adapters.settings import Settings
from fhir_bridge.api.app import create_app
from fhir_bridge.audit.events import Party
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.fhir.resources import Resource, dumps, validate
from fhir_bridge.fhir.xml import FHIR_NS, from_xml, to_xml
from fhir_bridge.workflow.bridge import Bridge as UseCases
from tests.callers import Callers, assigned_reviewer, caller
from tests.fakes import FakeSource, InMemoryBlobs, InMemoryQueue, InMemoryStore, fake_source_factory, make_bridge
from tests.unit.test_audit_wiring import FakeAudit, patient_of
from tests.unit.test_cases import LAB_ONLY_RULES, PATIENT, REQUESTS, TERMS, output_reference, world
from tests.unit.test_xml_safety import billion_laughs

XML = "application/fhir+xml"
XML_BODY = {"Content-Type": XML}
JSON_BODY = {"Content-Type": "application/fhir+json"}
ASK_XML = {"Accept": XML}
LIMIT = 10 * 1024 * 1024
NIR = PATIENT["identifier"]["value"]
SECRET = "TOP-SECRET-FILE-CONTENT"


class Api:
    def __init__(self, client: httpx.AsyncClient, audit: FakeAudit, service: UseCases, store: InMemoryStore,
                 queue: InMemoryQueue, callers: Callers) -> None:
        self.client, self.audit, self.service, self.store, self.queue = client, audit, service, store, queue
        self.callers = callers

    async def create_request_in_xml(self, request_id: str, **headers: str) -> httpx.Response:
        body = to_xml(second_opinion_request(PATIENT, request_id))
        return await self.client.post("/fhir/ServiceRequest", content=body, headers={
            **XML_BODY, "If-None-Exist": f"identifier={REQUESTS}|{request_id}", **headers})

    async def totals(self) -> dict[str, int]:
        kinds = ("ServiceRequest", "Task", "DiagnosticReport", "Bundle")
        counted = {kind: (await self.store.search(kind, {}, count=0)).total for kind in kinds}
        return {**counted, "jobs": len(self.queue.enqueued)}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    audit = FakeAudit()
    store, queue, blobs = InMemoryStore(), InMemoryQueue(max_attempts=3), InMemoryBlobs()
    service = make_bridge(store=store, queue=queue, blobs=blobs, source=fake_source_factory(FakeSource(world())),
                          terminology=TERMS, work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES, audit=audit)
    app = create_app(Settings(), service, audit=audit, audit_bridge=Party("fhir-bridge", name="fhir-bridge api"),
                     profiles=load_profiles())
    callers = Callers(app, caller("platform"))
    transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
        yield Api(client, audit, service, store, queue, callers)


def xml_answer(answer: httpx.Response) -> Resource:
    """An answer in FHIR XML, read back as FHIR JSON (through the hardened parser)."""
    assert answer.headers["content-type"] == f"{XML}; charset=utf-8", answer.text
    assert etree.QName(etree.fromstring(answer.content)).namespace == FHIR_NS
    return from_xml(answer.content, max_bytes=LIMIT)


def json_answer(answer: httpx.Response) -> Any:
    assert answer.headers["content-type"] == "application/fhir+json; charset=utf-8", answer.text
    return answer.json()


# -- negotiation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("query", "accept", "expected"), [
    ({}, XML, "xml"),
    ({}, "application/xml", "xml"),
    ({}, "text/xml", "xml"),
    ({}, "application/json", "json"),  # STANDARDS.md §9: Accept application/json gets FHIR JSON
    ({}, None, "json"),
    ({}, "*/*", "json"),
    ({}, "application/xml;q=0.5, application/fhir+json", "json"),
    ({}, "text/html, application/fhir+xml;q=0.8", "xml"),
    ({"_format": "xml"}, "application/fhir+json", "xml"),  # _format overrides Accept
    ({"_format": "json"}, XML, "json"),
    ({"_format": "application/fhir+xml"}, None, "xml"),
    ({"_format": "text/xml"}, None, "xml"),
    ({"_format": "application/fhir xml"}, None, "xml"),  # an unencoded + in the query string
])  # fmt: skip
async def test_format_comes_from_format_then_accept(api: Api, query: dict[str, str], accept: str | None,
                                                   expected: str) -> None:
    headers = {"Accept": accept} if accept else {}
    answer = await api.client.get("/fhir/metadata", params=query, headers=headers)
    assert answer.status_code == 200
    statement = xml_answer(answer) if expected == "xml" else json_answer(answer)
    assert statement["resourceType"] == "CapabilityStatement"
    assert {"application/fhir+xml", "xml", "application/fhir+json", "json"} <= set(statement["format"])


@pytest.mark.parametrize(("query", "accept"), [({"_format": "html"}, None), ({}, "text/html"),
                                               ({"_format": "turtle"}, XML)])
async def test_a_format_we_do_not_write_is_406_with_an_outcome_in_json(api: Api, query: dict[str, str],
                                                                      accept: str | None) -> None:
    answer = await api.client.get("/fhir/metadata", params=query, headers={"Accept": accept} if accept else {})
    assert answer.status_code == 406
    outcome = json_answer(answer)
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "not-acceptable"


# -- XML in, XML out -----------------------------------------------------------------------------------------

async def test_a_request_posted_in_xml_is_stored_as_its_json_and_read_back_in_xml(api: Api) -> None:
    created = await api.create_request_in_xml("X-1", Accept=XML)
    assert created.status_code == 201, created.text
    stored = xml_answer(created)
    assert stored["identifier"] == [{"system": REQUESTS, "value": "X-1"}]
    assert stored == await api.store.read("ServiceRequest", stored["id"])
    assert created.headers["location"].endswith(f"/ServiceRequest/{stored['id']}/_history/1")
    read = await api.client.get(f"/fhir/ServiceRequest/{stored['id']}", headers=ASK_XML)
    assert read.status_code == 200 and read.headers["etag"] == 'W/"1"'
    assert dumps(xml_answer(read), canonical=True) == dumps(stored, canonical=True)
    again = await api.create_request_in_xml("X-1")  # same If-None-Exist: found, not created
    assert again.status_code == 200 and json_answer(again)["id"] == stored["id"]


async def test_an_xml_body_gives_the_same_resource_as_the_json_body(api: Api) -> None:
    from_json = await api.client.post("/fhir/ServiceRequest", content=json.dumps(second_opinion_request(PATIENT, "J")),
                                      headers={"Content-Type": "application/fhir+json"})
    from_xml_body = await api.client.post("/fhir/ServiceRequest", content=to_xml(second_opinion_request(PATIENT, "J")),
                                          headers={"Content-Type": "application/xml"})  # fmt: skip
    assert from_json.status_code == from_xml_body.status_code == 201
    a, b = from_json.json(), from_xml_body.json()
    for resource in (a, b):  # what the server sets
        del resource["id"], resource["meta"], resource["authoredOn"]
    assert dumps(a, canonical=True) == dumps(b, canonical=True)


async def test_the_whole_case_speaks_xml_task_search_history_operations_and_the_opinion(api: Api) -> None:
    sr = xml_answer(await api.create_request_in_xml("X-2", Accept=XML))
    await api.queue.drain(api.service.cases.run_collect_job)
    page = await api.client.get("/fhir/Task", params={"focus": f"ServiceRequest/{sr['id']}", "_format": "xml"})
    bundle = xml_answer(page)
    assert bundle["type"] == "searchset" and bundle["total"] == 1
    task = bundle["entry"][0]["resource"]
    assert task["status"] == "ready" and {c["resourceType"] for c in task["contained"]} == {"OperationOutcome"}
    assert task == await api.service.book.for_request(sr["id"])
    history = xml_answer(await api.client.get(f"/fhir/Task/{task['id']}/_history", headers=ASK_XML))
    assert history["type"] == "history" and history["total"] == 3
    reviewer = assigned_reviewer(task, api.service.rules.registry)
    api.callers.current = caller("reviewer", reviewer=reviewer)
    opinion = {**reviewer_opinion(sr["id"], PATIENT), "status": "preliminary"}
    posted = await api.client.post("/fhir/DiagnosticReport", content=to_xml(opinion),
                                   headers={**XML_BODY, **ASK_XML, "Prefer": "return=OperationOutcome"})
    assert posted.status_code == 201, posted.text
    assert xml_answer(posted)["resourceType"] == "OperationOutcome"
    report_id = posted.headers["location"].split("/DiagnosticReport/")[1].split("/")[0]
    report = xml_answer(await api.client.get(f"/fhir/DiagnosticReport/{report_id}", headers=ASK_XML))
    assert report["status"] == "preliminary" and report["conclusion"] == opinion["conclusion"]
    ask = {"resourceType": "Parameters", "parameter": [{"name": "reviewer", "valueString": reviewer},
                                                       {"name": "text", "valueString": "le compte rendu opératoire"}]}
    asked = await api.client.post(f"/fhir/Task/{task['id']}/$request-documents", content=to_xml(ask),
                                  headers={**XML_BODY, **ASK_XML})
    assert asked.status_code == 200, asked.text
    waiting = xml_answer(asked)
    assert waiting["resourceType"] == "Task" and waiting["status"] == "on-hold"


async def test_errors_are_operation_outcomes_in_xml_when_xml_was_asked(api: Api) -> None:
    for path in ("/fhir/Task/nope", "/fhir/Nothing/at/all"):
        answer = await api.client.get(path, params={"_format": "xml"})
        assert answer.status_code == 404
        outcome = xml_answer(answer)
        assert outcome["resourceType"] == "OperationOutcome"
        validate(outcome)
    api.callers.current = None
    refused = await api.client.get("/fhir/Task", headers=ASK_XML)
    assert refused.status_code == 401 and xml_answer(refused)["issue"][0]["code"] == "login"
    assert "WWW-Authenticate" in refused.headers


async def test_an_xml_answer_is_audited_with_its_patient_and_an_xml_error_with_its_text(api: Api) -> None:
    sr = xml_answer(await api.create_request_in_xml("X-3", Accept=XML, **{"X-Request-Id": "xml-create"}))
    await api.client.get(f"/fhir/ServiceRequest/{sr['id']}", headers={**ASK_XML, "X-Request-Id": "xml-read"})
    await api.client.get("/fhir/Task/nope", headers={**ASK_XML, "X-Request-Id": "xml-404"})
    [created], [read], [missing] = (api.audit.by_request(r) for r in ("xml-create", "xml-read", "xml-404"))
    assert patient_of(created) == NIR and patient_of(read) == NIR
    assert missing["outcome"] == "4" and missing["outcomeDesc"]


async def test_the_streamed_case_bundle_is_json_only_and_xml_for_it_is_406(api: Api) -> None:
    sr = json_answer(await api.create_request_in_xml("X-4", Accept="application/fhir+json"))
    await api.queue.drain(api.service.cases.run_collect_job)
    task = await api.service.book.for_request(sr["id"])
    bundle_ref = output_reference(task, "case-bundle")
    api.callers.current = caller("reviewer", reviewer=assigned_reviewer(task, api.service.rules.registry))
    for asked in ({"headers": ASK_XML}, {"params": {"_format": "xml"}}):
        refused = await api.client.get(f"/fhir/{bundle_ref}", **asked)  # type: ignore[arg-type]
        assert refused.status_code == 406
        assert "application/fhir+json only" in refused.text
    served = await api.client.get(f"/fhir/{bundle_ref}", headers={"Accept": "application/fhir+json"})
    assert served.status_code == 200 and json_answer(served)["type"] == "document"
    statement = json_answer(await api.client.get("/fhir/metadata"))
    [bundle] = [r for r in statement["rest"][0]["resource"] if r["type"] == "Bundle"]
    assert "application/fhir+json only" in bundle["documentation"]


# -- hostile XML ---------------------------------------------------------------------------------------------

def hostile(kind: str, secret_file: Path, port: int) -> bytes:
    request = to_xml(second_opinion_request(PATIENT, "EVIL-1")).decode()
    body = request.split("?>", 1)[1]
    url = f"http://127.0.0.1:{port}/evil"
    if kind == "XXE reading a file":
        dtd = f'<!DOCTYPE ServiceRequest [<!ENTITY leak SYSTEM "file://{secret_file}">]>'
        body = body.replace('<note><text value="', '<note><text value="&leak;')
    elif kind == "XXE over the network":
        dtd = f'<!DOCTYPE ServiceRequest [<!ENTITY leak SYSTEM "{url}.txt">]>'
        body = body.replace('<note><text value="', '<note><text value="&leak;')
    elif kind == "external DTD":
        dtd = f'<!DOCTYPE ServiceRequest SYSTEM "{url}.dtd">'
    elif kind == "parameter entities":
        dtd = (f'<!DOCTYPE ServiceRequest [<!ENTITY % file SYSTEM "file://{secret_file}">'
               f'<!ENTITY % dtd SYSTEM "{url}.dtd"> %dtd;]>')
    elif kind == "billion laughs":
        return billion_laughs()
    else:
        raise AssertionError(kind)
    return f'<?xml version="1.0" encoding="UTF-8"?>{dtd}{body}'.encode()


HOSTILE = ["XXE reading a file", "XXE over the network", "external DTD", "parameter entities", "billion laughs"]


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("answer_in", ["json", "xml"])
async def test_hostile_xml_is_refused_400_with_nothing_stored_read_or_fetched(
    api: Api, tmp_path: Path, listener: tuple[int, list[bytes]], kind: str, answer_in: str,
) -> None:
    port, seen = listener
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET)
    before = await api.totals()
    answer = await api.client.post("/fhir/ServiceRequest", content=hostile(kind, secret_file, port),
                                   params={"_format": answer_in}, headers={**XML_BODY, "X-Request-Id": "evil"})
    assert answer.status_code == 400
    outcome = xml_answer(answer) if answer_in == "xml" else json_answer(answer)
    assert outcome["issue"][0]["diagnostics"] == "DTD/entities are not accepted"
    assert outcome["issue"][0]["details"]["coding"][0]["code"] == "malformed-resource"
    assert SECRET not in answer.text and "lol" not in answer.text
    assert await api.totals() == before
    [event] = api.audit.by_request("evil")
    assert event["outcome"] == "4" and SECRET not in json.dumps(event)
    assert seen == []  # nothing connected to the listener (the parse is over before the answer)


async def test_a_deeply_nested_xml_body_is_refused_400(api: Api) -> None:
    depth = 200_000  # about 2 MB of nesting, far past libxml2's depth limit (huge_tree off)
    body = b'<ServiceRequest xmlns="http://hl7.org/fhir">' + b"<note>" * depth + b"</note>" * depth \
        + b"</ServiceRequest>"
    before = await api.totals()
    answer = await api.client.post("/fhir/ServiceRequest", content=body, headers=XML_BODY)
    assert answer.status_code == 400
    assert "not well-formed" in json_answer(answer)["issue"][0]["diagnostics"]
    assert await api.totals() == before


async def test_an_oversized_xml_body_is_refused_413_before_it_is_parsed(api: Api) -> None:
    note = "x" * (LIMIT + 1024)
    body = to_xml({**second_opinion_request(PATIENT, "BIG"), "note": [{"text": note}]})
    before = await api.totals()
    answer = await api.client.post("/fhir/ServiceRequest", content=body, headers={**XML_BODY, **ASK_XML})
    assert answer.status_code == 413
    assert xml_answer(answer)["issue"][0]["code"] == "too-long"
    assert await api.totals() == before


@pytest.mark.parametrize(("content_type", "status"), [("text/plain", 415), ("application/fhir+json", 400)])
async def test_an_xml_body_sent_with_another_media_type_is_not_read_as_xml(api: Api, content_type: str,
                                                                           status: int) -> None:
    body = to_xml(second_opinion_request(PATIENT, "MT"))
    answer = await api.client.post("/fhir/ServiceRequest", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == status


async def test_xml_that_is_not_the_fhir_resource_is_a_400_naming_the_element(api: Api) -> None:
    body = to_xml(second_opinion_request(PATIENT, "BAD")).replace(b"<status ", b"<colour value=\"x\"/><status ")
    answer = await api.client.post("/fhir/ServiceRequest", content=body, headers=XML_BODY)
    assert answer.status_code == 400
    issue = json_answer(answer)["issue"][0]
    assert issue["code"] == "structure" and issue["expression"] == ["ServiceRequest.colour"]


async def test_a_stored_resource_with_no_xml_form_is_406_in_xml_and_still_served_in_json(api: Api) -> None:
    """JSON strings can carry characters XML 1.0 can not (U+0001); FHIR forbids them, but if one was stored the
    XML answer is refused as not acceptable, never a 500, and the JSON one still works."""
    body = {**second_opinion_request(PATIENT, "CTRL"), "note": [{"text": "bip\u0001"}]}
    created = await api.client.post("/fhir/ServiceRequest", content=json.dumps(body),
                                    headers={"Content-Type": "application/fhir+json"})
    if created.status_code != 201:
        pytest.skip("the intake refuses control characters already")
    resource_id = created.json()["id"]
    refused = await api.client.get(f"/fhir/ServiceRequest/{resource_id}", headers=ASK_XML)
    assert refused.status_code == 406
    assert xml_answer(refused)["issue"][0]["expression"] == ["ServiceRequest.note[0].text"]
    assert (await api.client.get(f"/fhir/ServiceRequest/{resource_id}")).status_code == 200


async def test_a_control_character_in_a_string_is_refused_by_name_not_value(api: Api) -> None:
    """R4 datatypes.html#string: no code point below U+0020 but tab, CR and LF — in JSON and XML bodies alike."""
    request = second_opinion_request(PATIENT, "CTRL")
    request["note"] = [{"text": "fine\tline\r\n"}, {"text": "bell\x07"}]
    before = await api.totals()
    answer = await api.client.post("/fhir/ServiceRequest", content=json.dumps(request), headers=JSON_BODY)
    assert answer.status_code == 400, answer.text
    outcome = json_answer(answer)
    assert outcome["issue"][0]["expression"] == ["note[1].text"] and "bell" not in answer.text
    assert await api.totals() == before

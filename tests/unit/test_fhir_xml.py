"""FHIR XML <-> FHIR JSON (FHIR R4 xml.html, json.html): every resource we serve or emit survives
JSON → XML → JSON byte for byte (canonical JSON, so decimals and times keep their exact digits), the XML we
write is read the same by fhir.resources' own XML reader, and hostile or non-FHIR XML is refused with a path,
never a value."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from fhir_bridge.adapters.reference_data import load_profiles
from fhir_bridge.api.capability import capability_statement
from fhir_bridge.api.fhir_io import searchset
from fhir_bridge.audit.events import Party, rest_event
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.errors import MalformedResource, TooLarge
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.fhir.resources import Resource, dumps, loads, operation_outcome, validate
from fhir_bridge.fhir.xml import FHIR_NS, from_xml, to_xml
from fhir_bridge.fhir.xml_safety import _hardened_parser
from fhir_bridge.sandbox import render
from fhir_bridge.sandbox.render import Urls
from fhir_bridge.sandbox.world import build_world
from fhir_bridge.workflow.bridge import Bridge as UseCases
from tests.fakes import FakeSource, InMemoryBlobs, InMemoryQueue, InMemoryStore, fake_source_factory, make_bridge
from tests.unit.test_cases import LAB_ONLY_RULES, PATIENT, REQUESTS, TERMS, output_reference, world

LIMIT = 10 * 1024 * 1024
EXT = "https://fhir-bridge.dev/fhir/StructureDefinition"
DIV = '<div xmlns="http://www.w3.org/1999/xhtml"><p>Avis : <b>diagnostic confirmé</b> &amp; plan adapté</p></div>'


def round_trip(resource: Resource) -> Resource:
    """JSON → XML → JSON, asserting on the way that nothing changed, not even a decimal's trailing zero."""
    xml = to_xml(resource)
    back = from_xml(xml, max_bytes=LIMIT)
    assert dumps(back, canonical=True) == dumps(resource, canonical=True)
    assert to_xml(back) == xml  # and the XML is a function of the content, not of the JSON's key order
    return back


def read_by_fhir_resources(resource: Resource) -> None:
    """fhir.resources' own XML reader (an independent implementation) reads our XML as the same resource."""
    from fhir.resources.R4B import get_fhir_model_class

    from fhir_bridge.fhir.resources import _jsonable

    model = get_fhir_model_class(resource["resourceType"])
    theirs = model.model_validate_xml(to_xml(resource), xmlparser=_hardened_parser())
    expected = model.model_validate(_jsonable(resource)).model_dump(mode="json")
    assert comparable(theirs.model_dump(mode="json")) == comparable(expected)


def comparable(obj: Any, key: str = "") -> Any:
    """What fhir.resources keeps: narratives compared as XML (it writes ``é`` as ``&#233;``), and a primitive's
    ``id`` left out (its XML reader drops ``<birthDate id="…">``, which json.html maps to
    ``_birthDate.id``; our round trip keeps it)."""
    if isinstance(obj, dict):
        return {k: etree.tostring(etree.fromstring(v), encoding="unicode") if k == "div" else comparable(v, k)
                for k, v in obj.items() if not (k == "id" and key.startswith("_"))}
    return [comparable(v, key) for v in obj] if isinstance(obj, list) else obj


# -- the resources we serve and emit -----------------------------------------------------------------------

def html_form(text: str) -> Resource:
    data = text.encode()
    return {"contentType": "text/html", "language": "fr", "data": base64.b64encode(data).decode(),
            "size": len(data), "hash": base64.b64encode(hashlib.sha1(data).digest()).decode(),
            "title": "Avis", "creation": "2026-11-21T10:15:30.250+01:00"}


def task_with_contained_outcomes() -> Resource:
    return {
        "resourceType": "Task", "id": "t1", "meta": {"versionId": "3", "lastUpdated": "2026-11-21T10:15:30.123Z"},
        "contained": [
            operation_outcome("warning", "business-rule", "document masked from professionals", code="masked"),
            {"resourceType": "OperationOutcome", "id": "triage", "issue": [
                {"severity": "information", "code": "informational", "diagnostics": "complete",
                 "expression": ["DocumentReference.type", "DocumentReference.date"]}]},
        ],
        "extension": [{"url": f"{EXT}/review-language", "valueCode": "fr"},
                      {"url": f"{EXT}/overdue", "valueBoolean": False},
                      {"url": f"{EXT}/generation", "valueInteger": 2},
                      {"url": f"{EXT}/score", "valueDecimal": Decimal("0.000001")}],
        "status": "ready", "intent": "order",
        "businessStatus": {"coding": [{"system": f"{EXT}/business-status", "code": "triaged-ready"}]},
        "code": {"coding": [{"system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill"}]},
        "focus": {"reference": "ServiceRequest/sr1"},
        "for": {"identifier": {"system": INS_NIR_TEST, "value": "295109912611193"}},
        "authoredOn": "2026-11-21T10:00:00Z",
        "restriction": {"period": {"end": "2026-11-23T10:00:00Z"}},
        "note": [{"text": "première ligne\ndeuxième ligne\ttabulée  espaces doubles"}],
        "output": [
            {"type": {"coding": [{"code": "case-bundle"}]}, "valueReference": {"reference": "Bundle/b1"}},
            {"type": {"coding": [{"code": "left-out"}]}, "valueReference": {"reference": "#left-out"}},
        ],
    }


def diagnostic_report() -> Resource:
    report = reviewer_opinion("sr1", PATIENT)
    report.update(id="dr1", issued="2026-11-21T10:15:30.250+01:00", presentedForm=[
        html_form(DIV), {"contentType": "application/pdf", "url": "Binary/pdf1", "size": 1234}],
        text={"status": "generated", "div": DIV})
    return report


def patient_with_birth_date_extension() -> Resource:
    return {
        "resourceType": "Patient", "id": "p1", "active": True,
        "name": [{"family": "Martin", "given": ["Claire", "Anne"],
                  "_given": [None, {"extension": [{"url": f"{EXT}/given-kind", "valueCode": "second"}]}]}],
        "birthDate": "1970-03-30",
        "_birthDate": {"id": "bd", "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                                  "valueDateTime": "1970-03-30T14:35:45.000-05:00"}]},
        "multipleBirthInteger": 2,
    }


def decimals() -> Resource:
    return {"resourceType": "Observation", "status": "final", "code": {"text": "mesures"},
            "valueQuantity": {"value": Decimal("1.50"), "unit": "cm"},
            "component": [{"code": {"text": "petit"}, "valueQuantity": {"value": Decimal("0.000001")}},
                          {"code": {"text": "négatif"}, "valueQuantity": {"value": Decimal("-0.10")}},
                          {"code": {"text": "entier"}, "valueQuantity": {"value": 3}},
                          {"code": {"text": "grand"}, "valueQuantity": {"value": Decimal("123456789012345678.90")}}],
            "referenceRange": [{"low": {"value": Decimal("1.0")}, "high": {"value": Decimal("2.00")}}]}


def parameters() -> Resource:
    return {"resourceType": "Parameters", "parameter": [
        {"name": "reviewer", "valueReference": {"reference": "PractitionerRole/onco-1"}},
        {"name": "reason", "valueString": "conflit d'intérêts"},
        {"name": "threshold", "valueDecimal": Decimal("1.50")},
        {"name": "outcome", "resource": operation_outcome("information", "informational", "done")},
        {"name": "nested", "part": [{"name": "ok", "valueBoolean": True}]},
    ]}


def audit_event() -> Resource:
    client = Party("platform", address="10.1.2.3", jti="jti-1")
    bridge = Party("fhir-bridge", name="fhir-bridge api", address="http://bridge.test/fhir")
    return rest_event(interaction="search-type", resource_type="Task", status=200, client=client, bridge=bridge,
                      recorded=datetime(2026, 11, 21, 10, 15, 30, 250000, tzinfo=UTC),
                      patient=PatientIdentifier(INS_NIR_TEST, "295109912611193"),
                      query=b"GET /fhir/Task?status=ready", request_id="req-1")


def searchset_of_tasks() -> Resource:
    return searchset("http://bridge.test/fhir", "Task", [task_with_contained_outcomes()], 3,
                     [("status", "ready")], 1, 1)


BUILT: dict[str, Any] = {
    "ServiceRequest (the demo request)": lambda: second_opinion_request(PATIENT, "REQ-1"),
    "Task with contained OperationOutcomes and extensions": task_with_contained_outcomes,
    "DiagnosticReport with presentedForm and narrative": diagnostic_report,
    "Bundle searchset": searchset_of_tasks,
    "OperationOutcome": lambda: operation_outcome("error", "invalid", "bad", code="x", expression=["Task.status"]),
    "CapabilityStatement": lambda: capability_statement("http://bridge.test/fhir", "2026-11-21T00:00:00Z",
                                                        load_profiles()),
    "AuditEvent": audit_event,
    "Parameters": parameters,
    "Patient with a _birthDate extension": patient_with_birth_date_extension,
    "decimals 1.50 and 0.000001": decimals,
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_every_resource_we_serve_survives_json_to_xml_and_back_exactly(name: str) -> None:
    resource = BUILT[name]()
    validate(resource)
    round_trip(resource)
    read_by_fhir_resources(resource)


def test_decimals_keep_their_digits_and_json_types_come_back() -> None:
    xml = to_xml(decimals()).decode()
    for digits in ('value="1.50"', 'value="0.000001"', 'value="-0.10"', 'value="3"', 'value="123456789012345678.90"',
                   'value="2.00"'):
        assert digits in xml
    back = from_xml(to_xml(patient_with_birth_date_extension()), max_bytes=LIMIT)
    assert back["active"] is True and back["multipleBirthInteger"] == 2 and isinstance(back["birthDate"], str)
    value = from_xml(xml.encode(), max_bytes=LIMIT)["valueQuantity"]["value"]
    assert isinstance(value, Decimal) and str(value) == "1.50"
    assert b'"value": 1.50' in dumps(from_xml(xml.encode(), max_bytes=LIMIT))


def test_elements_are_written_in_the_order_of_the_definition_whatever_the_json_order() -> None:
    resource = patient_with_birth_date_extension()
    shuffled = dict(reversed(list(resource.items())))
    assert to_xml(shuffled) == to_xml(resource)
    root = etree.fromstring(to_xml(resource))
    names = [etree.QName(child).localname for child in root]
    assert names == ["id", "active", "name", "birthDate", "multipleBirthInteger"]


def test_the_xml_form_follows_the_spec_attributes_primitives_and_containers() -> None:
    """xml.html: Resource.id is an element, Element.id and Extension.url attributes, a primitive's value an
    attribute, a contained resource inside its container element, the narrative in the XHTML namespace."""
    root = etree.fromstring(to_xml({**patient_with_birth_date_extension(), "text": {"status": "generated",
                                                                                     "div": DIV},
                                    "contained": [{"resourceType": "Organization", "id": "o1"}]}))
    f = "{" + FHIR_NS + "}"
    assert root.tag == f"{f}Patient" and root.find(f"{f}id").get("value") == "p1"
    birth = root.find(f"{f}birthDate")
    assert birth.get("id") == "bd" and birth.get("value") == "1970-03-30"
    assert birth.find(f"{f}extension").get("url").endswith("patient-birthTime")
    given = root.findall(f"{f}name/{f}given")
    assert [g.get("value") for g in given] == ["Claire", "Anne"] and given[1].find(f"{f}extension") is not None
    assert root.find(f"{f}contained/{f}Organization/{f}id").get("value") == "o1"
    assert root.find(f"{f}text/{{http://www.w3.org/1999/xhtml}}div/{{http://www.w3.org/1999/xhtml}}p") is not None


def test_a_repeating_primitive_with_only_an_extension_keeps_its_null_in_json() -> None:
    resource = {"resourceType": "Patient", "name": [
        {"given": [None, "B"], "_given": [{"id": "g0", "extension": [{"url": "http://x", "valueString": "a"}]},
                                          None]}]}
    back = round_trip(resource)
    assert back["name"][0]["given"] == [None, "B"]


# -- what the bridge really builds ---------------------------------------------------------------------------

@pytest.fixture
def service(tmp_path: Path) -> UseCases:
    return make_bridge(store=InMemoryStore(), queue=InMemoryQueue(max_attempts=3), blobs=InMemoryBlobs(),
                       source=fake_source_factory(FakeSource(world())), terminology=TERMS,
                       work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES)


async def test_a_real_case_its_task_bundle_opinion_and_history_survive_the_round_trip(service: UseCases) -> None:
    body = second_opinion_request(PATIENT, "X-1")
    request = (await service.cases.submit_request(body, if_none_exist=f"identifier={REQUESTS}|X-1",
                                            tenant="platform-a")).resource
    queue = service.ports.queue
    assert isinstance(queue, InMemoryQueue)
    await queue.drain(service.cases.run_collect_job)
    task = await service.book.for_request(request["id"])
    assert task["status"] == "ready" and len(task["contained"]) == 2
    opinion = (await service.opinions.submit({**reviewer_opinion(request["id"], PATIENT), "status": "preliminary"},
                                            if_none_exist=None)).resource
    bundle_id = output_reference(task, "case-bundle").split("/")[1]
    bundle = loads(b"".join([chunk async for chunk in service.bundles.chunks(bundle_id)]))
    for resource in (request, task, opinion, bundle, *await service.ports.store.history("Task", task["id"])):
        round_trip(resource)


def test_every_resource_the_sandbox_world_builds_survives_the_round_trip() -> None:
    world_ = build_world(seed=7, patients=4)
    urls = Urls("http://sandbox.test")
    built = [render.organization(o) for o in world_.organizations]
    built += [render.endpoint(e, urls) for e in world_.endpoints]
    for person in world_.patients:
        built.append(render.patient(person))
        built += [render.document_reference(d, world_, urls) for d in person.documents]
        built += [render.imaging_study(s) for s in person.studies]
    assert {r["resourceType"] for r in built} >= {"Patient", "DocumentReference", "ImagingStudy", "Endpoint",
                                                   "Organization"}
    for resource in built:
        round_trip(resource)
        if resource["resourceType"] == "Patient":  # and the demo's request for each of them
            round_trip(second_opinion_request({"identifier": resource["identifier"][0]}, "S-1"))


def test_xml_written_by_fhir_resources_is_read_as_the_same_resource() -> None:
    """The other direction with an independent writer: fhir.resources' model_dump_xml."""
    from fhir.resources.R4B import get_fhir_model_class

    from fhir_bridge.fhir.resources import _jsonable

    for resource in (task_with_contained_outcomes(), second_opinion_request(PATIENT, "R"), audit_event()):
        cls = get_fhir_model_class(resource["resourceType"])
        model = cls.model_validate(_jsonable(resource))
        ours = from_xml(bytes(model.model_dump_xml()), max_bytes=LIMIT)
        # compared as models: its XML writer spells UTC +00:00 where its JSON writer says Z
        assert cls.model_validate(_jsonable(ours)).model_dump(mode="json") == model.model_dump(mode="json")


# -- refusals ------------------------------------------------------------------------------------------------

def xml(body: str) -> bytes:
    return f'<?xml version="1.0" encoding="UTF-8"?>{body}'.encode()


REFUSED = {
    "unknown element": xml('<Patient xmlns="http://hl7.org/fhir"><colour value="SECRET"/></Patient>'),
    "out of order": xml('<Patient xmlns="http://hl7.org/fhir"><gender value="female"/><active value="true"/>'
                        "</Patient>"),
    "repeated single element": xml('<Patient xmlns="http://hl7.org/fhir"><gender value="female"/>'
                                   '<gender value="male"/></Patient>'),
    "text where FHIR has none": xml('<Patient xmlns="http://hl7.org/fhir">SECRET<active value="true"/></Patient>'),
    "bad boolean": xml('<Patient xmlns="http://hl7.org/fhir"><active value="SECRET"/></Patient>'),
    "bad integer": xml('<Patient xmlns="http://hl7.org/fhir"><multipleBirthInteger value="07"/></Patient>'),
    "bad decimal": xml('<Observation xmlns="http://hl7.org/fhir"><status value="final"/><code><text value="x"/>'
                       '</code><valueQuantity><value value="1,5"/></valueQuantity></Observation>'),
    "unknown resource type": xml('<Secret xmlns="http://hl7.org/fhir"/>'),
    "not the FHIR namespace": xml('<Patient xmlns="urn:other"><active value="true"/></Patient>'),
    "unexpected attribute": xml('<Patient xmlns="http://hl7.org/fhir"><active value="true" extra="SECRET"/>'
                                "</Patient>"),
    "an element with no value and no children (ele-1)": xml('<Patient xmlns="http://hl7.org/fhir"><active/>'
                                                            "</Patient>"),
    "an empty value attribute": xml('<Patient xmlns="http://hl7.org/fhir"><gender value=" "/></Patient>'),
    "Element.id as an element": xml('<Patient xmlns="http://hl7.org/fhir"><name><id value="n"/></name></Patient>'),
    "two resources in a container": xml('<Patient xmlns="http://hl7.org/fhir"><contained><Organization>'
                                        '<id value="a"/></Organization><Organization><id value="b"/></Organization>'
                                        "</contained></Patient>"),
    "a DOCTYPE": xml('<!DOCTYPE Patient [<!ENTITY s SYSTEM "file:///etc/passwd">]>'
                     '<Patient xmlns="http://hl7.org/fhir"><active value="&s;"/></Patient>'),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_xml_that_is_not_fhir_is_refused_with_a_path_and_never_a_value(case: str) -> None:
    with pytest.raises(MalformedResource) as refused:
        from_xml(REFUSED[case], max_bytes=LIMIT)
    assert "SECRET" not in str(refused.value) and "root:x:0" not in str(refused.value)


def test_an_oversized_xml_body_is_too_large() -> None:
    with pytest.raises(TooLarge):
        from_xml(to_xml(task_with_contained_outcomes()), max_bytes=512)


def test_a_narrative_div_with_a_doctype_or_not_a_div_is_refused_when_writing_xml() -> None:
    for div in ('<!DOCTYPE div [<!ENTITY x SYSTEM "file:///etc/passwd">]><div xmlns="http://www.w3.org/1999/xhtml">'
                "&x;</div>", "<p>not a div</p>", "<div>no XHTML namespace</div>"):
        with pytest.raises(MalformedResource):
            to_xml({"resourceType": "Patient", "text": {"status": "generated", "div": div}})


def test_json_that_is_not_fhir_is_refused_when_writing_xml() -> None:
    for resource in ({"resourceType": "Patient", "colour": "blue"}, {"resourceType": "Nope"},
                     {"resourceType": "Patient", "name": {"family": "not an array"}},
                     {"resourceType": "Patient", "_active": {"bad": 1}},
                     {"resourceType": "Patient", "extension": [{"url": "http://x", "_url": {"id": "u"}}]}):
        with pytest.raises(MalformedResource):
            to_xml(resource)

"""What a second-opinion request must say (fhir_bridge.case.intake), and how search parameters are read
(fhir_bridge.fhir.search_index): broken structure is MalformedResource (400), a broken rule
BusinessRuleViolation (422)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_terminology
from fhir_bridge.case.intake import SPECIALTY, check_request
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.errors import BusinessRuleViolation, InvalidInput, MalformedResource
from fhir_bridge.fhir.identity import INS_NIR, INS_NIR_TEST, PatientIdentifier, nir_key
from fhir_bridge.fhir.search_index import index_terms, parse_criteria
from fhir_bridge.fhir.terminology import CASE_CODES
from tests.fakes import InMemoryStore

TERMS = load_terminology()
NIR = "295109912611193"
PATIENT = {"identifier": {"system": INS_NIR_TEST, "value": NIR}}


def request(**changes: Any) -> dict[str, Any]:
    body = second_opinion_request(PATIENT, "R-1")
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def specialty(code: str, system: str = SPECIALTY) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code}]}]


# -- check_request ----------------------------------------------------------------------------------------


def test_a_valid_request_gives_the_patient_specialty_kind_and_deadline() -> None:
    checked = check_request(request(), TERMS)
    assert checked.patient == PatientIdentifier(INS_NIR_TEST, NIR)
    assert (checked.specialty, checked.kind, checked.deadline) == ("oncology", "second-opinion", "2026-12-31T12:00:00Z")


def test_a_tumor_board_request_with_a_deadline_period_is_accepted() -> None:
    code = {"coding": [{"system": CASE_CODES, "code": "tumor-board-opinion"}]}
    checked = check_request(request(code=code, occurrenceDateTime=None,
                                    occurrencePeriod={"end": "2027-01-15"}), TERMS)
    assert (checked.kind, checked.deadline) == ("tumor-board-opinion", "2027-01-15")


def test_a_request_without_a_deadline_has_none() -> None:
    assert check_request(request(occurrenceDateTime=None), TERMS).deadline is None


@pytest.mark.parametrize("question", [{"reasonCode": None}, {"note": None}], ids=["note-only", "reason-only"])
def test_the_clinical_question_may_be_a_reason_or_a_note(question: dict[str, Any]) -> None:
    check_request(request(**question), TERMS)


def test_a_nir_written_with_spaces_is_normalised() -> None:
    spaced = {"identifier": {"system": INS_NIR, "value": "2 95 10 99 126 111 93"}}
    assert check_request(request(subject=spaced), TERMS).patient == PatientIdentifier(INS_NIR, NIR)


def test_a_corsican_nir_is_accepted() -> None:
    body = "295022A123456"
    corsican = {"identifier": {"system": INS_NIR, "value": f"{body}{nir_key(body):02d}"}}
    assert check_request(request(subject=corsican), TERMS).patient.value.startswith("295022A")


@pytest.mark.parametrize("body", [None, [], "ServiceRequest", {"status": "active"},
                                  {"resourceType": "Task", "status": "requested", "intent": "order"}],
                         ids=["null", "array", "string", "no-resource-type", "another-type"])
def test_what_is_not_a_service_request_is_malformed(body: Any) -> None:
    with pytest.raises(MalformedResource):
        check_request(body, TERMS)


@pytest.mark.parametrize("changes", [
    {"subject": None}, {"subject": "Patient/1"}, {"status": 5}, {"code": "second-opinion"}, {"unknownElement": 1},
], ids=["no-subject", "subject-not-a-reference", "status-not-a-code", "code-not-a-concept", "unknown-element"])
def test_a_structurally_invalid_request_is_malformed(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedResource):
        check_request(request(**changes), TERMS)


def _set_category(body: dict[str, Any], value: Any) -> None:
    body["category"] = value


RULES: list[tuple[str, Callable[[], dict[str, Any]], list[str]]] = [
    ("draft", lambda: request(status="draft"), ["status"]),
    ("completed", lambda: request(status="completed"), ["status"]),
    ("intent-plan", lambda: request(intent="plan"), ["intent"]),
    ("intent-proposal", lambda: request(intent="proposal"), ["intent"]),
    ("code-other-system", lambda: request(code={"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}),
     ["code"]),
    ("code-unknown", lambda: request(code={"coding": [{"system": CASE_CODES, "code": "case-package"}]}), ["code"]),
    ("code-text-only", lambda: request(code={"text": "second opinion"}), ["code"]),
    ("subject-reference", lambda: request(subject={"reference": "Patient/1"}), ["subject.identifier"]),
    ("subject-not-ins", lambda: request(subject={"identifier": {"system": "urn:oid:1.2.3", "value": NIR}}),
     ["subject.identifier"]),
    ("subject-no-value", lambda: request(subject={"identifier": {"system": INS_NIR}}), ["subject.identifier"]),
    ("nir-bad-key", lambda: request(subject={"identifier": {"system": INS_NIR, "value": NIR[:-2] + "00"}}),
     ["subject.identifier"]),
    ("nir-too-short", lambda: request(subject={"identifier": {"system": INS_NIR, "value": NIR[:-1]}}),
     ["subject.identifier"]),
    ("no-category", lambda: request(category=None), ["category"]),
    ("unknown-specialty", lambda: request(category=specialty("astrology")), ["category"]),
    ("specialty-other-system", lambda: request(category=specialty("oncology", "http://snomed.info/sct")),
     ["category"]),
    ("no-question", lambda: request(reasonCode=None, note=None), ["reasonCode", "note"]),
]


@pytest.mark.parametrize(("make", "expression"), [(m, e) for _, m, e in RULES], ids=[i for i, _, _ in RULES])
def test_each_rule_of_a_second_opinion_request_is_a_business_rule_violation(
    make: Callable[[], dict[str, Any]], expression: list[str]
) -> None:
    with pytest.raises(BusinessRuleViolation) as refused:
        check_request(make(), TERMS)
    assert refused.value.expression == expression
    assert NIR not in refused.value.message  # never a patient identifier in an error


def test_every_specialty_of_the_mapping_is_accepted() -> None:
    codes = [c["code"] for c in TERMS.resources["specialty"]["concept"]]
    assert codes
    for code in codes:
        assert check_request(request(category=specialty(code)), TERMS).specialty == code


# -- parse_criteria ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resource_type", "name"), [
    ("ServiceRequest", "patient"), ("ServiceRequest", "focus"), ("Task", "subject:identifier"),
    ("DiagnosticReport", "based-on:missing"), ("Patient", "identifier"),
])
def test_an_unknown_search_parameter_is_refused_not_ignored(resource_type: str, name: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_criteria(resource_type, [(name, "x")])
    assert refused.value.expression == [name]


def test_result_parameters_are_left_to_the_caller() -> None:
    assert parse_criteria("Task", [("_count", "10"), ("_format", "json"), ("status", "ready")]) == {
        "status": ["ready"]}


def test_a_comma_separates_values_any_of_which_may_match() -> None:
    assert parse_criteria("Task", [("status", "ready, in-progress,,completed")]) == {
        "status": ["ready", "in-progress", "completed"]}


@pytest.mark.parametrize("value", ["", " , "])
def test_a_parameter_without_a_value_is_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        parse_criteria("Task", [("status", value)])


@pytest.mark.parametrize("value", [
    "ServiceRequest/42", "ServiceRequest/42/_history/3", "https://bridge.test/fhir/ServiceRequest/42",
    "https://bridge.test/fhir/ServiceRequest/42/_history/1", "ServiceRequest/42/",
])
def test_references_are_normalised_to_type_and_id(value: str) -> None:
    assert parse_criteria("Task", [("focus", value)]) == {"focus": ["ServiceRequest/42"]}
    assert parse_criteria("DiagnosticReport", [("based-on", value)]) == {"based-on": ["ServiceRequest/42"]}


def test_token_values_are_kept_as_given() -> None:
    token = f"{INS_NIR_TEST}|{NIR}"
    assert parse_criteria("ServiceRequest", [("subject:identifier", token)]) == {"subject:identifier": [token]}


async def test_a_request_is_found_by_its_ins_with_or_without_the_system() -> None:
    store = InMemoryStore()
    body = request()
    stored, _ = await store.create(body, index=index_terms(body))
    for value in (f"{INS_NIR_TEST}|{NIR}", NIR, f"urn:oid:1.2.3|x,{NIR}"):
        page = await store.search("ServiceRequest", parse_criteria("ServiceRequest", [("subject:identifier", value)]),
                                  count=10)
        assert [r["id"] for r in page.resources] == [stored["id"]], value


def test_a_repeated_parameter_is_refused_rather_than_answered_wrongly() -> None:
    """R4 ANDs repeats per resource; our index can not, so a repeat is a 400, never a wrong answer."""
    with pytest.raises(InvalidInput, match="repeated"):
        parse_criteria("ServiceRequest", [("identifier", "https://a.test|A"), ("identifier", "https://b.test|B")])

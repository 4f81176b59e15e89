"""Selection rules: what may never reach a reviewer, and every left-out item reported with its reason."""

from __future__ import annotations

from fhir_bridge.adapters.reference_data import load_terminology
from fhir_bridge.case.selection import PatientMatcher, screen_documents, screen_studies
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier

BASE = "https://source.test/fhir"
MASK = "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
IDENT = PatientIdentifier(INS_NIR_TEST, "295109912611193")
TERMS = load_terminology()


def absolute(ref: str) -> str:
    return ref if "://" in ref else f"{BASE}/{ref}"


MATCHER = PatientMatcher({"resourceType": "Patient", "id": "p1"}, IDENT, absolute)


def doc(i: str, **extra: object) -> dict:
    base = {"resourceType": "DocumentReference", "id": i, "status": "current",
            "masterIdentifier": {"value": f"urn:oid:1.2.3.{i}"}, "subject": {"reference": "Patient/p1"},
            "content": [{"attachment": {"url": f"{BASE}/Binary/{i}", "contentType": "application/pdf"}}]}
    base.update(extra)
    return base


def reasons(screened) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {(p.master_identifier or p.source_url): p.reason for p in screened.problems}


def test_masked_document_is_never_packaged() -> None:
    masked = doc("1", securityLabel=[{"coding": [{"system": MASK, "code": "MASQUE_PS"}]}])
    screened = screen_documents([masked, doc("2")], MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["2"]
    assert reasons(screened) == {"urn:oid:1.2.3.1": "masked"}


def test_masking_in_a_misspelled_system_is_not_the_official_label() -> None:
    wrong = doc("1", securityLabel=[{"coding": [{"system": MASK.replace("Statut", "Status"), "code": "MASQUE_PS"}]}])
    assert [d["id"] for d in screen_documents([wrong], MATCHER, TERMS, absolute).kept] == ["1"]


def test_non_current_versions_are_left_out_with_their_status() -> None:
    screened = screen_documents([doc("1", status="superseded"), doc("2", status="entered-in-error"), doc("3")],
                                MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["3"]
    assert reasons(screened) == {"urn:oid:1.2.3.1": "superseded", "urn:oid:1.2.3.2": "entered-in-error"}


def test_a_replaced_version_is_reported_even_when_the_source_does_not_return_it() -> None:
    newer = doc("2", relatesTo=[{"code": "replaces", "target": {"reference": "DocumentReference/1"}}])
    screened = screen_documents([newer], MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["2"]
    assert reasons(screened) == {f"{BASE}/DocumentReference/1": "superseded"}


def test_a_replaced_version_still_answered_current_loses_to_the_newer_one() -> None:
    newer = doc("2", relatesTo=[{"code": "replaces", "target": {"reference": f"{BASE}/DocumentReference/1"}}])
    screened = screen_documents([doc("1"), newer], MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["2"]
    assert reasons(screened) == {"urn:oid:1.2.3.1": "superseded"}


def test_another_patients_document_is_dropped() -> None:
    screened = screen_documents([doc("1", subject={"reference": "Patient/p2"}), doc("2", subject={
        "reference": f"{BASE}/Patient/p1/_history/3"}), doc("3", subject={"identifier": {
            "system": IDENT.system, "value": IDENT.value}})], MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["2", "3"]
    assert reasons(screened) == {"urn:oid:1.2.3.1": "wrong-patient"}


def test_mhd_content_rules() -> None:
    inline = doc("1")
    inline["content"][0]["attachment"]["data"] = "aGVsbG8="
    two = doc("2")
    two["content"] = two["content"] * 2
    none = doc("3", content=[])
    no_url = doc("4", content=[{"attachment": {"contentType": "text/plain"}}])
    screened = screen_documents([inline, two, none, no_url], MATCHER, TERMS, absolute)
    assert screened.kept == []
    assert reasons(screened) == {"urn:oid:1.2.3.1": "invalid-document", "urn:oid:1.2.3.2": "invalid-document",
                                 "urn:oid:1.2.3.3": "no-content", "urn:oid:1.2.3.4": "no-content"}


def test_duplicates_by_master_identifier_are_dropped() -> None:
    copy = doc("9", masterIdentifier={"value": "urn:oid:1.2.3.1"})
    screened = screen_documents([doc("1"), copy], MATCHER, TERMS, absolute)
    assert [d["id"] for d in screened.kept] == ["1"]
    assert [p.reason for p in screened.problems] == ["duplicate"]


def test_studies_of_another_patient_are_dropped() -> None:
    studies = [{"resourceType": "ImagingStudy", "id": "s1", "subject": {"reference": "Patient/p1"}},
               {"resourceType": "ImagingStudy", "id": "s2", "subject": {"reference": "Patient/p2"}}]
    screened = screen_studies(studies, MATCHER, absolute)
    assert [s["id"] for s in screened.kept] == ["s1"]
    assert screened.problems[0].reason == "wrong-patient"
    assert screened.problems[0].resource_type == "ImagingStudy"

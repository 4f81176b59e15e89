"""Pre-review triage (fhir_bridge.review.triage) on real case bundles built by fhir_bridge.case.packaging: what a
reviewer needs per specialty (mappings/triage-rules.json) and the consistency checks every case gets."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.adapters.reference_data import load_terminology, load_triage_rules
from fhir_bridge.case.packaging import CaseContent, PackagedDocument, build_case_bundle
from fhir_bridge.case.selection import Problem
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.fhir.resources import Resource, validate
from fhir_bridge.review.triage import (
    CONSISTENCY_CODES,
    ISSUE_TYPES,
    TRIAGE_FINDINGS,
    Finding,
    findings_outcome,
    missing_summary,
    triage_case,
)
from tests.reference import MAPPINGS_DIR

BASE = "https://source.test/fhir"
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
NIR = "295109912611193"
CASE_PATIENT = PatientIdentifier(INS_NIR_TEST, NIR)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
TERMS = load_terminology()
RULES = load_triage_rules()



def absolute(ref: str) -> str:
    return ref if "://" in ref else f"{BASE}/{ref}"


def doc(n: int, code: str, when: str, *, subject: str = "Patient/p1", master: str | None = None,
        content: bytes | None = None, date: str | None = None) -> tuple[Resource, bytes]:
    """A PDSm-shaped DocumentReference (type, date, context.period.start) and its bytes."""
    resource = {
        "resourceType": "DocumentReference", "id": f"d{n}", "status": "current",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": master or f"urn:oid:1.2.250.99.{n}"},
        "type": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": subject},
        "date": date or f"{when}T18:00:00+01:00",
        "context": {"period": {"start": when}},
        "content": [{"attachment": {"url": f"{BASE}/Binary/b{n}", "contentType": "application/pdf"}}],
    }
    return resource, content if content is not None else f"%PDF-1.4 document {n}".encode()


def study(n: int, modality: str, started: str, subject: str = "Patient/p1") -> Resource:
    return {"resourceType": "ImagingStudy", "id": f"s{n}", "status": "available", "subject": {"reference": subject},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.840.99.{n}"}],
            "started": started, "modality": [{"system": DCM, "code": modality}],
            "series": [{"uid": f"1.2.840.99.{n}.1", "modality": {"system": DCM, "code": modality}}]}


def patient(identifiers: list[Resource] | None = None) -> Resource:
    return {"resourceType": "Patient", "id": "p1",
            "identifier": identifiers if identifiers is not None else [{"system": INS_NIR_TEST, "value": NIR}],
            "name": [{"family": "Lefèvre", "given": ["Hélène"]}]}


def oncology_docs() -> list[tuple[Resource, bytes]]:
    """Everything an oncology second opinion asks for, recent enough."""
    return [doc(1, "60568-3", "2026-10-01"), doc(2, "18748-4", "2026-10-15"), doc(3, "77604-7", "2026-10-20"),
            doc(4, "11488-4", "2026-10-20"), doc(5, "11502-2", "2026-11-10"), doc(6, "51969-4", "2026-10-05")]


def case_bundle(tmp_path: Path, docs: list[tuple[Resource, bytes]], studies: list[Resource] | None = None,
                the_patient: Resource | None = None) -> Resource:
    packaged = []
    for i, (resource, data) in enumerate(docs):
        path = tmp_path / f"doc-{i}.pdf"
        path.write_bytes(data)
        sha1 = base64.b64encode(hashlib.sha1(data).digest()).decode()
        packaged.append(PackagedDocument(resource, path, "application/pdf", len(data), sha1))
    content = CaseContent(patient=the_patient or patient(), documents=packaged,
                          studies=studies if studies is not None else [study(1, "CT", "2026-10-15T09:00:00+02:00")],
                          endpoints={})
    return build_case_bundle(content, terminology=TERMS, absolute=absolute, now=NOW, new_uuid=uuid.uuid4)


def triage(bundle: Resource, specialty: str = "oncology", kind: str = "second-opinion",
           problems: list[Problem] | None = None, **kwargs: Any) -> list[Finding]:
    return triage_case(bundle, specialty=specialty, kind=kind, patient_identifier=CASE_PATIENT,
                       problems=problems or [], rules=kwargs.pop("rules", RULES), now=kwargs.pop("now", NOW), **kwargs)


def codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.severity, f.code) for f in findings]


# -- completeness ---------------------------------------------------------------------------------------------


def test_a_complete_oncology_case_has_no_findings(tmp_path: Path) -> None:
    findings = triage(case_bundle(tmp_path, oncology_docs()))
    assert findings == []
    outcome = findings_outcome(findings)
    validate(outcome)
    assert outcome["issue"][0]["severity"] == "information"
    assert missing_summary(findings) == "Rien ne manque / Nothing is missing"


def test_a_case_without_its_pathology_report_is_blocked_and_says_what_is_missing(tmp_path: Path) -> None:
    docs = [d for d in oncology_docs() if d[0]["type"]["coding"][0]["code"] != "60568-3"]
    findings = triage(case_bundle(tmp_path, docs))
    assert codes(findings) == [("blocking", "missing-document")]
    missing = findings[0]
    assert missing.missing == "pathology"
    assert missing.text_fr == ("Document requis absent : compte rendu d'anatomie et cytologie pathologiques "
                               "(60568-3 ou 11526-1).")
    assert missing.text_en == "Required document missing: pathology report (60568-3 or 11526-1)."
    summary = missing_summary(findings)
    assert "\n" not in summary
    assert "anatomie et cytologie pathologiques" in summary and "pathology report" in summary
    outcome = findings_outcome(findings)
    validate(outcome)
    issue = outcome["issue"][0]
    assert (issue["severity"], issue["code"]) == ("error", "incomplete")
    assert issue["details"]["coding"] == [{"system": TRIAGE_FINDINGS, "code": "missing-document"}]
    assert issue["details"]["text"] == missing.text_en
    french = issue["details"]["_text"]["extension"][0]
    assert french["url"] == "http://hl7.org/fhir/StructureDefinition/translation"
    assert {"url": "content", "valueString": missing.text_fr} in french["extension"]


def test_the_older_pathology_code_11526_1_is_accepted(tmp_path: Path) -> None:
    docs = [doc(1, "11526-1", "2026-10-01"), *oncology_docs()[1:]]
    assert triage(case_bundle(tmp_path, docs)) == []


def test_imaging_older_than_90_days_is_outdated(tmp_path: Path) -> None:
    docs = [d if d[0]["id"] != "d2" else doc(2, "18748-4", "2026-07-01") for d in oncology_docs()]
    findings = triage(case_bundle(tmp_path, docs, [study(1, "CT", "2026-07-01T09:00:00+02:00")]))
    assert codes(findings) == [("warning", "outdated-document"), ("warning", "outdated-imaging")]
    report, imaging = findings
    assert report.missing == "imaging-report" and report.resource == f"{BASE}/DocumentReference/d2"
    assert "2026-07-01" in report.text_fr and "90 jours" in report.text_fr and "90 days" in report.text_en
    assert imaging.missing == "staging-imaging" and imaging.resource == f"{BASE}/ImagingStudy/s1"


def test_expected_imaging_missing_blocks_a_tumor_board_case(tmp_path: Path) -> None:
    docs = [*oncology_docs(), doc(7, "34794-8", "2026-10-25")]
    findings = triage(case_bundle(tmp_path, docs, [study(1, "US", "2026-10-15")]), kind="tumor-board-opinion")
    assert ("blocking", "missing-imaging") in codes(findings)


def test_a_tumor_board_case_needs_the_rcp_report(tmp_path: Path) -> None:
    findings = triage(case_bundle(tmp_path, oncology_docs()), kind="tumor-board-opinion")
    assert [(f.severity, f.code, f.missing) for f in findings] == [("blocking", "missing-document", "rcp-report")]


def test_optional_documents_are_information_only(tmp_path: Path) -> None:
    docs = [d for d in oncology_docs() if d[0]["id"] != "d6"]  # no genetics report
    findings = triage(case_bundle(tmp_path, docs))
    assert [(f.severity, f.missing) for f in findings] == [("information", "genetics")]
    assert findings_outcome(findings)["issue"][0]["code"] == "informational"


# -- consistency ----------------------------------------------------------------------------------------------


def test_an_rcp_report_older_than_the_latest_pathology_report_is_flagged(tmp_path: Path) -> None:
    docs = [doc(1, "60568-3", "2026-09-01"), doc(9, "60568-3", "2026-11-05"), *oncology_docs()[1:],
            doc(7, "34794-8", "2026-10-25")]
    docs = [d if d[0]["id"] != "d3" else doc(3, "77604-7", "2026-11-06") for d in docs]  # the plan is newer
    findings = triage(case_bundle(tmp_path, docs), kind="tumor-board-opinion")
    assert codes(findings) == [("warning", "plan-predates-pathology")]
    assert findings[0].resource == f"{BASE}/DocumentReference/d7"
    assert "2026-10-25" in findings[0].text_en and "2026-11-05" in findings[0].text_en
    assert findings[0].text_fr.startswith("Compte rendu de réunion de concertation pluridisciplinaire (RCP)")


def test_a_plan_written_the_day_of_the_pathology_report_is_not_flagged(tmp_path: Path) -> None:
    docs = [doc(1, "60568-3", "2026-10-20"), *oncology_docs()[1:]]
    assert triage(case_bundle(tmp_path, docs)) == []


def test_a_document_dated_in_the_future_is_flagged(tmp_path: Path) -> None:
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-11-01", date="2026-12-25T10:00:00+01:00")]
    findings = triage(case_bundle(tmp_path, docs))
    assert codes(findings) == [("warning", "future-dated")]
    assert findings[0].resource == f"{BASE}/DocumentReference/d8"
    assert "2026-12-25" in findings[0].text_fr


def test_a_date_without_time_that_is_already_today_east_of_utc_is_not_the_future(tmp_path: Path) -> None:
    late_evening = datetime(2026, 11, 21, 23, 30, tzinfo=UTC)  # already the 22nd in Paris
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-11-22", date="2026-11-22")]
    assert triage(case_bundle(tmp_path, docs), now=late_evening) == []


def test_two_documents_with_the_same_content_are_duplicates(tmp_path: Path) -> None:
    same = b"%PDF-1.4 the same letter twice"
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-10-02", content=same), doc(9, "11490-0", "2026-10-03",
                                                                               content=same)]
    findings = triage(case_bundle(tmp_path, docs))
    assert codes(findings) == [("warning", "duplicate-document")]
    assert findings[0].resource == f"{BASE}/DocumentReference/d9"
    assert f"{BASE}/DocumentReference/d8" in findings[0].text_en and "SHA-1" in findings[0].text_en


def test_two_documents_with_the_same_master_identifier_are_duplicates(tmp_path: Path) -> None:
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-10-02", master="urn:oid:1.2.250.7"),
            doc(9, "11490-0", "2026-10-02", master="urn:oid:1.2.250.7")]
    findings = triage(case_bundle(tmp_path, docs))
    assert codes(findings) == [("warning", "duplicate-document")]
    assert "masterIdentifier" in findings[0].text_en


def test_a_document_about_another_patient_is_blocking(tmp_path: Path) -> None:
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-10-02", subject="Patient/someone-else")]
    findings = triage(case_bundle(tmp_path, docs))
    assert codes(findings) == [("blocking", "patient-mismatch")]
    assert findings[0].resource == f"{BASE}/DocumentReference/d8"


def test_a_study_about_another_patient_is_blocking(tmp_path: Path) -> None:
    studies = [study(1, "CT", "2026-10-15"), study(2, "MR", "2026-10-15", subject=f"{BASE}/Patient/p2")]
    findings = triage(case_bundle(tmp_path, oncology_docs(), studies))
    assert codes(findings) == [("blocking", "patient-mismatch")]
    assert findings[0].resource == f"{BASE}/ImagingStudy/s2"


def test_the_patient_must_carry_the_case_ins_and_not_only_the_billing_number(tmp_path: Path) -> None:
    billing = {"system": INS_NIR_TEST, "value": NIR,
               "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NH"}]}}
    for identifiers in ([], [billing], [{"system": INS_NIR_TEST, "value": "253072B07300470"}]):
        findings = triage(case_bundle(tmp_path, oncology_docs(), the_patient=patient(identifiers)))
        assert codes(findings) == [("blocking", "patient-identity")]


def test_an_imaging_study_without_a_report_dated_on_or_after_it_is_flagged(tmp_path: Path) -> None:
    studies = [study(1, "CT", "2026-10-15T09:00:00+02:00"), study(2, "PT", "2026-11-10T09:00:00+01:00")]
    findings = triage(case_bundle(tmp_path, oncology_docs(), studies))
    assert codes(findings) == [("warning", "imaging-without-report")]
    assert findings[0].resource == f"{BASE}/ImagingStudy/s2"
    assert "2026-11-10" in findings[0].text_fr


def test_superseded_versions_are_reported_as_information(tmp_path: Path) -> None:
    problems = [Problem("superseded", "a newer version replaces this document",
                        source_url=f"{BASE}/DocumentReference/old")]
    findings = triage(case_bundle(tmp_path, oncology_docs()), problems=problems)
    assert codes(findings) == [("information", "superseded-version")]
    assert findings[0].resource == f"{BASE}/DocumentReference/old"


def test_an_unreadable_attachment_is_a_warning(tmp_path: Path) -> None:
    problems = [Problem("hash-mismatch", "bytes do not match", master_identifier="urn:oid:1.2.250.99.42",
                        source_url=f"{BASE}/DocumentReference/d42")]
    findings = triage(case_bundle(tmp_path, oncology_docs()), problems=problems)
    assert codes(findings) == [("warning", "attachment-unreadable")]
    assert findings[0].resource == f"{BASE}/DocumentReference/d42" and "hash-mismatch" in findings[0].text_en


def test_an_unreadable_pathology_report_blocks_as_the_required_document_it_is(tmp_path: Path) -> None:
    pathology, _ = doc(1, "60568-3", "2026-10-01")
    problems = [Problem("retrieve-failed", "HTTP 503", master_identifier="urn:oid:1.2.250.99.1",
                        source_url=f"{BASE}/DocumentReference/d1")]
    findings = triage(case_bundle(tmp_path, oncology_docs()[1:]), problems=problems, left_out=[pathology])
    assert [(f.severity, f.code, f.missing) for f in findings] == [
        ("blocking", "required-document-unreadable", "pathology")]
    assert "retrieve-failed" in findings[0].text_fr
    # without the left-out documents the type is unknown: still blocked, for the missing pathology report
    findings = triage(case_bundle(tmp_path, oncology_docs()[1:]), problems=problems)
    assert codes(findings) == [("blocking", "missing-document"), ("warning", "attachment-unreadable")]


def test_binary_data_is_never_read(tmp_path: Path) -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"Binary data was read ({name})")

    bundle = case_bundle(tmp_path, oncology_docs())
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "Binary":
            entry["resource"]["data"] = Untouchable()
    assert triage(bundle) == []


# -- the rules are data -------------------------------------------------------------------------------------


def test_adding_a_specialty_needs_only_an_extra_rule_file(tmp_path: Path) -> None:
    extra = tmp_path / "dermatology-rules.json"
    extra.write_text(json.dumps({
        "resourceType": "fhir-bridge-triage-rules", "id": "dermatology-rules",
        "documentGroups": {"skin-photographs": {"label": {"fr": "photographies cutanées", "en": "skin photographs"},
                                                "types": [{"system": LOINC, "code": "72170-4"}]}},
        "rules": [{"specialty": "dermatology", "kinds": ["second-opinion"],
                   "documents": [{"group": "skin-photographs", "maxAgeDays": 30, "severityIfMissing": "blocking",
                                  "severityIfOutdated": "blocking"},
                                 {"group": "pathology", "maxAgeDays": None, "severityIfMissing": "warning",
                                  "severityIfOutdated": "warning"}],
                   "imaging": []}],
    }), encoding="utf-8")
    rules = load_triage_rules(MAPPINGS_DIR, extra=[extra])
    docs = [doc(1, "60568-3", "2026-10-01"), doc(2, "18748-4", "2026-10-15")]
    findings = triage(case_bundle(tmp_path, docs), specialty="dermatology", rules=rules)
    assert [(f.severity, f.code, f.missing) for f in findings] == [("blocking", "missing-document", "skin-photographs")]
    assert "photographies cutanées" in findings[0].text_fr
    docs.append(doc(3, "72170-4", "2026-11-15"))
    assert triage(case_bundle(tmp_path, docs), specialty="dermatology", rules=rules) == []
    assert triage(case_bundle(tmp_path, oncology_docs()), rules=rules) == []  # the shipped rules still apply


def test_a_specialty_without_rules_still_gets_the_consistency_checks(tmp_path: Path) -> None:
    docs = [*oncology_docs(), doc(8, "11490-0", "2026-10-02", subject="Patient/someone-else")]
    findings = triage(case_bundle(tmp_path, docs), specialty="dermatology")
    assert codes(findings) == [("blocking", "patient-mismatch"), ("warning", "no-triage-rules")]


def test_every_specialty_and_kind_has_rules() -> None:
    specialties = [c["code"] for c in TERMS.resources["specialty"]["concept"]]
    kinds = ["second-opinion", "tumor-board-opinion"]
    assert all(RULES.rule_for(s, k) is not None for s in specialties for k in kinds)


def test_finding_codes_are_the_ones_of_the_triage_findings_code_system() -> None:
    system = TERMS.resources["triage-findings"]
    validate(system)
    listed = {c["code"]: c for c in system["concept"]}
    assert set(listed) == set(ISSUE_TYPES)
    assert CONSISTENCY_CODES.issubset(listed)
    for code, concept in listed.items():
        assert concept["property"] == [{"code": "issue-type", "valueCode": ISSUE_TYPES[code]}]
        assert concept["designation"][0]["language"] == "fr-FR"


def test_the_rules_file_sits_in_mappings_without_troubling_the_terminology_loader() -> None:
    assert TERMS.resources["triage-rules"]["resourceType"] == "fhir-bridge-triage-rules"
    assert TERMS.display(TRIAGE_FINDINGS, "missing-document", "fr") == "Document absent"


@pytest.mark.parametrize(("change", "message"), [
    ({"rules": [{"specialty": "x", "kinds": ["second-opinion"], "documents": [
        {"group": "pathology", "severityIfMissing": "fatal", "severityIfOutdated": "warning"}]}]}, "severity"),
    ({"rules": [{"specialty": "x", "kinds": ["second-opinion"], "documents": [
        {"group": "no-such-group", "severityIfMissing": "blocking", "severityIfOutdated": "warning"}]}]},
     "no-such-group"),
    ({"rules": [{"specialty": "x", "kinds": "second-opinion"}]}, "kinds"),
    ({"id": "another-name"}, "id"),
])
def test_a_broken_rule_file_is_refused_at_load_naming_the_file(tmp_path: Path, change: Resource,
                                                               message: str) -> None:
    extra = tmp_path / "broken.json"
    extra.write_text(json.dumps({"resourceType": "fhir-bridge-triage-rules", "id": "broken", **change}), "utf-8")
    with pytest.raises(InvalidInput, match=message) as caught:
        load_triage_rules(MAPPINGS_DIR, extra=[extra])
    assert "broken.json" in str(caught.value)


def test_findings_outcome_is_valid_r4_with_a_mix_of_severities(tmp_path: Path) -> None:
    docs = [d for d in oncology_docs() if d[0]["id"] not in ("d1", "d6")]
    docs.append(doc(8, "11490-0", "2026-10-02", date="2027-01-01"))
    findings = triage(case_bundle(tmp_path, docs))
    assert [f.severity for f in findings] == ["blocking", "warning", "information"]
    outcome = findings_outcome(findings)
    validate(outcome)
    assert [i["severity"] for i in outcome["issue"]] == ["error", "warning", "information"]
    assert [i["code"] for i in outcome["issue"]] == ["incomplete", "business-rule", "informational"]
    assert outcome["issue"][1]["diagnostics"].endswith(f"[{BASE}/DocumentReference/d8]")
    assert findings[1].to_json()["resource"] == f"{BASE}/DocumentReference/d8"

"""Reading worklists (CSV and NDJSON): one request per line, stable identifiers, bad lines reported alone."""

from __future__ import annotations

import json

import pytest

from fhir_bridge.adapters.reference_data import load_terminology
from fhir_bridge.case.intake import check_request
from fhir_bridge.case.worklist import DEFAULT_REQUEST_SYSTEM, Worklist, read_worklist
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.identity import INS_NIR, INS_NIR_TEST, nir_key

TERMS = load_terminology()
NIR = "295109912611193"
OTHER = f"1850775123456{nir_key('1850775123456'):02d}"
BAD_KEY = NIR[:-2] + "00"
HEADER = "patient,specialty,question,deadline,requester\n"


def read(text: str, filename: str = "list.csv") -> Worklist:
    return read_worklist(text.encode(), filename=filename, terminology=TERMS)


def test_a_csv_line_becomes_a_request_the_api_accepts() -> None:
    worklist = read(HEADER + f'{INS_NIR_TEST}|{NIR},oncology,"Confirmer le diagnostic, svp",2026-12-31,Dr Martin\n')
    [line] = worklist.lines
    sr = line.request
    check_request(sr, TERMS)
    assert sr["subject"]["identifier"] == {"system": INS_NIR_TEST, "value": NIR}
    assert sr["reasonCode"] == [{"text": "Confirmer le diagnostic, svp"}]
    assert sr["occurrenceDateTime"] == "2026-12-31"
    assert sr["requester"] == {"display": "Dr Martin"}
    assert line.system == DEFAULT_REQUEST_SYSTEM and line.value.startswith("wl-")
    assert line.if_none_exist == f"identifier={DEFAULT_REQUEST_SYSTEM}|{line.value}"
    assert sr["identifier"] == [{"system": DEFAULT_REQUEST_SYSTEM, "value": line.value}]


def test_the_same_line_gets_the_same_identifier_whatever_its_place_or_spacing() -> None:
    first = read(HEADER + f"{INS_NIR_TEST}|{NIR},oncology,Question  un,2026-12-31,Dr A\n")
    again = read(HEADER + f"{INS_NIR_TEST}|{OTHER},oncology,Autre,2026-12-31,Dr A\n"
                 f"{INS_NIR_TEST}|{NIR[:5]} {NIR[5:]},oncology, Question un ,2026-12-31,Dr A\n")
    edited = read(HEADER + f"{INS_NIR_TEST}|{NIR},oncology,Question deux,2026-12-31,Dr A\n")
    value = first.lines[0].value
    assert again.lines[1].value == value
    assert edited.lines[0].value != value


def test_an_id_column_is_the_request_identifier() -> None:
    worklist = read("id;patient;specialty;question\nRCP-2026-11-07-01;" + NIR + ";oncology;Q\n")
    [line] = worklist.lines
    assert line.value == "RCP-2026-11-07-01"
    assert line.request["subject"]["identifier"] == {"system": INS_NIR, "value": NIR}  # bare NIR: INS-NIR


def test_bad_lines_are_reported_by_number_and_the_rest_is_kept() -> None:
    text = HEADER + "\n".join([
        f"{INS_NIR_TEST}|{NIR},oncology,ok,2026-12-31,Dr A",          # 2 fine
        f"{INS_NIR_TEST}|{BAD_KEY},oncology,q,2026-12-31,Dr A",       # 3 bad NIR key
        f"{INS_NIR_TEST}|{NIR},astrology,q,2026-12-31,Dr A",          # 4 unknown specialty
        f'{INS_NIR_TEST}|{NIR},oncology,"never closed,2026-12-31,Dr A',  # 5 broken quoting
        f'{INS_NIR_TEST}|{NIR},oncology,"a"b,2026-12-31,Dr A',        # 6 stray quote
        "",                                                            # 7 blank: skipped
        f"{INS_NIR_TEST}|{NIR},oncology,q,31/12/2026,Dr A",           # 8 bad deadline
        f"{INS_NIR_TEST}|{NIR},oncology,q",                           # 9 too few fields
        f"{INS_NIR_TEST}|{OTHER},cardiology,ok aussi,,",              # 10 fine
    ]) + "\n"
    worklist = read(text)
    assert [line.number for line in worklist.lines] == [2, 10]
    reasons = {e.number: e.reason for e in worklist.errors}
    assert sorted(reasons) == [3, 4, 5, 6, 8, 9]
    assert "control key" in reasons[3] and reasons[3].startswith("patient:")
    assert "unknown specialty" in reasons[4]
    assert "quoting" in reasons[5] and "quoting" in reasons[6]
    assert "deadline" in reasons[8]
    assert "fields" in reasons[9]
    assert worklist.total == 8
    assert not any(NIR in r or BAD_KEY in r or "astrology" in r for r in reasons.values())


def test_ndjson_lines_take_the_same_fields() -> None:
    good = {"patient": f"{INS_NIR_TEST}|{NIR}", "specialty": "neurology", "question": "Avis", "kind":
            "tumor-board-opinion", "priority": "urgent", "plan": "Chirurgie"}
    text = "\n".join([json.dumps(good), "{not json", json.dumps([1]), json.dumps({**good, "colour": "red"}),
                      json.dumps({**good, "priority": "whenever"})])
    worklist = read(text, "list.ndjson")
    [line] = worklist.lines
    assert line.request["priority"] == "urgent" and line.request["note"] == [{"text": "Chirurgie"}]
    assert line.request["code"]["coding"][0]["code"] == "tumor-board-opinion"
    assert {e.number for e in worklist.errors} == {2, 3, 4, 5}


def test_one_request_id_with_two_different_contents_is_refused_on_the_second_line() -> None:
    text = "id,patient,specialty,question\nR1," + NIR + ",oncology,Q\nR1," + NIR + ",oncology,Other\nR1," + NIR \
        + ",oncology,Q\n"
    worklist = read(text)
    assert [line.number for line in worklist.lines] == [2, 4]
    [error] = worklist.errors
    assert error.number == 3 and "line 2" in error.reason


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("patient,speciality,question\n", "unknown column 'speciality'"),
    ("patient,question\n", "no 'specialty' column"),
    ('patient,"specialty,question\n', "broken CSV quoting"),
])
def test_a_file_that_is_not_a_worklist_is_bad_input(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        read(text)

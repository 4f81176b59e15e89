"""Audit core: BALP-shaped AuditEvents that are valid R4, and a hash chain that finds the first broken link."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.audit.chain import (
    CHAIN_URL,
    GENESIS,
    ChainLink,
    Checkpoint,
    canonical_bytes,
    chain_hash,
    chain_link,
    seal,
    sign_checkpoint,
    verify_chain,
)
from fhir_bridge.audit.events import (
    BALP_ENTITY_TYPE,
    DCM,
    IHE_EVENT_TYPE,
    RESTFUL_INTERACTION,
    Party,
    delivery_event,
    index_terms,
    job_event,
    outcome_of,
    rest_event,
    source_event,
)
from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.identity import INS_NIR_TEST, PatientIdentifier
from fhir_bridge.fhir.resources import dumps, validate

T0 = datetime(2026, 3, 2, 9, 30, 15, 250000, tzinfo=UTC)
PATIENT = PatientIdentifier(INS_NIR_TEST, "295109912611193")
CLIENT = Party("platform-a", system="https://bridge.test/auth/token", address="10.1.2.3", jti="tok-77")
BRIDGE = Party("https://bridge.test/fhir", address="https://bridge.test/fhir", name="fhir-bridge")
SOURCE = Party("https://source.test/fhir", address="https://source.test/fhir")

Event = dict[str, Any]


def agent_role(event: Event, party: Party) -> str:
    agent = next(a for a in event["agent"] if a["who"]["identifier"]["value"] == party.id)
    return str(agent["type"]["coding"][0]["code"])


def entity(event: Event, role: str) -> Event:
    return next(e for e in event["entity"] if e.get("role", {}).get("code") == role)


def rest(interaction: str, **extra: Any) -> Event:
    args: dict[str, Any] = {"interaction": interaction, "resource_type": "Task", "status": 200, "client": CLIENT,
                            "bridge": BRIDGE, "recorded": T0, "patient": PATIENT, "request_id": "req-1"}  # fmt: skip
    return rest_event(**(args | extra))


ALL_BUILT = {
    "read": lambda: rest("read", resource_id="t1"),
    "vread": lambda: rest("vread", resource_id="t1", version_id="3"),
    "history-instance": lambda: rest("history-instance", resource_id="t1"),
    "search-type": lambda: rest("search-type", query=b"GET /fhir/Task?patient.identifier=x|y"),
    "create": lambda: rest("create", resource_type="ServiceRequest", resource_id="sr1", status=201),
    "create-refused": lambda: rest("create", resource_type="ServiceRequest", status=422),
    "update": lambda: rest("update", resource_id="t1", version_id="4", status=412),
    "delete": lambda: rest("delete", resource_id="t1", status=204),
    "operation": lambda: rest("operation", resource_type="AuditEvent", operation="$verify", patient=None),
    "no-client-details": lambda: rest("read", resource_id="t1", client=Party("c"), patient=None, request_id=None),
    "ITI-67": lambda: source_event(transaction="ITI-67", status=200, bridge=BRIDGE, source=SOURCE, patient=PATIENT,
                                   query="GET https://source.test/fhir/DocumentReference?patient=p1&status=current"),
    "ITI-68": lambda: source_event(transaction="ITI-68", status=None, bridge=BRIDGE, source=SOURCE, patient=PATIENT,
                                   document="https://source.test/fhir/Binary/b1", outcome_desc="timeout"),
    "ITI-78": lambda: source_event(transaction="ITI-78", status=200, bridge=BRIDGE, source=SOURCE, patient=PATIENT,
                                   query="GET https://source.test/fhir/Patient?identifier=x|y", request_id="r"),
    "ITI-65": lambda: source_event(transaction="ITI-65", status=200, bridge=BRIDGE, source=SOURCE, patient=PATIENT,
                                   submission_set="urn:oid:1.2.3.4.5"),
    "ITI-65-list": lambda: source_event(transaction="ITI-65", status=500, bridge=BRIDGE, source=SOURCE,
                                        patient=PATIENT, submission_set="List/ss1"),
    "job": lambda: job_event(step="triage", case="Task/t1/_history/2", bridge=BRIDGE, patient=PATIENT, job_id="j-9"),
    "job-failed": lambda: job_event(step="collect", case="Task/t1", bridge=BRIDGE, patient=None, action="C",
                                    outcome="8", outcome_desc="source-unavailable"),
    "delivery": lambda: delivery_event(report="DiagnosticReport/dr1", status=202, bridge=BRIDGE, recipient=CLIENT,
                                       patient=PATIENT, case="Task/t1", request_id="req-2"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ALL_BUILT))
def test_every_audit_event_is_valid_r4_as_built_and_as_stored(name: str) -> None:
    event = ALL_BUILT[name]()
    validate(event)
    stored, _ = seal(event, 7, GENESIS)
    validate(stored)
    assert stored["id"] == "7"


def test_a_read_makes_the_client_the_destination_and_records_the_token_and_the_patient() -> None:
    event = rest("read", resource_id="t1", version_id="2")
    assert event["type"]["code"] == "rest"
    assert event["subtype"] == [{"system": RESTFUL_INTERACTION, "code": "read"}]
    assert (event["action"], event["outcome"]) == ("R", "0")
    assert agent_role(event, CLIENT) == "110152" and agent_role(event, BRIDGE) == "110153"
    client = event["agent"][0]
    assert client["requestor"] is True and event["agent"][1]["requestor"] is False
    assert client["who"]["identifier"] == {"system": CLIENT.system, "value": "platform-a"}
    assert client["policy"] == ["urn:ietf:params:oauth:jti:tok-77"]
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    patient = entity(event, "1")
    assert patient["type"]["code"] == "1"
    assert patient["what"]["identifier"] == {"system": INS_NIR_TEST, "value": "295109912611193"}
    assert entity(event, "4")["what"]["reference"] == "Task/t1/_history/2"
    request = next(e for e in event["entity"] if e["type"]["system"] == BALP_ENTITY_TYPE)
    assert request["type"]["code"] == "XrequestId" and request["what"]["identifier"]["value"] == "req-1"


def test_a_search_makes_the_client_the_source_and_keeps_the_raw_query_in_base64() -> None:
    raw = b"GET /fhir/Task?patient.identifier=urn:oid:1.2.250.1.213.1.4.10|295109912611193&_count=5"
    event = rest("search-type", query=raw)
    assert event["action"] == "E"
    assert agent_role(event, CLIENT) == "110153" and agent_role(event, BRIDGE) == "110152"
    query = entity(event, "24")
    assert base64.b64decode(query["query"]) == raw and "what" not in query


@pytest.mark.parametrize(("interaction", "action"), [("create", "C"), ("update", "U"), ("delete", "D"),
                                                     ("operation", "E"), ("vread", "R")])  # fmt: skip
def test_the_action_follows_the_interaction(interaction: str, action: str) -> None:
    assert rest(interaction, resource_id="x", operation="$verify")["action"] == action


@pytest.mark.parametrize(("status", "outcome"), [(200, "0"), (201, "0"), (304, "0"), (401, "4"), (404, "4"),
                                                 (422, "4"), (500, "8"), (503, "8"), (None, "12")])  # fmt: skip
def test_outcome_follows_the_http_status(status: int | None, outcome: str) -> None:
    assert outcome_of(status) == outcome


def test_outbound_mhd_calls_carry_their_iti_event_type() -> None:
    find = ALL_BUILT["ITI-67"]()
    assert [c["code"] for c in find["subtype"]] == ["search-type", "ITI-67"]
    assert find["subtype"][1]["system"] == IHE_EVENT_TYPE
    assert agent_role(find, BRIDGE) == "110153" and agent_role(find, SOURCE) == "110152"
    assert base64.b64decode(entity(find, "24")["query"]).startswith(b"GET https://source.test/fhir/DocumentRef")
    retrieve = ALL_BUILT["ITI-68"]()
    assert [c["code"] for c in retrieve["subtype"]] == ["read", "ITI-68", "110107"]
    assert (retrieve["action"], retrieve["outcome"], retrieve["outcomeDesc"]) == ("R", "12", "timeout")
    assert agent_role(retrieve, BRIDGE) == "110152"  # the document flows to us
    assert entity(retrieve, "3")["what"]["reference"] == "https://source.test/fhir/Binary/b1"
    provide = ALL_BUILT["ITI-65"]()  # IHE.MHD.ProvideBundle.Audit.Source
    assert provide["type"] == {"system": DCM, "code": "110106", "display": "Export"}
    assert provide["subtype"] == [{"system": IHE_EVENT_TYPE, "code": "ITI-65", "display": "Provide Document Bundle"}]
    assert provide["action"] == "R" and len(provide["entity"]) == 2
    assert entity(provide, "20")["what"]["identifier"]["value"] == "urn:oid:1.2.3.4.5"


def test_builders_refuse_what_they_cannot_say() -> None:
    with pytest.raises(InvalidInput):
        rest("patch-everything")
    with pytest.raises(InvalidInput):
        rest("operation", operation=None)
    with pytest.raises(InvalidInput):
        source_event(transaction="ITI-41", status=200, bridge=BRIDGE, source=SOURCE, patient=None)
    with pytest.raises(InvalidInput):
        job_event(step="x", case="Task/1", bridge=BRIDGE, patient=None, outcome="3")


def test_index_terms_name_the_patient_the_agents_the_codes_and_the_entities() -> None:
    terms = index_terms(rest("update", resource_id="t1", version_id="4", status=412))
    assert terms["patient"] == [PATIENT.token]
    assert terms["agent"] == ["platform-a", "https://bridge.test/fhir"]
    assert terms["subtype"] == [f"{RESTFUL_INTERACTION}|update", "update"]
    assert terms["outcome"] == ["4"] and terms["action"] == ["U"]
    assert terms["entity"] == ["Task/t1"]


# --- the chain ---------------------------------------------------------------------------------------------


def chain(n: int) -> list[tuple[int, bytes]]:
    """``n`` stored events, as the log stores them: (seq, canonical bytes with the chain extension)."""
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        stored, link = seal(rest("read", resource_id=f"t{seq}"), seq, prev)
        out.append((seq, dumps(stored, canonical=True)))
        prev = link.hash
    return out


def head_of(events: list[tuple[int, bytes]]) -> ChainLink:
    head = verify_chain(events).head
    assert head is not None
    return head


def edit(stored: bytes, **changes: Any) -> bytes:
    event = json.loads(stored)
    event.update(changes)
    return dumps(event, canonical=True)


def test_the_hash_covers_the_previous_hash_and_the_canonical_event_without_meta_or_chain() -> None:
    event = rest("read", resource_id="t1")
    stored, link = seal({**event, "meta": {"versionId": "9"}}, 1, GENESIS)
    assert link == ChainLink(1, chain_hash(GENESIS, canonical_bytes(stored)), GENESIS)
    assert canonical_bytes(stored) == dumps({**event, "id": "1"}, canonical=True)
    assert chain_link(stored) == link
    assert stored["extension"][-1]["url"] == CHAIN_URL
    assert chain_hash(GENESIS, b"x") != chain_hash("1" * 64, b"x")


def test_an_intact_chain_verifies_and_ends_at_its_head() -> None:
    events = chain(50)
    result = verify_chain(events)
    assert result.ok and result.count == 50 and result.head is not None and result.head.seq == 50
    assert verify_chain(events, head=result.head).ok


@pytest.mark.parametrize("seq", [1, 17, 50])
def test_a_changed_event_is_reported_at_its_seq(seq: int) -> None:
    events = chain(50)
    events[seq - 1] = (seq, edit(events[seq - 1][1], outcome="4"))
    result = verify_chain(events)
    assert (result.ok, result.first_broken_seq, result.count) == (False, seq, seq - 1)
    assert "changed" in result.reason


def test_a_deleted_event_is_reported_where_it_was() -> None:
    events = chain(50)
    del events[16]  # seq 17
    assert verify_chain(events).first_broken_seq == 17
    assert verify_chain([(s, None if s == 17 else b) for s, b in chain(50)]).first_broken_seq == 17


def test_a_deleted_last_event_is_found_against_the_head() -> None:
    events = chain(50)
    head = verify_chain(events).head
    assert verify_chain(events[:-1], head=head).first_broken_seq == 50


def test_two_swapped_events_are_reported_at_the_first_of_them() -> None:
    events = chain(50)
    (a, body_a), (b, body_b) = events[9], events[29]
    events[9], events[29] = (a, body_b), (b, body_a)
    result = verify_chain(events)
    assert result.first_broken_seq == 10 and "reordered" in result.reason


def test_an_inserted_event_is_reported_where_the_chain_stops_holding() -> None:
    events = chain(50)
    naive = edit(events[19][1], outcome="8")  # a copy of event 20, altered, slipped in after it
    shifted = [(s + 1, b) for s, b in events[20:]]
    assert verify_chain([*events[:20], (21, naive), *shifted]).first_broken_seq == 21
    # a forgery that follows every rule still displaces the original 21, which then sits at 22
    forged, _ = seal(rest("read", resource_id="forged"), 21, head_of(events[:20]).hash)
    result = verify_chain([*events[:20], (21, dumps(forged, canonical=True)), *shifted])
    assert result.first_broken_seq == 22


def test_a_rewritten_tail_is_caught_by_the_next_signed_checkpoint() -> None:
    signer = Es384Signer.generate()
    events = chain(50)
    checkpoint = sign_checkpoint(head_of(events[:40]), "2026-03-02T10:00:00.000Z", signer)
    rewritten, prev = events[:29], head_of(events[:29]).hash
    for seq in range(30, 51):  # event 30 replaced, every later hash recomputed: the chain itself holds
        stored, link = seal(rest("read", resource_id=f"evil{seq}"), seq, prev)
        rewritten.append((seq, dumps(stored, canonical=True)))
        prev = link.hash
    assert verify_chain(rewritten).ok
    result = verify_chain(rewritten, checkpoints={40: checkpoint}, verifier=signer)
    assert result.first_broken_seq == 40 and "rewritten" in result.reason


def test_a_checkpoint_with_a_forged_signature_is_reported_at_its_seq() -> None:
    signer, other = Es384Signer.generate(), Es384Signer.generate()
    events = chain(20)
    good = sign_checkpoint(head_of(events[:10]), "2026-03-02T10:00:00.000Z", signer)
    assert verify_chain(events, checkpoints={10: good}, verifier=signer).ok
    forged = replace(good, signature=other.sign(good.payload()))
    assert verify_chain(events, checkpoints={10: forged}, verifier=signer).first_broken_seq == 10
    moved = replace(good, time="2026-03-02T11:00:00.000Z")  # signed payload no longer matches
    assert verify_chain(events, checkpoints={10: moved}, verifier=signer).first_broken_seq == 10
    assert Checkpoint.from_json(good.to_json()) == good


def test_verification_can_start_after_a_retention_anchor() -> None:
    events = chain(30)
    anchor = head_of(events[:12])
    result = verify_chain(events[12:], start=anchor)
    assert result.ok and result.count == 18
    assert verify_chain(events[13:], start=anchor).first_broken_seq == 13


def test_a_decimal_in_an_event_keeps_its_digits_through_the_chain() -> None:
    event = rest("read", resource_id="t1")
    event["extension"] = [
        {"url": "https://fhir-bridge.dev/fhir/StructureDefinition/x", "valueDecimal": Decimal("1.50")}
    ]
    stored, link = seal(event, 1, GENESIS)
    body = dumps(stored, canonical=True)
    assert b"1.50" in body
    assert verify_chain([(1, body)]).ok
    assert chain_link(json.loads(body)) == link

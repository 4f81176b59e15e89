"""Pseudonymised cases for reviewers abroad (fhir_bridge.access.pseudonym): no INS, name, birth day, address or telecom
left outside the documents themselves; a stable pseudonym per case; the way back stays in the bridge."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.access.pseudonym import (
    PSEUDONYM_SYSTEM,
    CasePseudonyms,
    pseudonymise_bundle,
    pseudonymise_view,
    reidentify_opinion,
)
from fhir_bridge.access.scopes import AccessContext
from fhir_bridge.adapters.reference_data import load_networks, load_registry, load_terminology
from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.signing import Es384Signer
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.case.packaging import FileBase64, build_case_bundle
from fhir_bridge.case.signature import check_bundle_signature
from fhir_bridge.case.tasks import new_task
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.errors import BusinessRuleViolation, Forbidden, InvalidInput, NotFound
from fhir_bridge.fhir.identity import NIR_SYSTEMS, PatientIdentifier
from fhir_bridge.fhir.resources import dumps, loads, validate
from fhir_bridge.sandbox.app import SandboxConfig, create_app
from fhir_bridge.workflow.bridge import Bridge as UseCases
from fhir_bridge.workflow.collect import collect_case
from tests.fakes import FakeSource, InMemoryBlobs, InMemoryQueue, InMemoryStore, fake_source_factory, make_bridge
from tests.unit.test_cases import LAB_ONLY_RULES, NIR, PATIENT, output_reference, world

TERMS = load_terminology()
KEY = bytes(range(32))
SANDBOX = "http://sandbox.test"


@dataclass
class SandboxCase:
    bundle: dict[str, Any]
    patient: dict[str, Any]  # the source's Patient, as pulled
    summary: dict[str, Any]  # the sandbox's view of the patient (INS, name)


async def _sandbox_cases(tmp_path: Path, count: int) -> list[SandboxCase]:
    app = create_app(SandboxConfig(seed=3, patients=count, today=date(2026, 11, 22), corrupt=False))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=SANDBOX) as client:
        summary = (await client.get("/_sandbox/world")).json()
    cases = []
    async with SourceClient(f"{SANDBOX}/fhir", SourceSettings(), transport=httpx.ASGITransport(app=app)) as source:
        for n, patient in enumerate(summary["patients"]):
            identifier = PatientIdentifier(patient["identifier"]["system"], patient["identifier"]["value"])
            collected = await collect_case(source, identifier, tmp_path / f"p{n}", TERMS)
            bundle = build_case_bundle(collected.content, terminology=TERMS, absolute=source.absolute,
                                       now=datetime(2026, 11, 22, tzinfo=UTC))
            cases.append(SandboxCase(bundle, collected.content.patient, patient))
    return cases


@pytest.fixture(scope="module")
def sandbox_cases(tmp_path_factory: pytest.TempPathFactory) -> list[SandboxCase]:
    return asyncio.run(_sandbox_cases(tmp_path_factory.mktemp("sandbox-cases"), 3))


def with_more_patient_data(case: SandboxCase) -> dict[str, Any]:
    """The sandbox bundle plus what other sources send: address, telecom, contact, a contained Patient in
    sourcePatientInfo, displays naming the patient, an INS quoted in free text."""
    bundle = copy.deepcopy(case.bundle)
    name = case.summary["name"]
    full = f"{name['given']} {name['family']}"
    ins = case.summary["identifier"]
    for entry in bundle["entry"]:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind == "Patient":
            resource["address"] = [{"line": ["12 rue des Lilas"], "city": "Valence", "postalCode": "26000"}]
            resource["telecom"] = [{"system": "phone", "value": "+33 6 12 34 56 78"}]
            resource["contact"] = [{"name": {"family": "Voisin", "given": ["Paul"]}}]
            resource["text"] = {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{full}</div>'}
        elif kind == "DocumentReference":
            resource.setdefault("contained", []).append({
                "resourceType": "Patient", "id": "src-patient", "identifier": [ins],
                "name": [{"family": name["family"], "given": [name["given"]]}], "birthDate": case.patient["birthDate"],
                "address": [{"city": "Valence"}], "telecom": [{"system": "email", "value": "patient@example.org"}]})
            resource["context"]["sourcePatientInfo"] = {"reference": "#src-patient", "display": full}
            resource["subject"]["display"] = full
            resource["description"] = f"Compte rendu de {name['family'].upper()} (INS {ins['value']})"
        elif kind == "ImagingStudy":
            resource["subject"] = {**resource["subject"], "display": full, "identifier": ins}
    return bundle


def non_binary_text(bundle: dict[str, Any]) -> str:
    return dumps({**bundle, "entry": [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Binary"]},
                 canonical=True).decode("utf-8")


def walk(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield "", value
            yield from walk(value)


def test_a_pseudonymised_sandbox_bundle_names_nobody_outside_its_documents(sandbox_cases: list[SandboxCase]) -> None:
    pseudonyms = CasePseudonyms(KEY)
    for n, case in enumerate(sandbox_cases):
        original = with_more_patient_data(case)
        pseudonym = pseudonyms.of(f"task-{n}")
        out = pseudonymise_bundle(original, pseudonym)
        text = non_binary_text(out)
        name, ins = case.summary["name"], case.summary["identifier"]["value"]
        birth = case.patient["birthDate"]
        assert ins in non_binary_text(original) and name["family"] in non_binary_text(original)
        for secret in (ins, name["family"], name["given"], case.patient["id"], birth, "Lilas", "+33 6", "Voisin",
                       "patient@example.org"):
            assert re.search(re.escape(secret), text, re.IGNORECASE) is None, secret
        resources = [e["resource"] for e in out["entry"] if e["resource"]["resourceType"] != "Binary"]
        patients = [v for _, v in walk(resources) if isinstance(v, dict) and v.get("resourceType") == "Patient"]
        assert len(patients) == 1 + len([r for r in resources if r["resourceType"] == "DocumentReference"])
        for patient in patients:  # the bundle's and every contained one
            assert set(patient) <= {"resourceType", "id", "identifier", "gender", "birthDate", "meta"}
            assert patient["identifier"] == [{"system": PSEUDONYM_SYSTEM, "value": pseudonym}]
            assert patient["birthDate"] == birth[:4]
        assert next(r for r in resources if r["resourceType"] == "Patient")["gender"] == case.patient["gender"]
        for key, value in walk(resources):
            if key in ("identifier", "valueIdentifier") and isinstance(value, dict):
                assert value.get("system") not in NIR_SYSTEMS
        docs = [e["resource"] for e in out["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
        assert docs and all(d["context"]["sourcePatientInfo"] == {"reference": "#src-patient"} for d in docs)
        assert all(set(d["subject"]) == {"reference"} and d["subject"]["reference"].startswith("urn:uuid:")
                   for d in docs)
        studies = [e["resource"] for e in out["entry"] if e["resource"]["resourceType"] == "ImagingStudy"]
        assert studies and all(s["subject"]["identifier"]["value"] == pseudonym and "display" not in s["subject"]
                               for s in studies)
        assert all(pseudonym in d["description"] for d in docs)
        for entry in out["entry"]:
            if entry["resource"]["resourceType"] != "Binary":
                validate(loads(dumps(entry["resource"])))  # still valid R4
        # the documents themselves are passed through untouched (the README says so)
        binaries = [e for e in out["entry"] if e["resource"]["resourceType"] == "Binary"]
        assert binaries and all(isinstance(b["resource"]["data"], FileBase64) for b in binaries)
        assert binaries == [e for e in original["entry"] if e["resource"]["resourceType"] == "Binary"]


def test_the_pseudonym_is_stable_per_case_different_between_cases_and_needs_the_key() -> None:
    pseudonyms = CasePseudonyms(KEY)
    first = pseudonyms.of("task-1")
    assert first == CasePseudonyms(KEY).of("task-1") and re.fullmatch(r"CP-[A-Z2-7]{24}", first)
    assert first != pseudonyms.of("task-2")
    assert first != CasePseudonyms(bytes(32)).of("task-1")
    assert pseudonyms.belongs_to(first, "task-1") and not pseudonyms.belongs_to(first, "task-2")
    with pytest.raises(InvalidInput):
        CasePseudonyms(b"short")


def test_request_task_and_report_views_carry_the_pseudonym_only() -> None:
    ins = {"system": PATIENT["identifier"]["system"], "value": NIR}
    request = second_opinion_request(PATIENT, "R-9")
    request |= {"id": "sr-1", "subject": {"identifier": ins, "display": "Hélène Lefèvre"},
                "note": [{"text": f"Patient INS {NIR}"}]}
    task = new_task(request, "2026-11-21T12:00:00Z", None, TERMS) | {"id": "t-1"}
    report = reviewer_opinion("sr-1", PATIENT) | {"id": "dr-1"}
    pseudonym = CasePseudonyms(KEY).of("t-1")
    for resource, place in ((request, "subject"), (task, "for"), (report, "subject")):
        view = pseudonymise_view(resource, pseudonym)
        assert view[place] == {"identifier": {"system": PSEUDONYM_SYSTEM, "value": pseudonym}}
        text = json.dumps(view, ensure_ascii=False)
        assert NIR not in text and "Lefèvre" not in text
        validate(view)
        assert resource[place]["identifier"] == ins  # the stored resource is not changed


def test_an_opinion_posted_with_the_pseudonym_gets_the_ins_back() -> None:
    ins = PATIENT["identifier"]
    pseudonym = CasePseudonyms(KEY).of("t-1")
    posted = reviewer_opinion("sr-1", {"identifier": {"system": PSEUDONYM_SYSTEM, "value": pseudonym}})
    back = reidentify_opinion(posted, pseudonym, ins)
    assert back["subject"] == {"identifier": ins} and pseudonym not in json.dumps(back)
    with pytest.raises(BusinessRuleViolation):
        reidentify_opinion(posted, CasePseudonyms(KEY).of("t-2"), ins)  # another case's pseudonym
    with pytest.raises(BusinessRuleViolation):
        reidentify_opinion(reviewer_opinion("sr-1", PATIENT), pseudonym, ins)  # a reviewer abroad naming the INS


def test_reviewer_networks_are_data_and_a_typo_is_refused_at_start(tmp_path: Path) -> None:
    networks = load_networks()
    registry = load_registry()
    networks.check(registry)
    assert networks.pseudonymises(registry.reviewers["onco-de-1"].network)
    assert not networks.pseudonymises(registry.reviewers["onco-fr-1"].network)
    assert not networks.pseudonymises(None)  # the default network
    bad = json.loads((Path(__file__).parents[2] / "config" / "reviewers.json").read_text("utf-8"))
    role = next(e["resource"] for e in bad["entry"] if e["resource"].get("id") == "onco-de-1")
    next(e for e in role["extension"] if e["url"].endswith("reviewer-network"))["valueCode"] = "cross-bordr"
    (tmp_path / "reviewers.json").write_text(json.dumps(bad), "utf-8")
    with pytest.raises(InvalidInput, match="cross-bordr"):
        networks.check(load_registry(tmp_path / "reviewers.json"))
    (tmp_path / "networks.json").write_text('{"defaultNetwork": "x", "networks": {"y": {"pseudonymise": true}}}')
    with pytest.raises(InvalidInput):
        load_networks(tmp_path / "networks.json")


# -- through the case service (in-memory fakes, a real signing key) ------------------------------------------


def reader(reviewer: str | None, role: str = "reviewer") -> AccessContext:
    return AccessContext(client_id=f"c-{reviewer}", role=role, tenant="t", scopes=frozenset(), jti="j",  # type: ignore[arg-type]
                         reviewer=reviewer)


@dataclass
class Bridge:
    service: UseCases
    queue: InMemoryQueue
    signer: Es384Signer

    async def ready(self, request_id: str = "R-1") -> tuple[dict[str, Any], dict[str, Any]]:
        request = (await self.service.cases.submit_request(second_opinion_request(PATIENT, request_id),
                                                     tenant="t")).resource
        await self.queue.drain(self.service.cases.run_collect_job)
        return request, await self.service.book.for_request(request["id"])

    async def read(self, task: dict[str, Any], who: AccessContext | None) -> bytes:
        bundle_id = output_reference(task, "case-bundle").split("/")[1]
        return b"".join([c async for c in self.service.bundles.chunks(bundle_id, who)])


def binary_data(served: bytes) -> list[str]:
    return [e["resource"]["data"] for e in loads(served)["entry"] if e["resource"]["resourceType"] == "Binary"]


@pytest.fixture
def bridge(tmp_path: Path) -> Bridge:
    queue, signer = InMemoryQueue(), Es384Signer.generate()
    service = make_bridge(store=InMemoryStore(), queue=queue, blobs=InMemoryBlobs(),
                          source=fake_source_factory(FakeSource(world())), terminology=TERMS,
                          work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES,
                          signer=signer, pseudonym_key=KEY)
    return Bridge(service, queue, signer)


def test_who_reads_pseudonymised(bridge: Bridge) -> None:
    bundles = bridge.service.bundles
    assert bundles.needs_pseudonym(reader("onco-de-1")) and bundles.needs_pseudonym(reader("neuro-ch-1"))
    assert not bundles.needs_pseudonym(reader("onco-fr-1"))
    assert bundles.needs_pseudonym(reader("nobody-known")) and bundles.needs_pseudonym(reader(None))  # fail closed
    assert not bundles.needs_pseudonym(reader(None, "platform")) and not bundles.needs_pseudonym(None)


async def test_a_reviewer_abroad_reads_a_signed_pseudonymised_bundle_and_a_french_one_the_ins(bridge: Bridge) -> None:
    _, task = await bridge.ready()
    pseudonym = bridge.service.bundles.case_pseudonym(task["id"])
    abroad = await bridge.read(task, reader("onco-de-1"))
    at_home = await bridge.read(task, reader("onco-fr-1"))
    assert NIR.encode() not in abroad and pseudonym.encode() in abroad
    assert NIR.encode() in at_home and pseudonym.encode() not in at_home
    for served in (abroad, at_home):
        bundle = loads(served)
        validate(bundle)
        assert check_bundle_signature(bundle, bridge.signer.verify_unencoded, bridge.signer.key_ids).ok
    assert {"code": "PSEUDED"}.items() <= loads(abroad)["meta"]["security"][0].items()
    assert binary_data(abroad) == binary_data(at_home)  # the documents are the same, untouched
    assert await bridge.read(task, None) == at_home


async def test_the_case_is_found_from_its_pseudonym_and_the_opinion_goes_back_under_the_ins(bridge: Bridge) -> None:
    request, task = await bridge.ready()
    (_, other) = await bridge.ready("R-2")
    service, abroad = bridge.service, reader("onco-de-1")
    pseudonym = service.bundles.case_pseudonym(task["id"])
    assert pseudonym != service.bundles.case_pseudonym(other["id"])
    assert (await service.bundles.case_for_pseudonym(pseudonym))["id"] == task["id"]
    with pytest.raises(NotFound):
        await service.bundles.case_for_pseudonym(CasePseudonyms(bytes(32)).of(task["id"]))
    view = await service.bundles.reader_view(request, abroad)
    assert view["subject"] == {"identifier": {"system": PSEUDONYM_SYSTEM, "value": pseudonym}}
    assert (await service.bundles.reader_view(task, abroad))["for"] == view["subject"]
    assert await service.bundles.reader_view(request, reader("onco-fr-1")) == request
    posted = reviewer_opinion(request["id"], {"identifier": view["subject"]["identifier"]})
    body = await service.bundles.reidentified_opinion(posted, abroad)
    created = await service.opinions.submit(body)
    assert created.resource["subject"]["identifier"] == request["subject"]["identifier"]
    shown = await service.bundles.reader_view(created.resource, abroad)
    assert shown["subject"] == view["subject"] and NIR not in json.dumps(shown)
    wrong_case = reviewer_opinion(request["id"], {"identifier": {"system": PSEUDONYM_SYSTEM,
                                                                 "value": service.bundles.case_pseudonym(other["id"])}})
    with pytest.raises(BusinessRuleViolation):
        await service.bundles.reidentified_opinion(wrong_case, abroad)


def test_a_patient_named_like_a_code_leaves_the_codes_alone(sandbox_cases: list[SandboxCase]) -> None:
    bundle = copy.deepcopy(sandbox_cases[0].bundle)
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["name"] = [{"family": "Final", "given": ["Current"]}]
    doc = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference")
    doc["description"] = "Compte rendu de Mme FINAL"
    out = pseudonymise_bundle(bundle, "CP-X")
    doc = next(e["resource"] for e in out["entry"] if e["resource"]["resourceType"] == "DocumentReference")
    assert (doc["status"], doc["docStatus"], doc["description"]) == ("current", "final", "Compte rendu de Mme CP-X")
    for entry in out["entry"]:
        if entry["resource"]["resourceType"] != "Binary":
            validate(loads(dumps(entry["resource"])))


async def test_a_bundle_packaged_before_skeletons_is_served_as_stored_and_never_to_a_reviewer_abroad(
    bridge: Bridge,
) -> None:
    _, task = await bridge.ready()
    service = bridge.service
    stub_id = output_reference(task, "case-bundle").split("/")[1]
    stub = await service.ports.store.read("Bundle", stub_id)
    old = await service.ports.blobs.put_bytes(b'{"entry":[],"resourceType":"Bundle","type":"document"}')
    extension = next(e for e in stub["extension"] if e["url"].endswith("blob-digest"))
    extension["valueString"] = old.digest
    await service.ports.store.update(stub, index={})
    served = loads(await bridge.read(task, reader("onco-fr-1")))
    assert (served["id"], served["type"], "signature" in served) == (stub_id, "document", False)
    with pytest.raises(Forbidden):
        await bridge.read(task, reader("onco-de-1"))

"""Opinions, panels and deliveries (issue 5) on the in-memory fakes: the rules of fhir_bridge.workflow.opinions,
fhir_bridge.opinion.consensus and fhir_bridge.workflow.delivery, with the real HTML/PDF renderers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from fhir_bridge.adapters.reference_data import load_profiles as default_profiles
from fhir_bridge.adapters.reference_data import load_registry
from fhir_bridge.case.intake import WRITE_BACK
from fhir_bridge.dev.demo import opinion_report, second_opinion_request
from fhir_bridge.errors import BusinessRuleViolation, Conflict, DeliveryFailed, Forbidden, Gone
from fhir_bridge.fhir.profile_check import conform
from fhir_bridge.fhir.resources import validate
from fhir_bridge.opinion.consensus import MemberOpinion, automatic_consensus
from fhir_bridge.opinion.content import OpinionContent, read_content
from fhir_bridge.opinion.writeback import master_identifier
from fhir_bridge.ports import Job, WebhookTarget
from fhir_bridge.workflow.bridge import Bridge as UseCases
from fhir_bridge.workflow.delivery import RECORD_JOB, WEBHOOK_JOB, sign_webhook
from tests.fakes import (
    FakeSource,
    FakeWebhooks,
    InMemoryBlobs,
    InMemoryQueue,
    InMemoryStore,
    fake_source_factory,
    make_bridge,
)
from tests.unit.test_cases import LAB_ONLY_RULES, PATIENT, REQUESTS, TENANT, TERMS, world

REGISTRY = load_registry()
HEART = REGISTRY.panels["rcp-heart-team"]  # coordinator cardio-fr-1, members csurg-fr-1, radio-fr-1
NEURO = REGISTRY.panels["rcp-neuro-oncology"]  # majority rule, four members
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
SNOMED, CIM10 = "http://snomed.info/sct", "https://smt.esante.gouv.fr/terminologie-cim-10"


@dataclass
class Bench:
    service: UseCases
    store: InMemoryStore
    queue: InMemoryQueue
    source: FakeSource
    webhooks: FakeWebhooks

    async def case(self, *, owner: str = "PractitionerRole/onco-fr-1", write_back: bool = False,
                   request_id: str = "R-1") -> tuple[dict[str, Any], dict[str, Any]]:
        body = second_opinion_request(PATIENT, request_id)
        if write_back:
            body["extension"] = [{"url": WRITE_BACK, "valueBoolean": True}]
        request = (await self.service.cases.submit_request(body, if_none_exist=f"identifier={REQUESTS}|{request_id}",
                                                     tenant=TENANT, client="platform-a")).resource
        await self.queue.drain(self.service.cases.run_collect_job)
        task = await self.service.book.for_request(request["id"])
        assert task["status"] == "ready", task.get("statusReason")
        task = await self.store.update({**task, "owner": {"reference": owner}}, index={"focus": [
            f"ServiceRequest/{request['id']}"], "status": ["ready"]})
        return request, task

    async def post(self, request: dict[str, Any], author: str | None, **kwargs: Any) -> dict[str, Any]:
        body = opinion_report(request["id"], PATIENT, **kwargs)
        return (await self.service.opinions.submit(body, author=author)).resource

    async def reports(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        page = await self.store.search("DiagnosticReport", {"based-on": [f"ServiceRequest/{request['id']}"]},
                                       count=50)
        return page.resources

    async def deliver(self) -> int:
        handlers = {WEBHOOK_JOB: self.service.deliveries.run_webhook_job,
                    RECORD_JOB: self.service.deliveries.run_record_job}

        async def run(job: Job) -> None:
            await handlers[job.kind](job)

        return await self.queue.drain(run)


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    store, queue = InMemoryStore(), InMemoryQueue(max_attempts=3)
    source = FakeSource(world())
    webhooks = FakeWebhooks({"platform-a": WebhookTarget("https://platform.test/hooks", SECRET)})
    service = make_bridge(store=store, queue=queue, blobs=InMemoryBlobs(), source=fake_source_factory(source),
                          terminology=TERMS, work_dir=tmp_path / "work", triage_rules=LAB_ONLY_RULES,
                          webhooks=webhooks, pseudonym_key=b"p" * 32)
    return Bench(service, store, queue, source, webhooks)


def forms(report: dict[str, Any]) -> dict[tuple[str, str], bytes]:
    out = {}
    for form in report["presentedForm"]:
        data = base64.b64decode(form["data"])
        assert form["size"] == len(data)
        assert form["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
        out[(form["contentType"], form["language"])] = data
    return out


def pdf_text(data: bytes) -> str:
    return " ".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def conforms(resource: dict[str, Any]) -> None:
    validate(resource)
    errors = [i for i in conform(resource, default_profiles(), TERMS) if i.severity == "error"]
    assert errors == []


# -- one reviewer ----------------------------------------------------------------------------------------------


async def test_a_final_opinion_is_signed_by_its_reviewer_and_rendered_in_french_and_english(bench: Bench) -> None:
    request, _ = await bench.case()
    report = await bench.post(request, "onco-fr-1", codes=((CIM10, "C34.1", "Tumeur maligne du lobe supérieur"),))
    assert report["resultsInterpreter"] == [{"reference": "PractitionerRole/onco-fr-1", "display": "Dr Claire Martin"}]
    assert report["performer"][0]["reference"] == "Organization/org-paris"
    rendered = forms(report)
    assert set(rendered) == {(kind, lang) for kind in ("text/html", "application/pdf") for lang in ("fr", "en")}
    assert "Diagnostic confirmé" in rendered[("text/html", "fr")].decode()
    assert "Avis médical de second recours" in pdf_text(rendered[("application/pdf", "fr")])
    assert "Medical second opinion" in pdf_text(rendered[("application/pdf", "en")])
    assert "C34.1" in pdf_text(rendered[("application/pdf", "fr")])
    conforms(report)
    task = await bench.service.book.for_request(request["id"])
    assert (task["status"], task["businessStatus"]["coding"][0]["code"]) == ("completed", "opinion-final")


async def test_the_bridge_signs_with_the_caller_not_with_what_the_body_claims(bench: Bench) -> None:
    request, _ = await bench.case()
    body = opinion_report(request["id"], PATIENT) | {"resultsInterpreter": [{"display": "Pr Usurpateur"}],
                                                      "presentedForm": [{"contentType": "text/plain", "data": "eA=="}]}
    report = (await bench.service.opinions.submit(body, author="onco-fr-1")).resource
    assert [r["reference"] for r in report["resultsInterpreter"]] == ["PractitionerRole/onco-fr-1"]
    assert {f["contentType"] for f in report["presentedForm"]} == {"text/html", "application/pdf"}


@pytest.mark.parametrize(("changes", "where"), [
    ({"diagnosis": None}, "result"),
    ({"plan": None}, "result"),
    ({"diagnosis": "maybe"}, "valueCodeableConcept"),
    ({"codes": (("http://loinc.org", "11488-4", "x"),)}, "conclusionCode[0].coding[0]"),
    ({"codes": ((CIM10, "lung", "x"),)}, "conclusionCode[0].coding[0].code"),
    ({"codes": ((SNOMED, "12", "x"),)}, "conclusionCode[0].coding[0].code"),
])
async def test_a_final_opinion_without_a_clear_position_is_refused_naming_the_element(
    bench: Bench, changes: dict[str, Any], where: str
) -> None:
    request, _ = await bench.case()
    with pytest.raises(BusinessRuleViolation) as refused:
        await bench.post(request, "onco-fr-1", **changes)
    assert any(where in e for e in refused.value.expression) or where in refused.value.message
    assert await bench.reports(request) == []


async def test_an_item_that_is_not_ours_is_refused_not_dropped(bench: Bench) -> None:
    request, _ = await bench.case()
    body = opinion_report(request["id"], PATIENT)
    body["contained"][0]["code"] = {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]}
    with pytest.raises(BusinessRuleViolation, match=r"Observation\.code must be one of"):
        await bench.service.opinions.submit(body, author="onco-fr-1")


async def test_one_final_opinion_per_case_the_next_is_409_and_amends_instead(bench: Bench) -> None:
    request, _ = await bench.case()
    first = await bench.post(request, "onco-fr-1")
    with pytest.raises(Conflict, match=first["id"]):
        await bench.post(request, "onco-fr-1", conclusion="Un autre avis")
    with pytest.raises(Conflict):
        await bench.post(request, "onco-fr-1", status="preliminary")
    amended = opinion_report(request["id"], PATIENT, status="amended", diagnosis="refined",
                             conclusion="Diagnostic précisé : adénocarcinome lépidique.")
    stored = await bench.service.opinions.amend(first["id"], amended, if_match="1", author="onco-fr-1")
    assert (stored["status"], stored["meta"]["versionId"]) == ("amended", "2")
    html = forms(stored)[("text/html", "fr")].decode()
    assert "adénocarcinome lépidique" in html and "version 1" in html
    history = await bench.store.history("DiagnosticReport", first["id"])
    assert [v["status"] for v in history] == ["amended", "final"]
    assert [r["status"] for r in await bench.reports(request)] == ["amended"]
    conforms(stored)


async def test_a_final_opinion_only_moves_to_amended_corrected_appended_or_entered_in_error(bench: Bench) -> None:
    request, _ = await bench.case()
    first = await bench.post(request, "onco-fr-1")
    for status in ("final", "preliminary"):
        with pytest.raises(BusinessRuleViolation):
            await bench.service.opinions.amend(first["id"], opinion_report(request["id"], PATIENT, status=status),
                                              if_match="1", author="onco-fr-1")
    with pytest.raises(Forbidden):
        await bench.service.opinions.amend(first["id"], opinion_report(request["id"], PATIENT, status="amended"),
                                          if_match="1", author="surg-fr-1")


async def test_a_draft_is_deleted_by_its_author_only_and_a_final_never(bench: Bench) -> None:
    request, _ = await bench.case()
    draft = await bench.post(request, "onco-fr-1", status="preliminary", diagnosis=None, plan=None)
    with pytest.raises(Forbidden):
        await bench.service.opinions.delete(draft["id"], author="surg-fr-1")
    await bench.service.opinions.delete(draft["id"], author="onco-fr-1")
    with pytest.raises(Gone):
        await bench.store.read("DiagnosticReport", draft["id"])
    final = await bench.post(request, "onco-fr-1")
    with pytest.raises(BusinessRuleViolation):
        await bench.service.opinions.delete(final["id"], author="onco-fr-1")


# -- panels ----------------------------------------------------------------------------------------------------


async def test_a_three_member_panel_with_one_dissent_gives_one_final_carrying_all_three_and_the_dissent(
    bench: Bench
) -> None:
    request, _ = await bench.case(owner=HEART.reference)
    await bench.post(request, "cardio-fr-1", status="preliminary", conclusion="Indication opératoire retenue.")
    await bench.post(request, "csurg-fr-1", status="preliminary", conclusion="Chirurgie recommandée.")
    dissent = await bench.post(request, "radio-fr-1", status="preliminary", plan="alternative-proposed",
                               alternatives=("TAVI plutôt que chirurgie",), conclusion="Je propose un TAVI.")
    assert all(r["status"] == "preliminary" for r in await bench.reports(request))  # coordinator method: no auto
    with pytest.raises(BusinessRuleViolation, match="coordinator"):
        await bench.post(request, "csurg-fr-1", conclusion="Consensus ?")
    with pytest.raises(Conflict):  # one opinion per member: amend it
        await bench.post(request, "csurg-fr-1", status="preliminary")
    final = await bench.post(request, "cardio-fr-1", conclusion="Consensus de la RCP : remplacement valvulaire "
                                                                "chirurgical.")
    finals = [r for r in await bench.reports(request) if r["status"] == "final"]
    assert [f["id"] for f in finals] == [final["id"]]
    assert [r["reference"] for r in final["resultsInterpreter"]] == [
        "PractitionerRole/cardio-fr-1", "PractitionerRole/csurg-fr-1", "PractitionerRole/radio-fr-1"]
    assert {p["reference"] for p in final["performer"]} == {"Organization/org-lyon"}
    dissents = [o for o in final["contained"] if o["code"]["coding"][0]["code"] == "dissenting-opinion"]
    assert len(dissents) == 1
    assert dissents[0]["performer"][0]["reference"] == "PractitionerRole/radio-fr-1"
    assert dissents[0]["valueString"] == "Je propose un TAVI."
    assert dissents[0]["extension"][0]["valueReference"]["reference"] == f"DiagnosticReport/{dissent['id']}/_history/1"
    assert {"url": "https://fhir-bridge.dev/fhir/StructureDefinition/consensus-method",
            "valueCoding": {"system": "https://fhir-bridge.dev/fhir/CodeSystem/opinion", "code": "coordinator",
                            "display": "Issued by the panel coordinator"}} in final["extension"]
    pdf = pdf_text(forms(final)[("application/pdf", "fr")])
    assert "Avis divergents" in pdf and "Dr Luc Bernard" in pdf and "remplacement valvulaire" in pdf
    conforms(final)
    with pytest.raises(Conflict, match="final opinion"):
        await bench.post(request, "radio-fr-1", status="preliminary")


async def test_the_coordinator_amends_the_consensus_and_the_dissents_are_recomputed(bench: Bench) -> None:
    request, _ = await bench.case(owner=HEART.reference)
    await bench.post(request, "csurg-fr-1", status="preliminary")
    await bench.post(request, "radio-fr-1", status="preliminary", plan="alternative-proposed")
    final = await bench.post(request, "cardio-fr-1")
    assert len([o for o in final["contained"] if o["id"].startswith("dissent-")]) == 1
    changed = {**final, "status": "amended", "conclusion": "TAVI retenu après discussion."}
    for item in changed["contained"]:
        if item["code"]["coding"][0]["code"] == "treatment-plan-assessment":
            item["valueCodeableConcept"] = {"coding": [{"system": "https://fhir-bridge.dev/fhir/CodeSystem/opinion",
                                                        "code": "alternative-proposed"}]}
    with pytest.raises(Forbidden):
        await bench.service.opinions.amend(final["id"], changed, if_match="1", author="csurg-fr-1")
    amended = await bench.service.opinions.amend(final["id"], changed, if_match="1", author="cardio-fr-1")
    dissenters = [o["performer"][0]["reference"] for o in amended["contained"] if o["id"].startswith("dissent-")]
    assert dissenters == ["PractitionerRole/csurg-fr-1"]  # now the surgeon is the one who disagrees
    conforms(amended)


async def test_a_majority_panel_issues_its_final_at_the_last_member_opinion_keeping_the_dissent(bench: Bench) -> None:
    request, _ = await bench.case(owner=NEURO.reference)
    for member in NEURO.members[:3]:
        await bench.post(request, member, status="preliminary", conclusion=f"Avis de {member}")
    assert all(r["status"] == "preliminary" for r in await bench.reports(request))
    await bench.post(request, NEURO.members[3], status="preliminary", diagnosis="changed",
                     conclusion="Ce n'est pas un gliome.")
    finals = [r for r in await bench.reports(request) if r["status"] == "final"]
    assert len(finals) == 1
    final = finals[0]
    assert final["conclusion"] == f"Avis de {NEURO.coordinator}"  # the coordinator agreed with the majority
    assert len(final["resultsInterpreter"]) == 4
    assert [o["performer"][0]["reference"] for o in final["contained"] if o["id"].startswith("dissent-")] == [
        f"PractitionerRole/{NEURO.members[3]}"]
    conforms(final)


def test_the_consensus_rules_unanimous_and_majority() -> None:
    from dataclasses import replace

    def opinions(*positions: tuple[str, str]) -> list[MemberOpinion]:
        return [MemberOpinion(m, {"id": m, "meta": {"versionId": "1"}}, OpinionContent(d, p, conclusion="c"))
                for m, (d, p) in zip(NEURO.members, positions, strict=False)]

    agree, other = ("confirmed", "agree"), ("changed", "agree")
    unanimous = replace(NEURO, consensus="unanimous")
    assert automatic_consensus(unanimous, opinions(agree, agree, agree, agree)) is not None
    assert automatic_consensus(unanimous, opinions(agree, agree, agree, other)) is None
    assert automatic_consensus(NEURO, opinions(agree, agree, agree)) is None  # someone has not answered
    assert automatic_consensus(NEURO, opinions(agree, agree, other, other)) is None  # 2 of 4 is no majority
    found = automatic_consensus(NEURO, opinions(other, agree, agree, agree))
    assert found is not None and found.author.member == NEURO.members[1]  # the coordinator dissented
    assert automatic_consensus(HEART, opinions(agree, agree, agree)) is None  # coordinator method: never automatic


async def test_two_finals_at_once_make_exactly_one(bench: Bench) -> None:
    request, _ = await bench.case()
    results = await asyncio.gather(bench.post(request, "onco-fr-1"), bench.post(request, "onco-fr-1"),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "dict"]
    assert len([r for r in await bench.reports(request) if r["status"] == "final"]) == 1


def test_the_content_reader_keeps_text_and_codes() -> None:
    report = opinion_report("1", PATIENT, alternatives=("Radiothérapie stéréotaxique",),
                            codes=((SNOMED, "254637007", "NSCLC"),))
    content = read_content(report, TERMS)
    assert content.position == ("confirmed", "agree")
    assert content.alternatives == ("Radiothérapie stéréotaxique",)
    assert content.conclusion_codes[0].code == "254637007"


# -- deliveries ------------------------------------------------------------------------------------------------


async def test_the_requesting_client_is_notified_once_with_a_signed_body_without_patient_data(bench: Bench) -> None:
    request, task = await bench.case()
    report = await bench.post(request, "onco-fr-1")
    bench.webhooks.down = True
    await bench.deliver()
    assert bench.webhooks.sent == [] and len(bench.queue.dead) == 1
    assert isinstance(bench.queue.dead[0][1], DeliveryFailed)
    bench.queue.dead.clear()
    bench.queue.state.clear()
    bench.webhooks.down = False
    await bench.service.deliveries.enqueue(report, task, request, event="opinion.final")
    await bench.deliver()
    assert len(bench.webhooks.sent) == 1
    url, body, headers = bench.webhooks.sent[0]
    assert url == "https://platform.test/hooks"
    assert NIR not in body.decode() and "Martin" not in body.decode()
    event = json.loads(body)
    assert event["type"] == "opinion.final"
    assert event["data"]["diagnosticReport"] == f"DiagnosticReport/{report['id']}/_history/1"
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    assert headers["webhook-signature"] == "v1," + base64.b64encode(
        hmac.new(key, signed, hashlib.sha256).digest()).decode()
    done = await bench.service.book.for_request(request["id"])
    assert done["businessStatus"]["coding"][0]["code"] == "delivered"
    await bench.deliver()
    assert len(bench.webhooks.sent) == 1  # nothing is sent twice


def test_the_webhook_signature_is_the_standard_webhooks_one() -> None:
    # the example of the Standard Webhooks specification (standardwebhooks.com, "Verifying webhooks")
    assert sign_webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                        b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_the_opinion_is_written_back_once_and_an_amendment_replaces_it(bench: Bench) -> None:
    request, _ = await bench.case(write_back=True)
    report = await bench.post(request, "onco-fr-1")
    bench.source.lose_answer = True  # the first ITI-65 is stored but its answer lost: the retry must find it
    await bench.deliver()
    assert len(bench.source.provided) == 1
    bundle = bench.source.provided[0]
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert (bundle["type"], kinds) == ("transaction", ["List", "DocumentReference", "Binary"])
    document = bundle["entry"][1]["resource"]
    pdf = base64.b64decode(bundle["entry"][2]["resource"]["data"])
    assert document["type"]["coding"][0]["code"] == "11488-4"
    assert document["masterIdentifier"]["value"] == master_identifier(f"DiagnosticReport/{report['id']}/_history/1")
    attachment = document["content"][0]["attachment"]
    assert attachment["size"] == len(pdf)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    assert "Diagnostic confirmé" in pdf_text(pdf)
    for resource in (bundle, document):
        validate(resource)
    task = await bench.service.book.for_request(request["id"])
    locations = [o["valueReference"]["reference"] for o in task["output"]
                 if o["type"]["coding"][0]["code"] == "record-document"]
    assert locations == [f"{bench.source.base_url}/DocumentReference/w1-0"]
    assert task["businessStatus"]["coding"][0]["code"] == "delivered"
    amended = opinion_report(request["id"], PATIENT, status="amended", conclusion="Précision après relecture.")
    await bench.service.opinions.amend(report["id"], amended, if_match="1", author="onco-fr-1")
    task = await bench.service.book.for_request(request["id"])
    assert task["businessStatus"]["coding"][0]["code"] == "opinion-final"
    await bench.deliver()
    second = bench.source.provided[1]["entry"][1]["resource"]
    assert second["relatesTo"] == [{"code": "replaces", "target": {"reference": "DocumentReference/w1-0"}}]
    assert (await bench.service.book.for_request(request["id"]))["businessStatus"]["coding"][0]["code"] == "delivered"


NIR = PATIENT["identifier"]["value"]


async def test_a_reviewer_abroad_reads_renderings_made_from_the_pseudonymised_report(bench: Bench) -> None:
    from tests.callers import caller

    request, _ = await bench.case(owner="PractitionerRole/onco-de-1")
    report = await bench.post(request, "onco-de-1")
    assert NIR in forms(report)[("text/html", "fr")].decode()  # what the platform reads names the patient
    abroad = caller("reviewer", reviewer="onco-de-1")
    assert bench.service.bundles.needs_pseudonym(abroad)
    seen = await bench.service.bundles.reader_view(report, abroad)
    rendered = forms(seen)
    assert set(rendered) == set(forms(report))
    pseudonym = seen["subject"]["identifier"]["value"]
    for kind, data in rendered.items():
        text = data.decode() if kind[0] == "text/html" else pdf_text(data)
        assert NIR not in text and pseudonym in text
    conforms(seen)

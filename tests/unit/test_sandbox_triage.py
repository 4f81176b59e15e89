"""The sandbox's cases through the bridge's real pull path and triage: complete cases triage clean at the
world's ``today``, incomplete ones are blocked for the document they lack."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.reference_data import load_terminology, load_triage_rules
from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.case.packaging import build_case_bundle
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.review.triage import Finding, triage_case
from fhir_bridge.sandbox.app import SandboxConfig, create_app
from fhir_bridge.sandbox.world import build_world, world_summary
from fhir_bridge.workflow.collect import collect_case

BASE = "http://sandbox.test"
TODAY = date(2026, 11, 22)
KINDS = ("second-opinion", "tumor-board-opinion")
TERMS = load_terminology()
RULES = load_triage_rules()
#: the group an incomplete case lacks, by specialty (the pathology report, else the first blocking group)
LACKS = {"oncology": "pathology", "neurology": "clinical-summary", "cardiology": "clinical-summary",
         "rare-disease": "clinical-summary"}


async def _triage_all(tmp_path: Path, config: SandboxConfig) -> list[tuple[dict[str, Any], str, list[Finding]]]:
    """Pull every patient's case as ``fhir-bridge pull`` does, then triage it for each kind of case at the
    start and at the very end of ``config.today``."""
    app = create_app(config)
    out = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        summary = (await client.get("/_sandbox/world")).json()
    async with SourceClient(f"{BASE}/fhir", SourceSettings(), transport=httpx.ASGITransport(app=app)) as source:
        for n, patient in enumerate(summary["patients"]):
            identifier = PatientIdentifier(patient["identifier"]["system"], patient["identifier"]["value"])
            collected = await collect_case(source, identifier, tmp_path / f"p{n}", TERMS)
            start = datetime(TODAY.year, TODAY.month, TODAY.day, tzinfo=UTC)
            bundle = build_case_bundle(collected.content, terminology=TERMS, absolute=source.absolute, now=start)
            for kind in KINDS:
                for now in (start, start + timedelta(hours=23, minutes=59)):
                    findings = triage_case(bundle, specialty=patient["specialty"], kind=kind,
                                           patient_identifier=identifier, problems=collected.problems,
                                           rules=RULES, now=now, left_out=collected.unreadable)
                    out.append((patient, kind, findings))
    return out


def _serious(findings: list[Finding]) -> list[dict[str, Any]]:
    return [f.to_json() for f in findings if f.severity != "information"]


async def test_complete_cases_triage_clean_and_incomplete_ones_are_blocked(tmp_path: Path) -> None:
    config = SandboxConfig(seed=1, patients=6, today=TODAY, corrupt=False, incomplete=(1, 4))
    results = await _triage_all(tmp_path, config)
    assert {p["specialty"] for p, _, _ in results} == set(LACKS)
    for patient, kind, findings in results:
        where = f"patient {patient['id']} ({patient['specialty']}, {kind})"
        if not patient["incomplete"]:
            assert _serious(findings) == [], where
            continue
        assert [f.missing for f in findings if f.severity == "blocking"] == [LACKS[patient["specialty"]]], where
        assert all(f.code == "missing-document" for f in findings if f.severity == "blocking"), where
        assert not [f for f in findings if f.severity == "warning"], where


async def test_with_damaged_attachments_only_their_unreadable_warnings_remain(tmp_path: Path) -> None:
    config = SandboxConfig(seed=1, patients=6, today=TODAY, corrupt=True)
    for patient, kind, findings in await _triage_all(tmp_path, config):
        serious = _serious(findings)
        damaged = {*patient["documents"]["corrupt"], *patient["documents"]["truncated"]}
        assert {f["code"] for f in serious} <= {"attachment-unreadable"}, (patient["specialty"], kind, serious)
        assert len(serious) == len(damaged)
        assert all(f["resource"].split("/")[-1] in damaged for f in serious)


@pytest.mark.parametrize("seed", [2, 3, 5, 8])
async def test_other_seeds_triage_clean_too(tmp_path: Path, seed: int) -> None:
    config = SandboxConfig(seed=seed, patients=4, today=TODAY, corrupt=False, incomplete=(0,))
    for patient, kind, findings in await _triage_all(tmp_path, config):
        blocking = [f.missing for f in findings if f.severity == "blocking"]
        assert blocking == (["pathology"] if patient["incomplete"] else []), (seed, kind, _serious(findings))
        assert not [f for f in findings if f.severity == "warning"], (seed, kind, _serious(findings))


def test_every_date_is_before_today_and_the_current_workup_is_recent() -> None:
    for today in (date(2026, 11, 1), date(2031, 2, 28)):
        world = build_world(4, 8, today=today)
        midnight = datetime(today.year, today.month, today.day, tzinfo=UTC)
        for p in world.patients:
            for d in p.documents:
                assert d.date <= d.last_updated <= midnight
                if d.status == "current":
                    assert d.date >= midnight - timedelta(days=400)
            for s in p.studies:
                assert midnight - timedelta(days=90) < s.started < midnight - timedelta(days=1)
                report = next(d for d in p.documents if d.study_id == s.id)
                assert report.date == s.started + timedelta(days=1)


def test_today_moves_every_date_by_the_same_amount() -> None:
    base, later = build_world(1, 5), build_world(1, 5, today=date(2027, 3, 1))
    assert base.today == date(2026, 11, 1) and later.today == date(2027, 3, 1)
    shift = later.today - base.today
    for a, b in zip(base.patients, later.patients, strict=True):
        assert [d.date + shift for d in a.documents] == [d.date for d in b.documents]
        assert [s.started + shift for s in a.studies] == [s.started for s in b.studies]
        assert (a.id, a.nir, [s.uid for s in a.studies]) == (b.id, b.nir, [s.uid for s in b.studies])


def test_incomplete_patients_lack_their_essential_documents_and_the_summary_says_so() -> None:
    world = build_world(1, 6, incomplete=(0, 1), big_docs=4, big_total_bytes=4 * 8192)
    summary = world_summary(world, faults=True)["patients"]
    assert [p["incomplete"] for p in summary] == [True, True, False, False, False, False]
    assert summary[0]["missing"] == ["60568-3", "11526-1"]
    assert "11488-4" in summary[1]["missing"] and summary[2]["missing"] == []
    for p in world.patients[:2]:
        assert not {d.type_code for d in p.documents} & set(p.missing)
    complete = build_world(1, 6)
    assert "60568-3" in {d.type_code for d in complete.patients[0].documents}
    assert [p.id for p in complete.patients] == [p.id for p in world.patients]
    with pytest.raises(ValueError):
        build_world(1, 3, incomplete=(3,))
    with pytest.raises(ValueError):
        SandboxConfig(patients=3, incomplete=(-1,))


async def test_the_app_dates_its_world_from_the_real_date_unless_told() -> None:
    for config, expected in ((SandboxConfig(incomplete=(2,)), None), (SandboxConfig(today=TODAY), TODAY)):
        app = create_app(config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
            summary = (await client.get("/_sandbox/world")).json()
        real = datetime.now(UTC).date()
        allowed = {expected.isoformat()} if expected else {real.isoformat(), (real - timedelta(days=1)).isoformat()}
        assert summary["today"] in allowed and summary["config"]["today"] == summary["today"]
        assert summary["config"]["incomplete"] == list(config.incomplete)
        assert [p["incomplete"] for p in summary["patients"]] == [n in config.incomplete for n in range(5)]

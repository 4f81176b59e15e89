"""Issue 6 item 6 over real HTTP: a case re-routed to a reviewer abroad is read pseudonymised, end to end.

The French oncologist the case is routed to declines; the case goes to a reviewer of the ``cross-border`` network
(config/reviewer-networks.json). With that reviewer's own token: the Task, the ServiceRequest and the case Bundle
carry the case pseudonym and no INS, name, birth date or address outside the documents' bytes; the Bundle is
signed and ``fhir-bridge verify-bundle`` accepts it; the opinion is posted under the pseudonym and the platform
reads it under the INS; the audit names the real patient for the reviewer's reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unicodedata
import uuid
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.access.pseudonym import PSEUDONYM_SYSTEM
from fhir_bridge.adapters.reference_data import load_networks
from fhir_bridge.dev.demo import reviewer_opinion, second_opinion_request
from fhir_bridge.sandbox.world import build_world
from tests.e2e.conftest import Bridge, Sandbox
from tests.e2e.test_exchange import FHIR

pytestmark = pytest.mark.e2e


def cross_border_reviewers(bridge: Bridge) -> set[str]:
    networks = load_networks()
    return {rid for rid, reviewer in bridge.clients.registry.reviewers.items()
            if networks.pseudonymises(reviewer.network)}


def _plain(value: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", value) if not unicodedata.combining(c)).lower()


def secrets_of(patient: dict[str, Any]) -> tuple[list[str], str]:
    """The INS, the names and the full birth date (from the world the session sandbox was built from)."""
    known = next(p for p in build_world(patients=4).patients if p.nir == patient["identifier"]["value"])
    return [known.nir, _plain(known.family), _plain(known.given), known.birth_date.isoformat()], str(known.birth_date)


def without_binaries(bundle: dict[str, Any]) -> str:
    kept = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Binary"]
    return _plain(json.dumps({**bundle, "entry": kept}, ensure_ascii=False))


def test_a_reviewer_abroad_works_on_the_case_by_its_pseudonym(bridge: Bridge, sandbox: Sandbox,
                                                              tmp_path: Path) -> None:
    patient = next(p for p in sandbox.world()["patients"] if p.get("specialty") == "oncology")
    abroad = cross_border_reviewers(bridge)
    assert abroad, "config/reviewer-networks.json has a pseudonymising network with reviewers"
    with bridge.client("platform") as platform:
        sr = platform.post(f"{bridge.api}/ServiceRequest", headers=FHIR,
                           json=second_opinion_request(patient, f"XB-{uuid.uuid4()}")).raise_for_status().json()
        task: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and task.get("status") != "ready":
            time.sleep(0.2)
            found = platform.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).json()
            task = (found.get("entry") or [{}])[0].get("resource", {})
        assert task.get("status") == "ready"
        # the French reviewers decline until the case reaches one abroad
        for _ in range(6):
            owner = task["owner"]["reference"]
            if owner.startswith("PractitionerRole/") and owner.split("/")[1] in abroad:
                break
            with bridge.client(bridge.reviewer_of(task)) as french:
                french.post(f"{bridge.api}/Task/{task['id']}/$decline", headers=FHIR, json={
                    "resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "out of office"}],
                }).raise_for_status()
            task = platform.get(f"{bridge.api}/Task/{task['id']}").raise_for_status().json()
        owner = task["owner"]["reference"]
        assert owner.split("/")[1] in abroad, f"the case never reached a reviewer abroad: {owner}"

    secrets, birth_date = secrets_of(patient)
    with bridge.client(bridge.reviewer_of(task)) as reviewer:
        seen_task = reviewer.get(f"{bridge.api}/Task/{task['id']}").raise_for_status().json()
        pseudonym = seen_task["for"]["identifier"]
        assert pseudonym["system"] == PSEUDONYM_SYSTEM and pseudonym["value"].startswith("CP-")
        seen_request = reviewer.get(f"{bridge.api}/ServiceRequest/{sr['id']}").raise_for_status().json()
        assert seen_request["subject"]["identifier"] == pseudonym
        listed = reviewer.get(f"{bridge.api}/Task", params={"focus": f"ServiceRequest/{sr['id']}"}).json()
        assert listed["entry"][0]["resource"]["for"]["identifier"] == pseudonym
        for text in (json.dumps(seen_task), json.dumps(seen_request), json.dumps(listed)):
            assert not [s for s in secrets if s in _plain(text)]

        reference = next(o["valueReference"]["reference"] for o in seen_task["output"]
                         if o["type"]["coding"][0]["code"] == "case-bundle")
        served = reviewer.get(f"{bridge.api}/{reference}").raise_for_status().content
        bundle = json.loads(served)
        assert not [s for s in secrets if s in without_binaries(bundle)], "no INS, name or birth date outside documents"
        patients = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        assert patients and patients[0].get("birthDate") == birth_date[:4]
        assert all(len(p.get("birthDate", "")) <= 4 and "address" not in p and "telecom" not in p for p in patients)
        saved = tmp_path / "pseudonymised.json"
        saved.write_bytes(served)
        env = {**os.environ, "FHIR_BRIDGE_DATA_DIR": str(bridge.data_dir)}
        verified = subprocess.run([sys.executable, "-m", "fhir_bridge", "verify-bundle", str(saved)],
                                  capture_output=True, text=True, timeout=120, env=env)
        assert verified.returncode == 0, verified.stderr

        opinion = {**reviewer_opinion(sr["id"], patient), "subject": {"identifier": pseudonym}}
        posted = reviewer.post(f"{bridge.api}/DiagnosticReport", headers=FHIR, json=opinion)
        assert posted.status_code == 201, posted.text
        assert posted.json()["subject"]["identifier"] == pseudonym
        report_id = posted.json()["id"]
        # naming the patient by the INS is refused for a reviewer abroad: the pseudonym is the only name they have
        by_ins = reviewer.post(f"{bridge.api}/DiagnosticReport", headers=FHIR,
                               json={**reviewer_opinion(sr["id"], patient), "status": "preliminary"})
        assert by_ins.status_code in (400, 422), by_ins.text

    with bridge.client("platform") as platform:
        stored = platform.get(f"{bridge.api}/DiagnosticReport/{report_id}").raise_for_status().json()
        assert stored["subject"]["identifier"] == sr["subject"]["identifier"], "the platform reads the INS"
    with bridge.client("auditor") as auditor:
        token = f"{patient['identifier']['system']}|{patient['identifier']['value']}"
        events = auditor.get(f"{bridge.api}/AuditEvent", params={"patient": token, "_count": "200"}).json()
    readers = {a.get("who", {}).get("identifier", {}).get("value") for e in events.get("entry", [])
               for a in e["resource"].get("agent", [])}
    assert bridge.reviewer_of(task) in readers, "the reviewer's pseudonymised reads are audited under the INS"

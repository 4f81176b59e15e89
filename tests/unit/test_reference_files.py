"""Each data file is found through a setting, the shipped copy by default (issue 15, item 5): a deployment
edits its own copies and the bridge reads them, the core never opening a file itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fhir_bridge.adapters.reference_data import ReferenceFiles, shipped
from fhir_bridge.adapters.settings import load_settings
from fhir_bridge.errors import InvalidInput
from fhir_bridge.main import load_reference_data
from tests.reference import CONFIG_DIR, MAPPINGS_DIR
from tests.reference import shipped as shipped_data


def test_without_settings_every_file_is_the_copy_shipped_in_the_package() -> None:
    where = ReferenceFiles.of(load_settings(env={}))
    assert where.reviewers == shipped("config") / "reviewers.json"
    assert where.mappings == shipped("mappings") and where.profiles == shipped("profiles")
    assert (shipped("config") / "roles.json").read_bytes() == (CONFIG_DIR / "roles.json").read_bytes()


def test_a_config_directory_and_a_file_setting_are_what_the_bridge_reads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, own)
    deadlines = json.loads((own / "deadlines.json").read_text("utf-8"))
    deadlines["hoursByPriority"]["routine"] = 12
    (own / "deadlines.json").write_text(json.dumps(deadlines), "utf-8")
    registry = json.loads((CONFIG_DIR / "reviewers.json").read_text("utf-8"))
    registry["entry"] = [e for e in registry["entry"] if e["resource"].get("id") != "radio-fr-1"
                         and "PractitionerRole/radio-fr-1" not in json.dumps(e["resource"])]
    (tmp_path / "our-reviewers.json").write_text(json.dumps(registry), "utf-8")
    monkeypatch.setenv("FHIR_BRIDGE_CONFIG_DIR", str(own))
    monkeypatch.setenv("FHIR_BRIDGE_REFERENCE__REVIEWERS", str(tmp_path / "our-reviewers.json"))

    data = load_reference_data(load_settings(env={}))

    assert data.rules.deadlines.hours_for("routine") == 12  # config_dir's deadlines.json
    assert "radio-fr-1" not in data.rules.registry.reviewers  # [reference] reviewers wins over config_dir
    assert "onco-fr-1" in data.rules.registry.reviewers
    assert data.role_ceilings == shipped_data().role_ceilings  # an unchanged copy reads the same


def test_a_broken_file_named_by_a_setting_stops_the_start_with_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mappings = tmp_path / "mappings"
    shutil.copytree(MAPPINGS_DIR, mappings)
    (mappings / "triage-rules.json").write_text("{not json", "utf-8")
    monkeypatch.setenv("FHIR_BRIDGE_MAPPINGS_DIR", str(mappings))
    with pytest.raises(InvalidInput, match="triage-rules"):
        load_reference_data(load_settings(env={}))

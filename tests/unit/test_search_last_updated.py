"""``_lastUpdated`` on our searches (FHIR R4 search.html#lastUpdated; STANDARDS.md §9 incremental sync)."""

from __future__ import annotations

import pytest

from fhir_bridge.errors import InvalidInput
from fhir_bridge.search_index import LAST_UPDATED, SEARCH_PARAMS, parse_criteria


def test_last_updated_is_a_criterion_whose_repeats_make_a_window() -> None:
    criteria = parse_criteria("Task", [("status", "ready"), ("_lastUpdated", "ge2026-01-01"),
                                       ("_lastUpdated", "lt2026-02-01"), ("_count", "5")])
    assert criteria == {"status": ["ready"], "_lastUpdated": ["ge2026-01-01", "lt2026-02-01"]}


@pytest.mark.parametrize("value", ["ge2026-01-01,lt2026-02-01", " "])
def test_last_updated_with_an_or_list_or_nothing_is_refused(value: str) -> None:
    with pytest.raises(InvalidInput):
        parse_criteria("DiagnosticReport", [("_lastUpdated", value)])


def test_every_searchable_type_declares_last_updated_as_a_date() -> None:
    assert all(params[LAST_UPDATED][0] == "date" for params in SEARCH_PARAMS.values())

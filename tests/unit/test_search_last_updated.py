"""``_lastUpdated`` on our searches (FHIR R4 search.html#lastUpdated; STANDARDS.md §9 incremental sync)."""

from __future__ import annotations

import pytest

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.search_index import LAST_UPDATED, SEARCH_PARAMS, parse_criteria


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


def test_the_self_link_names_only_the_parameters_the_search_applied() -> None:
    # search.html: a client learns from the self link which criteria were used; _id is not one of ours
    from urllib.parse import parse_qsl, urlsplit

    from fhir_bridge.api.fhir_io import searchset

    params = [("status", "ready"), ("_id", "x"), ("_lastUpdated", "ge2026-01-01"), ("_format", "json"),
              ("_count", "1")]
    page = searchset("http://bridge.test/fhir", "Task", [], 3, params, 1, 0)
    links = {link["relation"]: dict(parse_qsl(urlsplit(link["url"]).query)) for link in page["link"]}
    assert links["self"] == {"status": "ready", "_lastUpdated": "ge2026-01-01", "_format": "json",
                             "_count": "1", "_offset": "0"}
    assert links["next"]["_offset"] == "1" and "_id" not in links["next"]

"""``resources.dumps`` takes the standard library's C encoder when it can: the bytes must be exactly the ones
:func:`iterencode` writes, because the audit chain and the bundle signatures hash them."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_bridge.fhir.resources import dumps, iterencode, loads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.booleans())
def test_fast_dumps_writes_the_same_bytes_as_iterencode(value: Any, canonical: bool) -> None:
    assert dumps(value, canonical=canonical) == "".join(iterencode(value, canonical=canonical)).encode("utf-8")


def test_decimals_and_streamed_text_still_go_through_iterencode() -> None:
    class Streamed:
        def iter_chunks(self) -> Any:
            yield "QUJD"

    resource = {"resourceType": "Observation", "valueQuantity": {"value": Decimal("1.50")}, "z": "é\n\u2028",
                "data": Streamed()}
    assert dumps(resource, canonical=True) == (
        '{"data":"QUJD","resourceType":"Observation","valueQuantity":{"value":1.50},"z":"é\\n\u2028"}'
    ).encode("utf-8")
    assert loads(dumps({"value": Decimal("1.50")}))["value"] == Decimal("1.50")

"""INS / NIR validation (STANDARDS.md §2)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_bridge.errors import InvalidIdentifier
from fhir_bridge.fhir.identity import INS_NIR, INS_NIR_TEST, nir_key, parse_patient_identifier, validate_nir


@pytest.mark.parametrize("nir", ["295109912611193", "253072B07300470", "253072A07300443", "2 95 10 99 126 111 93"])
def test_published_examples_are_valid(nir: str) -> None:
    assert validate_nir(nir) == nir.replace(" ", "")


def test_corsica_is_replaced_before_the_modulo() -> None:
    assert nir_key("253072A073004") == 97 - (int("2530719073004") % 97)
    assert nir_key("253072B073004") == 97 - (int("2530718073004") % 97)


@pytest.mark.parametrize(
    "nir, why",
    [
        ("29510991261119", "15 characters"),
        ("2951099126111930", "15 characters"),
        ("295109912611194", "key"),
        ("995109912611193", "malformed"),
        ("2951099126111A3", "malformed"),
        ("253072C07300470", "malformed"),
    ],
)
def test_malformed_nirs_are_refused_without_echoing_the_value(nir: str, why: str) -> None:
    with pytest.raises(InvalidIdentifier) as caught:
        validate_nir(nir)
    assert why in str(caught.value)
    assert nir not in str(caught.value)


@given(st.integers(min_value=0, max_value=10**13 - 1))
def test_any_thirteen_digits_with_their_key_validate(n: int) -> None:
    body = f"1{n:013d}"[1:]  # 13 digits
    body = "1" + body[1:3] + "01" + body[5:]  # a plausible sex and month
    nir = body + f"{nir_key(body):02d}"
    assert validate_nir(nir) == nir


def test_patient_identifier_parses_system_and_value() -> None:
    ident = parse_patient_identifier(f"{INS_NIR_TEST}|295109912611193")
    assert ident.system == INS_NIR_TEST and ident.value == "295109912611193"
    assert ident.token == f"{INS_NIR_TEST}|295109912611193"
    assert "295109912611193" not in repr(ident)


@pytest.mark.parametrize("text", ["295109912611193", "|295109912611193", f"{INS_NIR}|", "not a uri|x",
                                  f"{INS_NIR}|295109912611194", f"{INS_NIR}|1|2"])
def test_bad_patient_identifiers_are_refused(text: str) -> None:
    with pytest.raises(InvalidIdentifier):
        parse_patient_identifier(text)


def test_non_ins_systems_are_accepted_as_given() -> None:
    ident = parse_patient_identifier("https://hospital.example/mrn|A-42")
    assert ident.value == "A-42" and not ident.is_ins



def test_a_nir_in_other_scripts_digits_is_refused() -> None:
    """``str.isdigit`` accepts Arabic-Indic or superscript digits; a NIR is ASCII digits only."""
    arabic = "".join(chr(0x0660 + int(c)) for c in "165113523882658")
    with pytest.raises(InvalidIdentifier):
        validate_nir(arabic)
    with pytest.raises(InvalidIdentifier):
        validate_nir("16511352388²658")

"""INS (Identité Nationale de Santé) identifiers: NIR validation and ``SYSTEM|VALUE`` patient identifiers.

Rules from FR Core (hl7.fr/ig/fhir/core) and the NIR key definition (STANDARDS.md §2):

* a NIR is 15 characters: sex(1) year(2) month(2) birthplace(5) order(3) key(2);
* key = 97 − (first 13 digits mod 97), written on two digits;
* Corsica: the department ``2A`` counts as ``19`` and ``2B`` as ``18`` before the modulo.

The INS systems are OIDs; a malformed NIR is refused here, before any network call. Error messages never
repeat the value (it is a patient identifier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fhir_bridge.errors import InvalidIdentifier

INS_NIR = "urn:oid:1.2.250.1.213.1.4.8"
INS_NIA = "urn:oid:1.2.250.1.213.1.4.9"
INS_NIR_TEST = "urn:oid:1.2.250.1.213.1.4.10"
INS_NIR_DEMO = "urn:oid:1.2.250.1.213.1.4.11"

#: systems whose values are NIR-shaped and carry the mod-97 key
NIR_SYSTEMS = frozenset({INS_NIR, INS_NIA, INS_NIR_TEST, INS_NIR_DEMO})
INS_SYSTEM_NAMES = {
    INS_NIR: "INS-NIR",
    INS_NIA: "INS-NIA",
    INS_NIR_TEST: "INS-NIR (test)",
    INS_NIR_DEMO: "INS-NIR (demo)",
}

_NIR_SHAPE = re.compile(r"^[12378][0-9]{2}(0[1-9]|1[0-2]|[2-9][0-9])(2[AB]|[0-9]{2})[0-9]{3}[0-9]{3}[0-9]{2}$")


def nir_key(first13: str) -> int:
    """The NIR control key of the first 13 characters (Corsican ``2A``/``2B`` substituted)."""
    digits = first13.upper().replace("2A", "19", 1).replace("2B", "18", 1)
    if len(digits) != 13 or not (digits.isascii() and digits.isdigit()):
        raise InvalidIdentifier("a NIR's first 13 characters must be digits (2A/2B allowed for Corsica)")
    return 97 - (int(digits) % 97)


def validate_nir(value: str) -> str:
    """Return the NIR normalised (upper case, no spaces) or raise :class:`InvalidIdentifier`."""
    nir = value.replace(" ", "").upper()
    if len(nir) != 15:
        raise InvalidIdentifier(f"a NIR has 15 characters, this one has {len(nir)}")
    if not _NIR_SHAPE.match(nir):
        raise InvalidIdentifier("malformed NIR: expected sex, year, month, birthplace, order and key digits")
    if nir_key(nir[:13]) != int(nir[13:]):
        raise InvalidIdentifier("NIR control key does not match (97 - n mod 97)")
    return nir


@dataclass(frozen=True, slots=True)
class PatientIdentifier:
    """A patient identifier as FHIR token search writes it: ``system|value``."""

    system: str
    value: str

    @classmethod
    def from_element(cls, identifier: object) -> PatientIdentifier | None:
        """The identifier of a FHIR ``Identifier`` element (as JSON) with a string system and value, else None.

        For elements the bridge wrote or already checked (``Task.for.identifier``, a stored request's
        ``subject.identifier``): no NIR check here, that is :func:`parse_patient_identifier`'s and intake's."""
        if not isinstance(identifier, dict):
            return None
        system, value = identifier.get("system"), identifier.get("value")
        return cls(system, value) if isinstance(system, str) and isinstance(value, str) else None

    @property
    def element(self) -> dict[str, str]:
        """This identifier as a FHIR ``Identifier`` element."""
        return {"system": self.system, "value": self.value}

    @property
    def token(self) -> str:
        return f"{self.system}|{self.value}"

    @property
    def is_ins(self) -> bool:
        return self.system in NIR_SYSTEMS

    def matches(self, identifier: dict[str, object]) -> bool:
        """True when a FHIR ``Identifier`` (as JSON) is this identifier."""
        return identifier.get("system") == self.system and str(identifier.get("value", "")).upper() == (
            self.value.upper()
        )

    def __repr__(self) -> str:  # never print the value: it is a patient identifier
        return f"PatientIdentifier(system={self.system!r}, value=<redacted>)"


def parse_patient_identifier(text: str) -> PatientIdentifier:
    """Parse ``SYSTEM|VALUE``; an INS system's value must be a valid NIR (checked before any network call).

    A bare NIR (no ``|``) is refused rather than guessed: the billing number (NSS) shares the NIR's shape and
    the test/demo systems differ, so the system must be said.
    """
    if "|" not in text:
        raise InvalidIdentifier("a patient is given as SYSTEM|VALUE, e.g. urn:oid:1.2.250.1.213.1.4.8|<NIR>")
    system, _, value = text.partition("|")
    system, value = system.strip(), value.strip()
    if not system or not value:
        raise InvalidIdentifier("both SYSTEM and VALUE are needed in SYSTEM|VALUE")
    if "|" in value:
        raise InvalidIdentifier("only one '|' is allowed in SYSTEM|VALUE")
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$", system):
        raise InvalidIdentifier("the identifier system must be a URI (e.g. urn:oid:1.2.250.1.213.1.4.8)")
    if system in NIR_SYSTEMS:
        value = validate_nir(value)
    return PatientIdentifier(system=system, value=value)

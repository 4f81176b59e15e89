"""The reviewer directory: who may review which cases, read from data and checked once.

The reviewers are data (``config/reviewers.json``, read by :mod:`fhir_bridge.adapters.reference_data`): an R4
``collection`` Bundle, checked resource by resource against R4 at load, of

* ``Practitioner``: the person; ``communication`` holds the languages they review in (``urn:ietf:bcp:47``);
* ``PractitionerRole`` (its ``id`` is the reviewer id, its reference goes into ``Task.owner``):
  ``specialty`` codes of ``https://fhir-bridge.dev/fhir/CodeSystem/specialty`` (the only cases they may ever
  get), ``code`` holding their discipline (``mappings/discipline.json``) and, for reviewers who take cases on
  their own, the case kind they accept (``case-codes#second-opinion``: someone who only sits on tumor boards
  has no such code); the extension ``https://fhir-bridge.dev/fhir/StructureDefinition/reviewer-capacity``
  (valueInteger: how many open cases at once); ``location`` → ``Location`` entries whose ``address.country``
  is the ISO 3166-1 alpha-2 country (a real Location rather than an extension, so the registry stays plain
  R4); ``active`` and ``notAvailable.during`` (holidays) are honoured; the extension
  ``https://fhir-bridge.dev/fhir/StructureDefinition/reviewer-network`` (valueCode) names the reviewer network of
  ``config/reviewer-networks.json`` (:mod:`fhir_bridge.access.pseudonym`), which decides whether they see cases
  pseudonymised; without it the reviewer is in that file's default network; ``organization`` → the
  ``Organization`` they give opinions for (``DiagnosticReport.performer``, issue 5);
* ``CareTeam``: a panel (tumor board / RCP), ``category`` the specialty codes it sits for, ``participant.member``
  references to PractitionerRoles, and the disciplines it must cover as repeated extensions
  ``https://fhir-bridge.dev/fhir/StructureDefinition/panel-required-discipline`` (valueCoding); the member
  whose ``participant.role`` holds ``panel-role#coordinator`` issues the panel's final opinion, and the extension
  ``https://fhir-bridge.dev/fhir/StructureDefinition/consensus-method`` (valueCoding of CodeSystem ``opinion``:
  ``coordinator``, ``unanimous`` or ``majority``; default ``coordinator``) says when the bridge may issue it
  itself (:mod:`fhir_bridge.opinion.consensus`).

Choosing among them is :mod:`fhir_bridge.review.routing`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from fhir_bridge.case.deadlines import parse_fhir_datetime
from fhir_bridge.errors import InvalidInput, MalformedResource
from fhir_bridge.fhir.resources import Resource, validate
from fhir_bridge.fhir.terminology import CANONICAL_BASE, CASE_CODES

SPECIALTY = f"{CANONICAL_BASE}/CodeSystem/specialty"
DISCIPLINE = f"{CANONICAL_BASE}/CodeSystem/discipline"
CAPACITY = f"{CANONICAL_BASE}/StructureDefinition/reviewer-capacity"
REQUIRED_DISCIPLINE = f"{CANONICAL_BASE}/StructureDefinition/panel-required-discipline"
NETWORK = f"{CANONICAL_BASE}/StructureDefinition/reviewer-network"
PANEL_ROLE = f"{CANONICAL_BASE}/CodeSystem/panel-role"
CONSENSUS = f"{CANONICAL_BASE}/StructureDefinition/consensus-method"
CONSENSUS_METHODS = frozenset({"coordinator", "unanimous", "majority"})
BCP47 = "urn:ietf:bcp:47"
PANEL_KIND = "tumor-board-opinion"
_ALLOWED = frozenset({"Practitioner", "PractitionerRole", "CareTeam", "Location", "Organization"})


@dataclass(frozen=True)
class Reviewer:
    """A PractitionerRole as routing and the opinions see it."""

    id: str
    display: str
    specialties: frozenset[str]
    disciplines: frozenset[str]
    kinds: frozenset[str]
    languages: frozenset[str]
    countries: frozenset[str]
    capacity: int
    active: bool = True
    away: tuple[tuple[datetime | None, datetime | None], ...] = ()
    network: str | None = None
    organization: str | None = None  # Organization id
    discipline_display: str | None = None

    @property
    def reference(self) -> str:
        return f"PractitionerRole/{self.id}"

    def available(self, now: datetime) -> bool:
        return self.active and not any((s is None or s <= now) and (e is None or now <= e) for s, e in self.away)


@dataclass(frozen=True)
class Panel:
    """A CareTeam (tumor board): who sits on it and which disciplines it must cover."""

    id: str
    display: str
    specialties: frozenset[str]
    required: frozenset[str]
    members: tuple[str, ...]
    active: bool = True
    coordinator: str | None = None  # PractitionerRole id
    consensus: str = "coordinator"  # coordinator | unanimous | majority

    @property
    def reference(self) -> str:
        return f"CareTeam/{self.id}"


@dataclass(frozen=True)
class Organisation:
    id: str
    display: str

    @property
    def reference(self) -> str:
        return f"Organization/{self.id}"


@dataclass(frozen=True)
class ReviewerRegistry:
    """The directory: reviewers and panels by id, and the organisations they give opinions for."""

    reviewers: Mapping[str, Reviewer]
    panels: Mapping[str, Panel]
    organisations: Mapping[str, Organisation] = field(default_factory=lambda: MappingProxyType({}))


# -- loading ------------------------------------------------------------------------------------------------


def registry_from(bundle: Any, file: str = "reviewers.json") -> ReviewerRegistry:
    """Check the parsed reviewer registry (``file`` names it in errors); every error names the file and the
    entry."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle" or bundle.get("type") != "collection":
        raise InvalidInput(f"reviewer registry {file}: a FHIR Bundle of type collection is expected")
    by_type: dict[str, dict[str, Resource]] = {t: {} for t in _ALLOWED}
    for i, entry in enumerate(bundle.get("entry") or []):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        where = f"reviewer registry {file}: entry[{i}]"
        if not isinstance(resource, dict) or resource.get("resourceType") not in _ALLOWED:
            raise InvalidInput(f"{where}: only {', '.join(sorted(_ALLOWED))} resources are expected")
        try:
            validate(resource)
        except MalformedResource as exc:
            raise InvalidInput(f"{where}: {exc.message}") from None
        rid = resource.get("id")
        if not isinstance(rid, str) or rid in by_type[resource["resourceType"]]:
            raise InvalidInput(f"{where}: each {resource['resourceType']} needs a unique id")
        by_type[resource["resourceType"]][rid] = resource

    reviewers = {rid: _reviewer(role, by_type, f"reviewer registry {file}: PractitionerRole/{rid}")
                 for rid, role in by_type["PractitionerRole"].items()}
    panels = {pid: _panel(team, reviewers, f"reviewer registry {file}: CareTeam/{pid}")
              for pid, team in by_type["CareTeam"].items()}
    organisations = {oid: Organisation(oid, str(org.get("name") or oid))
                     for oid, org in by_type["Organization"].items()}
    return ReviewerRegistry(reviewers=MappingProxyType(reviewers), panels=MappingProxyType(panels),
                            organisations=MappingProxyType(organisations))


def _target(reference: Any, resource_type: str, known: Mapping[str, Resource], where: str) -> Resource:
    """Resolve ``Type/id`` (relative, or the end of an absolute URL) to a registry entry."""
    ref = reference.get("reference") if isinstance(reference, dict) else None
    parts = ref.split("/_history/")[0].rstrip("/").split("/") if isinstance(ref, str) else []
    if len(parts) < 2 or parts[-2] != resource_type or parts[-1] not in known:
        raise InvalidInput(f"{where}: reference {ref!r} does not resolve to a {resource_type} of the registry")
    return known[parts[-1]]


def _codes(concepts: Any, system: str) -> frozenset[str]:
    return frozenset(str(c["code"]) for concept in concepts or [] for c in (concept.get("coding") or [])
                     if c.get("system") == system and c.get("code"))


def language_tag(code: str) -> str:
    """The primary subtag of a BCP 47 tag (RFC 5646 §2.2.1), lower case: 'fr-FR' and 'fr' are both French."""
    return code.split("-")[0].strip().lower()


def _reviewer(role: Resource, by_type: Mapping[str, Mapping[str, Resource]], where: str) -> Reviewer:
    person = _target(role.get("practitioner"), "Practitioner", by_type["Practitioner"], where)
    capacities = [e.get("valueInteger") for e in role.get("extension") or [] if e.get("url") == CAPACITY]
    if len(capacities) != 1 or not isinstance(capacities[0], int) or capacities[0] < 0:
        raise InvalidInput(f"{where}: exactly one {CAPACITY} extension with a valueInteger >= 0 is required")
    specialties = _codes(role.get("specialty"), SPECIALTY)
    if not specialties:
        raise InvalidInput(f"{where}: at least one specialty from {SPECIALTY} is required")
    countries = set()
    for reference in role.get("location") or []:
        country = (_target(reference, "Location", by_type["Location"], where).get("address") or {}).get("country")
        if isinstance(country, str):
            countries.add(country.upper())
    name = (person.get("name") or [{}])[0]
    display = (role.get("practitioner") or {}).get("display") or " ".join(
        [*name.get("prefix", []), *name.get("given", []), name.get("family", "")]).strip() or role["id"]
    away = tuple((parse_fhir_datetime(str(p["start"])) if p.get("start") else None,
                  parse_fhir_datetime(str(p["end"]), end=True) if p.get("end") else None)
                 for p in ((n.get("during") or {}) for n in role.get("notAvailable") or []) if p)
    return Reviewer(
        id=role["id"], display=display, specialties=specialties,
        disciplines=_codes(role.get("code"), DISCIPLINE), kinds=_codes(role.get("code"), CASE_CODES),
        languages=frozenset(language_tag(c) for c in _codes(person.get("communication"), BCP47)),
        countries=frozenset(countries), capacity=capacities[0],
        active=role.get("active", True) is not False and person.get("active", True) is not False, away=away,
        network=next((str(e["valueCode"]) for e in role.get("extension") or []
                      if e.get("url") == NETWORK and e.get("valueCode")), None),
        organization=(_target(role["organization"], "Organization", by_type["Organization"], where)["id"]
                      if role.get("organization") else None),
        discipline_display=next((str(c.get("display")) for concept in role.get("code") or []
                                 for c in concept.get("coding") or []
                                 if c.get("system") == DISCIPLINE and c.get("display")), None),
    )


def _panel(team: Resource, reviewers: Mapping[str, Reviewer], where: str) -> Panel:
    specialties = _codes(team.get("category"), SPECIALTY)
    if not specialties:
        raise InvalidInput(f"{where}: category must give at least one specialty from {SPECIALTY}")
    required = frozenset(str((e.get("valueCoding") or {}).get("code")) for e in team.get("extension") or []
                         if e.get("url") == REQUIRED_DISCIPLINE)
    known = {rid: {"id": rid} for rid in reviewers}
    members = tuple(_target(p.get("member"), "PractitionerRole", known, where)["id"]
                    for p in team.get("participant") or [])
    if not members:
        raise InvalidInput(f"{where}: a panel needs participants")
    for member in members:
        if not specialties <= reviewers[member].specialties:
            raise InvalidInput(f"{where}: member PractitionerRole/{member} lacks one of the panel's specialties "
                               f"({', '.join(sorted(specialties))}): nobody may sit on a case outside their specialty")
    coordinators = [m for m, p in zip(members, team.get("participant") or [], strict=True)
                    if "coordinator" in _codes(p.get("role"), PANEL_ROLE)]
    if len(coordinators) > 1:
        raise InvalidInput(f"{where}: a panel has at most one coordinator ({PANEL_ROLE}#coordinator)")
    methods = [str((e.get("valueCoding") or {}).get("code")) for e in team.get("extension") or []
               if e.get("url") == CONSENSUS]
    if len(methods) > 1 or (methods and methods[0] not in CONSENSUS_METHODS):
        raise InvalidInput(f"{where}: at most one {CONSENSUS} extension, one of "
                           + ", ".join(sorted(CONSENSUS_METHODS)))
    consensus = methods[0] if methods else "coordinator"
    if consensus == "coordinator" and not coordinators:
        raise InvalidInput(f"{where}: a panel whose consensus method is 'coordinator' needs a coordinator")
    return Panel(id=team["id"], display=str(team.get("name") or team["id"]), specialties=specialties,
                 required=required, members=members, active=team.get("status", "active") == "active",
                 coordinator=coordinators[0] if coordinators else None, consensus=consensus)


# -- routing ------------------------------------------------------------------------------------------------

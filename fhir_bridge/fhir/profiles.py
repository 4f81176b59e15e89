"""Our published profiles (``profiles/``), loaded as data, declared on what the bridge emits.

The StructureDefinitions (with snapshots; how they are built: ``profiles/build.py`` and profiles/README.md)
are read once by :mod:`fhir_bridge.adapters.reference_data` and handed here parsed, then passed as data to
whatever declares or checks them (the CapabilityStatement, :mod:`fhir_bridge.fhir.profile_check`): no
process-wide copy read from disk, so the profiles a process uses are the ones its settings name. The canonical
base is configurable: profiles are written under :data:`~fhir_bridge.fhir.terminology.CANONICAL_BASE` and
:func:`profiles_from` rebases their URLs (and the references between them) to the base a deployment gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE

_OURS = f"{CANONICAL_BASE}/StructureDefinition/"


def _rebased(value: Any, base: str) -> Any:
    """``value`` with every reference to our own StructureDefinitions moved under ``base``."""
    if isinstance(value, dict):
        return {k: _rebased(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, base) for v in value]
    if isinstance(value, str) and value.startswith(_OURS):
        return f"{base.rstrip('/')}/StructureDefinition/{value.removeprefix(_OURS)}"
    return value


@dataclass(frozen=True)
class Profiles:
    """The published StructureDefinitions by canonical URL, and the profile each emitted type declares."""

    by_url: Mapping[str, Resource]
    by_type: Mapping[str, Resource]

    def for_type(self, resource_type: str) -> Resource | None:
        return self.by_type.get(resource_type)

    def urls(self) -> list[str]:
        return sorted(self.by_url)


def profiles_from(files: Iterable[tuple[str, Any]], base: str = CANONICAL_BASE) -> Profiles:
    """The parsed ``profiles/*.json`` (file name, JSON), each a StructureDefinition whose id is its file name,
    rebased to ``base``.

    A resource type profiled once is the profile the bridge declares on what it emits of that type."""
    by_url: dict[str, Resource] = {}
    by_type: dict[str, Resource] = {}
    for name, profile in files:
        stem = name.removesuffix(".json")
        if not isinstance(profile, dict) or profile.get("resourceType") != "StructureDefinition" \
                or profile.get("id") != stem or "snapshot" not in profile:
            raise InvalidInput(f"profile {name}: a StructureDefinition with a snapshot and id {stem}")
        profile = _rebased(profile, base)
        by_url[str(profile["url"])] = profile
        if profile.get("kind") == "resource":
            if profile["type"] in by_type:
                raise InvalidInput(f"profile {name}: {profile['type']} is profiled twice")
            by_type[str(profile["type"])] = profile
    return Profiles(by_url=by_url, by_type=by_type)


def declare_profile(resource: Resource, profiles: Profiles) -> Resource:
    """A copy of ``resource`` whose ``meta.profile`` names our profile of its type (R4 resource.html#Meta:
    a claim of conformance), once; unchanged when we publish no profile of that type.

    Call it where a resource is built, before it is stored, hashed or signed (see profiles/README.md for the
    list): the claim is part of the bytes."""
    profile = profiles.for_type(str(resource.get("resourceType")))
    if profile is None:
        return resource
    meta = dict(resource.get("meta") or {})
    claimed = [p for p in meta.get("profile", []) or [] if p != profile["url"]]
    meta["profile"] = [*claimed, profile["url"]]
    return {**resource, "meta": meta}


def declared_urls(resource: Resource, profiles: Profiles) -> Iterable[str]:
    """The profile URLs ``resource`` claims that we publish."""
    return [p for p in (resource.get("meta") or {}).get("profile", []) or [] if p in profiles.by_url]

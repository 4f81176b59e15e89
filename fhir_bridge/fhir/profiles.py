"""Our published profiles (``profiles/``), loaded as data, declared on what the bridge emits.

The StructureDefinitions (with snapshots; how they are built: ``profiles/build.py`` and profiles/README.md)
are read once; :mod:`fhir_bridge.fhir.profile_check` checks a resource against them. The canonical base is
configurable: profiles are written under :data:`~fhir_bridge.fhir.terminology.CANONICAL_BASE` and
:func:`load_profiles` rebases their URLs (and the references between them) to the base a deployment gives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhir_bridge.errors import InvalidInput
from fhir_bridge.fhir.terminology import CANONICAL_BASE

Resource = dict[str, Any]
PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"
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


def load_profiles(directory: Path = PROFILES_DIR, base: str = CANONICAL_BASE) -> Profiles:
    """Read ``directory/*.json`` (each a StructureDefinition whose id is its file name), rebased to ``base``.

    A resource type profiled once is the profile the bridge declares on what it emits of that type."""
    by_url: dict[str, Resource] = {}
    by_type: dict[str, Resource] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            profile = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"profile {path.name} is not readable JSON: {exc}") from None
        if not isinstance(profile, dict) or profile.get("resourceType") != "StructureDefinition" \
                or profile.get("id") != path.stem or "snapshot" not in profile:
            raise InvalidInput(f"profile {path.name}: a StructureDefinition with a snapshot and id {path.stem}")
        profile = _rebased(profile, base)
        by_url[str(profile["url"])] = profile
        if profile.get("kind") == "resource":
            if profile["type"] in by_type:
                raise InvalidInput(f"profile {path.name}: {profile['type']} is profiled twice")
            by_type[str(profile["type"])] = profile
    return Profiles(by_url=by_url, by_type=by_type)


def declare_profile(resource: Resource, profiles: Profiles | None = None) -> Resource:
    """A copy of ``resource`` whose ``meta.profile`` names our profile of its type (R4 resource.html#Meta:
    a claim of conformance), once; unchanged when we publish no profile of that type.

    Call it where a resource is built, before it is stored, hashed or signed (see profiles/README.md for the
    list): the claim is part of the bytes."""
    known = profiles if profiles is not None else default_profiles()
    profile = known.for_type(str(resource.get("resourceType")))
    if profile is None:
        return resource
    meta = dict(resource.get("meta") or {})
    claimed = [p for p in meta.get("profile", []) or [] if p != profile["url"]]
    meta["profile"] = [*claimed, profile["url"]]
    return {**resource, "meta": meta}


_DEFAULT: list[Profiles] = []


def default_profiles() -> Profiles:
    """The profiles in ``profiles/`` under the default canonical base, read once."""
    if not _DEFAULT:
        _DEFAULT.append(load_profiles())
    return _DEFAULT[0]


def declared_urls(resource: Resource, profiles: Profiles) -> Iterable[str]:
    """The profile URLs ``resource`` claims that we publish."""
    return [p for p in (resource.get("meta") or {}).get("profile", []) or [] if p in profiles.by_url]

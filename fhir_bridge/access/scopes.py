"""Who is calling and what their token lets them do: SMART scopes, pure Python (no JOSE, no HTTP).

Scopes follow SMART App Launch 2.2 (scopes-and-launch-context.html): ``system/<type|*>.<cruds>``, the letters
a subset of ``c r u d s`` in that order (create, read, update, delete, search). SMART v1 forms are accepted
as their v2 equivalents: ``.read`` = ``.rs``, ``.write`` = ``.cud``, ``.*`` = ``.cruds``.

Backend services only ever hold ``system/`` scopes (backend-services.html "Scopes"); ``patient/`` and ``user/``
scopes, OpenID scopes and v2 scopes narrowed by a query (``system/Observation.rs?category=…``) are never
granted here: asking for them is not an error, they are simply left out of the grant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from fhir_bridge.errors import InvalidInput

Interaction = Literal["c", "r", "u", "d", "s"]
Role = Literal["platform", "reviewer", "auditor", "operator"]
ROLES: frozenset[str] = frozenset({"platform", "reviewer", "auditor", "operator"})

_ORDER = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_SCOPE = re.compile(r"system/(?P<type>\*|[A-Z][A-Za-z]{0,63})\.(?P<perm>read|write|\*|c?r?u?d?s?)")


@dataclass(frozen=True)
class SystemScope:
    """One ``system/`` scope: a resource type (or ``*``) and the interactions it allows."""

    resource_type: str
    interactions: frozenset[str]

    def __str__(self) -> str:
        return f"system/{self.resource_type}.{''.join(c for c in _ORDER if c in self.interactions)}"


@dataclass(frozen=True)
class AccessContext:
    """The caller behind a verified access token, as routes and use cases see it."""

    client_id: str
    role: Role
    tenant: str
    scopes: frozenset[str]
    jti: str
    reviewer: str | None = None
    expires_at: float | None = None  # the token's exp (epoch seconds)


@lru_cache(maxsize=4096)  # pure, and asked on every API request for the same few scope strings
def parse_scope(scope: str) -> SystemScope | None:
    """The ``system/`` scope ``scope`` stands for, or None if it is anything else (or malformed)."""
    match = _SCOPE.fullmatch(scope)
    if match is None or not match["perm"]:
        return None
    letters = _V1.get(match["perm"], match["perm"])
    return SystemScope(match["type"], frozenset(letters))


def grant_scopes(requested: str, allowed: Iterable[str]) -> tuple[str, ...]:
    """The scopes to grant: what was asked for, cut down to what the client is registered for.

    Both sides may use wildcards and v1 or v2 forms; the grant is written in canonical v2 form, a wildcard
    entry first, and a type entry only for the interactions the wildcard does not already give. Empty when
    nothing requested is allowed (the token endpoint answers ``invalid_scope``).
    """
    return _grant(requested, tuple(allowed))


@lru_cache(maxsize=1024)  # every API request cuts its token's scopes to its role's ceiling (BENCHMARKS.md part 3)
def _grant(requested: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    held = [s for s in map(parse_scope, allowed) if s is not None]
    granted: dict[str, set[str]] = {}
    for wanted in map(parse_scope, requested.split()):
        if wanted is None:
            continue
        for have in held:
            if wanted.resource_type == "*":
                resource_type = have.resource_type
            elif have.resource_type in ("*", wanted.resource_type):
                resource_type = wanted.resource_type
            else:
                continue
            letters = wanted.interactions & have.interactions
            if letters:
                granted.setdefault(resource_type, set()).update(letters)
    everywhere = granted.get("*", set())
    scopes = [SystemScope("*", frozenset(everywhere))] if everywhere else []
    for resource_type in sorted(t for t in granted if t != "*"):
        extra = granted[resource_type] - everywhere
        if extra:
            scopes.append(SystemScope(resource_type, frozenset(extra)))
    return tuple(str(s) for s in scopes)


def has_scope(context: AccessContext, resource_type: str, interaction: Interaction) -> bool:
    """Whether the caller's granted scopes allow ``interaction`` on ``resource_type``."""
    for scope in map(parse_scope, context.scopes):
        if scope and scope.resource_type in ("*", resource_type) and interaction in scope.interactions:
            return True
    return False


def role_ceilings_from(document: Any, file: str = "roles.json") -> dict[str, tuple[str, ...]]:
    """The parsed ``config/roles.json`` (read by :mod:`fhir_bridge.adapters.reference_data`; ``file`` names it
    in errors): role → the scopes that role may ever hold; every role must be there, nothing else."""
    ceilings = {k: v for k, v in document.items() if not k.startswith("_")} if isinstance(document, dict) else {}
    if set(ceilings) != ROLES:
        raise InvalidInput(f"{file} must give the scopes of exactly the roles {', '.join(sorted(ROLES))}")
    for role, scopes in ceilings.items():
        if not isinstance(scopes, list) or not all(isinstance(s, str) and parse_scope(s) for s in scopes):
            raise InvalidInput(f"{file}: {role} must list system/ scopes")
    return {role: tuple(scopes) for role, scopes in ceilings.items()}


def within_ceiling(role: str, scopes: Iterable[str], ceilings: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """``scopes`` cut down to what ``role`` may hold (the same intersection a token grant makes)."""
    return grant_scopes(" ".join(scopes), ceilings.get(role, ()))

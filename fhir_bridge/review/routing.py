"""Routing: which reviewer, or which tumor-board panel, gets a case that triage found ready.

The candidates are the directory of :mod:`fhir_bridge.review.reviewers` (``config/reviewers.json``).

Rules of :func:`route`, in order:

1. never a reviewer (or a panel member) without the case's specialty; declined reviewers/panels excluded;
2. capacity: a reviewer is eligible while ``load < capacity``; a panel only when every member is;
3. language: when some eligible reviewer speaks the requester's language, only those are considered;
   otherwise the case goes to another eligible reviewer rather than wait (``strict_language`` makes it wait);
   for a panel, every member must speak it;
4. spread the load: the least loaded relative to capacity first (then fewer open cases, then id, so the
   choice is deterministic); when the deadline is near (default under 24 h, ``config/deadlines.json``) the
   reviewer with the most spare places first, because they are the likeliest to start at once;
5. ``tumor-board-opinion`` cases go to a panel whose members cover its required disciplines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Literal

from fhir_bridge.case.deadlines import DONE_STATUSES
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.review.reviewers import PANEL_KIND, Reviewer, ReviewerRegistry, language_tag


@dataclass(frozen=True)
class RoutingRequest:
    """What routing needs to know about a ready case. ``excluded``: reviewer or panel ids who declined it;
    ``countries``: ISO countries the requester accepts (empty: any); ``disciplines``: disciplines a panel must
    cover on top of its own list."""

    specialty: str
    kind: str
    language: str | None = None
    deadline: datetime | None = None
    excluded: frozenset[str] = frozenset()
    countries: frozenset[str] = frozenset()
    disciplines: frozenset[str] = frozenset()
    strict_language: bool = False


@dataclass(frozen=True)
class Assignment:
    """Who gets the case: ``owner_reference`` goes into ``Task.owner``; ``members`` are PractitionerRole references."""

    kind: Literal["reviewer", "panel"]
    id: str
    owner_reference: str
    display: str
    members: list[str] = field(default_factory=list)


def route(request: RoutingRequest, registry: ReviewerRegistry, load: Mapping[str, int], *,
          now: datetime | None = None, near: timedelta = timedelta(hours=24)) -> Assignment | None:
    """The reviewer or panel for a ready case, or None when nobody eligible has room (the case waits).

    ``load`` is the number of open cases per PractitionerRole id (see :func:`load_from_tasks`). The rules are
    in the module docstring.
    """
    now = now or datetime.now(UTC)
    urgent = request.deadline is not None and request.deadline - now < near
    language = language_tag(request.language) if request.language else None

    def eligible(reviewer: Reviewer) -> bool:
        return (request.specialty in reviewer.specialties and reviewer.id not in request.excluded
                and reviewer.available(now) and load.get(reviewer.id, 0) < reviewer.capacity
                and (not request.countries or bool(reviewer.countries & request.countries)))

    def rank(members: list[Reviewer], tie: str) -> tuple[Fraction | int | str, ...]:
        ratio = max(Fraction(load.get(m.id, 0), max(m.capacity, 1)) for m in members)
        spare = min(m.capacity - load.get(m.id, 0) for m in members)
        total = sum(load.get(m.id, 0) for m in members)
        return (-spare, ratio, tie) if urgent else (ratio, total, tie)

    if request.kind == PANEL_KIND:
        panels = []
        for panel in registry.panels.values():
            members = [registry.reviewers[m] for m in panel.members]
            covered = frozenset().union(*(m.disciplines for m in members))
            if (panel.active and request.specialty in panel.specialties and panel.id not in request.excluded
                    and all(eligible(m) for m in members) and panel.required | request.disciplines <= covered):
                panels.append((panel, members))
        speakers = [(p, ms) for p, ms in panels if language and all(language in m.languages for m in ms)]
        panels = speakers if speakers or (language and request.strict_language) else panels
        if not panels:
            return None
        panel, members = min(panels, key=lambda pm: rank(pm[1], pm[0].id))
        return Assignment("panel", panel.id, panel.reference, panel.display, [m.reference for m in members])

    candidates = [r for r in registry.reviewers.values() if request.kind in r.kinds and eligible(r)]
    speaking = [r for r in candidates if language in r.languages]
    candidates = speaking if speaking or (language and request.strict_language) else candidates
    if not candidates:
        return None
    chosen = min(candidates, key=lambda r: rank([r], r.id))
    return Assignment("reviewer", chosen.id, chosen.reference, chosen.display, [chosen.reference])


def load_from_tasks(tasks: Iterable[Resource], registry: ReviewerRegistry) -> dict[str, int]:
    """Open cases per PractitionerRole id, from the Tasks' ``owner``: a case owned by a panel counts for
    each of its members, since each of them has to study it before the board meets."""
    load: dict[str, int] = {}
    for task in tasks:
        if task.get("status") in DONE_STATUSES:
            continue
        owner = str((task.get("owner") or {}).get("reference") or "")
        kind, _, ident = owner.split("/_history/")[0].rpartition("/")
        kind = kind.rpartition("/")[2]
        if kind == "PractitionerRole" and ident in registry.reviewers:
            members: tuple[str, ...] = (ident,)
        elif kind == "CareTeam" and ident in registry.panels:
            members = registry.panels[ident].members
        else:
            continue
        for member in members:
            load[member] = load.get(member, 0) + 1
    return load

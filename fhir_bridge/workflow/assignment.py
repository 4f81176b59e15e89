"""Who reviews a ready case, and what a reviewer can do with it: routing, decline, ask for documents, deadlines.

* Routing (:mod:`fhir_bridge.review.routing`, reviewers and panels as data in ``config/reviewers.json``) runs when a
  case becomes ready; ``Task.owner`` names the PractitionerRole (a reviewer) or CareTeam (a tumor-board panel).
  The load of each reviewer is counted from the open Tasks they own. Nobody with room: the case stays ready and
  unowned, with a note, and is routed again by the next refresh or decline.
* A reviewer who declines is remembered on the Task (extension ``declined-by``) and the case is re-routed to
  someone else; a reviewer who needs more documents puts the case on hold (``waiting-for-documents``) with the
  request text in ``statusReason`` and a ``note`` the requester reads; the next refresh re-pulls it.
* Deadlines: the due date (``Task.restriction.period.end``) comes from the request's priority and deadline
  (``config/deadlines.json``); the overdue scan flags late open cases (extension ``overdue``).

The reviewer's identity comes from the caller; binding it to an authenticated client is the security layer's job.
"""

from __future__ import annotations

from collections.abc import Callable

from fhir_bridge.case.deadlines import DONE_STATUSES, overdue_tasks, parse_fhir_datetime
from fhir_bridge.case.intake import request_facts
from fhir_bridge.case.tasks import state_of
from fhir_bridge.errors import BusinessRuleViolation, Forbidden
from fhir_bridge.fhir.elements import extension_value, instant, set_extension
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import CANONICAL_BASE
from fhir_bridge.review.routing import Assignment, RoutingRequest, load_from_tasks, route
from fhir_bridge.workflow.collaborators import CaseRules, Ports
from fhir_bridge.workflow.taskbook import TaskBook

DECLINED = f"{CANONICAL_BASE}/StructureDefinition/declined-by"
OVERDUE = f"{CANONICAL_BASE}/StructureDefinition/overdue"
REVIEW_LANGUAGE = f"{CANONICAL_BASE}/StructureDefinition/review-language"
OPEN_STATUSES = ["requested", "in-progress", "ready", "on-hold"]
_SCAN_PAGE = 500


def request_language(request: Resource) -> str:
    """The language the requester wants the review in (extension ``review-language``; French by default)."""
    return str(extension_value(request, REVIEW_LANGUAGE, "valueCode") or "fr")


def declined_by(task: Resource) -> list[str]:
    return [str(e.get("valueString")) for e in task.get("extension", []) or [] if e.get("url") == DECLINED]


def owner_id(task: Resource) -> str | None:
    reference = str((task.get("owner") or {}).get("reference") or "")
    return reference.rsplit("/", 1)[-1] or None


class Assignments:
    """Routing, the reviewer's decline and request for documents, the overdue scan."""

    def __init__(self, ports: Ports, rules: CaseRules, book: TaskBook) -> None:
        self.ports, self.rules, self.book = ports, rules, book

    async def open_tasks(self) -> list[Resource]:
        tasks: list[Resource] = []
        offset = 0
        while True:
            page = await self.ports.store.search("Task", {"status": OPEN_STATUSES}, count=_SCAN_PAGE, offset=offset)
            tasks.extend(page.resources)
            offset += _SCAN_PAGE
            if offset >= page.total:
                return tasks

    async def assignment_for(self, task: Resource, request: Resource, specialty: str,
                             kind: str) -> Callable[[Resource], None]:
        """The change that gives a case its owner (kept when it has one, e.g. after a request for documents),
        to apply in the same write that makes the case ready."""
        if task.get("owner"):
            return lambda t: None
        load = load_from_tasks(await self.open_tasks(), self.rules.registry)
        due = parse_fhir_datetime(str(((task.get("restriction") or {}).get("period") or {}).get("end") or ""),
                                  end=True)
        assignment = route(RoutingRequest(specialty=specialty, kind=kind, language=request_language(request),
                                          deadline=due, excluded=frozenset(declined_by(task))),
                           self.rules.registry, load, now=self.ports.clock())
        return lambda t: self._assign(t, assignment)

    async def route(self, task: Resource, request: Resource, specialty: str, kind: str) -> Resource:
        """Give a ready case an owner now (after a decline)."""
        return await self.book.edit(task, await self.assignment_for(task, request, specialty, kind))

    def _assign(self, task: Resource, assignment: Assignment | None) -> None:
        if assignment is None:
            task.pop("owner", None)
            self._note(task, "fhir-bridge", "Aucun relecteur disponible pour le moment / no reviewer available yet")
            return
        task["owner"] = {"reference": assignment.owner_reference, "display": assignment.display}

    def _note(self, task: Resource, author: str, text: str) -> None:
        task["note"] = [*(task.get("note") or []), {"authorString": author, "time": instant(self.ports.clock()),
                                                    "text": text}]

    def _check_owner(self, task: Resource, reviewer: str) -> None:
        owner = owner_id(task)
        members = self.rules.registry.panels[owner].members if owner and owner in self.rules.registry.panels else ()
        if reviewer != owner and reviewer not in members:
            raise Forbidden("this case is not assigned to that reviewer")

    async def decline(self, task_id: str, reviewer: str, reason: str) -> Resource:
        """The assigned reviewer (or a panel member, for the panel) declines: re-route to someone else."""
        task = await self.book.read(task_id)
        request = await self.ports.store.read("ServiceRequest", task["focus"]["reference"].split("/")[-1])
        facts = request_facts(request, self.book.terminology)
        if task["status"] != "ready":
            raise BusinessRuleViolation("only a case waiting for its review can be declined")
        self._check_owner(task, reviewer)
        declined = owner_id(task) or reviewer

        def record(t: Resource) -> None:
            t["extension"] = [*(t.get("extension") or []), {"url": DECLINED, "valueString": declined}]
            t.pop("owner", None)
            self._note(t, reviewer, f"Cas décliné / case declined: {reason}" if reason else "Cas décliné / declined")

        task = await self.book.edit(task, record)
        return await self.route(task, request, facts.specialty, facts.kind)

    async def request_documents(self, task_id: str, reviewer: str, text: str) -> Resource:
        """The reviewer needs more: the case waits for documents, the request readable by the requester."""
        if not text.strip():
            raise BusinessRuleViolation("say which documents are needed")
        task = await self.book.read(task_id)
        if task["status"] not in ("ready", "in-progress") or state_of(task) not in ("triaged-ready", "in-review"):
            raise BusinessRuleViolation("documents can be requested only on a case in review")
        self._check_owner(task, reviewer)
        return await self.book.move(task, "on-hold", "waiting-for-documents", reason=text,
                                    change=lambda t: self._note(t, reviewer, text))

    def overdue(self, tasks: list[Resource]) -> list[Resource]:
        """Those of ``tasks`` past their due date now (``/metrics``; :meth:`scan_overdue` flags them)."""
        return overdue_tasks(tasks, self.ports.clock())

    async def scan_overdue(self) -> list[Resource]:
        """Flag every open case past its due date (once); returns the Tasks newly flagged."""
        flagged = []
        for task in self.overdue(await self.open_tasks()):
            if task.get("status") in DONE_STATUSES or extension_value(task, OVERDUE, "valueBoolean"):
                continue

            def flag(t: Resource) -> None:
                set_extension(t, OVERDUE, True, "valueBoolean")
                self._note(t, "fhir-bridge", "Délai de relecture dépassé / review deadline passed")

            flagged.append(await self.book.edit(task, flag))
        return flagged

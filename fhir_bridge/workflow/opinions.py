"""Opinions on a case: a reviewer's, a panel member's, the panel's consensus; amendments; what follows a final.

Rules (STANDARDS.md §5; :mod:`fhir_bridge.opinion.report` for the resource checks, :mod:`fhir_bridge.opinion.content`
for the coded content, :mod:`fhir_bridge.opinion.consensus` for panels):

* **Exactly one final opinion per case.** Every final-type report is created under the unique key
  ``final-opinion:ServiceRequest/<id>`` (atomic in the store), so two concurrent finals — a coordinator and an
  automatic consensus, two retries — can not both exist: the second gets 409 and is told to amend the first.
* **A single reviewer** posts a ``preliminary`` draft and/or the ``final`` opinion, or amends the draft to final.
* **A panel** (Task owned by a CareTeam): each member posts one ``preliminary`` opinion taking a position (and
  amends it with PUT); only the coordinator posts the ``final`` consensus; a member opinion that meets the
  panel's rule (``unanimous``/``majority``) makes the bridge issue the final itself. After the final, members'
  opinions are closed (409).
* **Bridge-owned elements**: ``resultsInterpreter`` and ``performer`` (from the caller's PractitionerRole and the
  registry, never from the body), the dissent Observations and panel extensions, ``presentedForm`` (HTML and
  PDF, French and English, :mod:`fhir_bridge.rendering.forms`), ``issued`` when absent.
* **Amendments** (PUT, If-Match): a final-type report moves only to ``amended``, ``corrected``, ``appended`` or
  ``entered-in-error``, as a new version (``_history``/vread keep the earlier ones); its renderings say which
  version they replace. A preliminary report can be deleted by its author (R4 http.html#delete: read then
  answers 410); a final-type one never is.
* **After a final-type version**: the Task completes (``opinion-final``) with the report in ``Task.output``, and
  the deliveries are enqueued (:mod:`fhir_bridge.workflow.delivery`): the requesting client's webhook, and the
  write-back into the patient's record when the request asked for it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fhir_bridge.case.tasks import output_type, state_of
from fhir_bridge.errors import BusinessRuleViolation, Conflict, Forbidden, NotFound
from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.search_index import index_terms, tenant_of, with_tenant
from fhir_bridge.opinion.consensus import MemberOpinion, attribute, automatic_consensus, merged_report, panel_final
from fhir_bridge.opinion.content import (
    ConclusionSystems,
    OpinionContent,
    consensus_method,
    read_content,
    require_position,
)
from fhir_bridge.opinion.report import (
    FINAL_TYPES,
    based_on_request,
    check_against_case,
    check_amendment,
    check_new_opinion,
)
from fhir_bridge.review.reviewers import Panel
from fhir_bridge.workflow.collaborators import CaseRules, Ports
from fhir_bridge.workflow.conditional import conditional_match
from fhir_bridge.workflow.delivery import Deliveries
from fhir_bridge.workflow.renderings import OpinionRenderings, case_panel, compact, without_dissents
from fhir_bridge.workflow.taskbook import TaskBook

#: given a ServiceRequest id, raises if the caller may not act on that case (the API's tenancy check)
Guard = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Created:
    """What a create answered: the resource, and whether it is new (201) or an If-None-Exist match (200)."""

    resource: Resource
    created: bool


def final_key(request_id: str) -> str:
    return f"final-opinion:ServiceRequest/{request_id}"


class Opinions:
    """The opinion use cases; built by :func:`~fhir_bridge.workflow.bridge.build_bridge`."""

    def __init__(self, ports: Ports, rules: CaseRules, *, book: TaskBook, deliveries: Deliveries,
                 renderings: OpinionRenderings) -> None:
        self.ports, self.rules = ports, rules
        self.book, self.deliveries, self.renderings = book, deliveries, renderings
        self.systems = ConclusionSystems.from_terminology(rules.terminology)

    # -- create -----------------------------------------------------------------------------------------

    async def submit(self, body: Any, *, if_none_exist: str | None = None, guard: Guard | None = None,
                     author: str | None = None) -> Created:
        """POST DiagnosticReport: a reviewer's (or panel member's) opinion on a ready case; ``guard`` (the
        caller's right to this case) runs as soon as the case is known; ``author`` is the caller's
        PractitionerRole id (the bridge signs the opinion with it; None: an in-process caller)."""
        return Created(*await self._submit(body, if_none_exist=if_none_exist, guard=guard, author=author))

    async def _submit(self, body: Any, *, if_none_exist: str | None, guard: Guard | None, author: str | None
                      ) -> tuple[Resource, bool]:
        report = check_new_opinion(body)
        request_id = based_on_request(report)
        if guard is not None:
            await guard(request_id)
        try:
            request = await self.ports.store.read("ServiceRequest", request_id)
        except NotFound:
            raise BusinessRuleViolation("basedOn names an unknown ServiceRequest", expression=["basedOn"]) from None
        task = await self.book.for_request(request_id)
        check_against_case(report, request, task)
        content = read_content(report, self.rules.terminology, systems=self.systems)
        existing, unique_key = await conditional_match(self.ports.store, "DiagnosticReport", if_none_exist,
                                                       {"based-on": [f"ServiceRequest/{request_id}"]})
        if existing is not None:
            return existing, False
        report = {k: v for k, v in report.items() if k not in ("id", "meta", "presentedForm")}
        report = with_tenant(report, tenant_of(request))
        report["basedOn"] = [{"reference": f"ServiceRequest/{request_id}"}]
        report.setdefault("issued", instant(self.ports.clock()))
        final = await self._final_of(request_id)
        panel = case_panel(task, self.rules.registry)
        if panel is not None:
            if author is None or author not in panel.members:
                raise Forbidden("only a member of the panel gives an opinion on a panel's case")
            if final is not None:
                raise Conflict(f"the panel has issued its final opinion (DiagnosticReport/{final['id']}); "
                               "the coordinator amends it")
            if report["status"] == "final":
                return await self._coordinator_final(report, content, request, task, panel, author)
            return await self._member_opinion(report, content, request, task, panel, author, unique_key)
        if author is not None:
            report = attribute(report, author, self.rules.registry)
        if report["status"] == "final":
            if final is not None:
                raise Conflict(f"this case has its final opinion (DiagnosticReport/{final['id']}): amend it with PUT")
            require_position(content, "a final opinion")
            return await self._create_final(report, content, request, task, None), True
        if final is not None:
            raise Conflict(f"this case has its final opinion (DiagnosticReport/{final['id']}): amend it with PUT")
        stored, created = await self.ports.store.create(report, index=index_terms(report), unique_key=unique_key)
        await self._after(task, stored, request)
        return stored, created

    async def _member_opinion(self, report: Resource, content: OpinionContent, request: Resource, task: Resource,
                              panel: Panel, author: str, unique_key: str | None) -> tuple[Resource, bool]:
        require_position(content, "a panel member's opinion")
        mine = [o for o in await self._member_opinions(request["id"]) if o.member == author]
        if mine:
            raise Conflict(f"you have given your opinion (DiagnosticReport/{mine[0].report['id']}): amend it with PUT")
        report = attribute(report, author, self.rules.registry)
        stored, created = await self.ports.store.create(report, index=index_terms(report),
                                                  unique_key=unique_key or f"member-opinion:{request['id']}:{author}")
        if not created and unique_key is None:
            raise Conflict(f"you have given your opinion (DiagnosticReport/{stored['id']}): amend it with PUT")
        await self._after(task, stored, request)
        await self._maybe_automatic(request, task, panel)
        return stored, created

    async def _coordinator_final(self, report: Resource, content: OpinionContent, request: Resource,
                                 task: Resource, panel: Panel, author: str) -> tuple[Resource, bool]:
        if author != panel.coordinator:
            raise BusinessRuleViolation("on a panel, members give 'preliminary' opinions and the coordinator issues "
                                        "the final one", expression=["status"])
        require_position(content, "the panel's final opinion")
        final = panel_final(report, panel=panel, registry=self.rules.registry,
                            opinions=await self._member_opinions(request["id"]), position=content,
                            method="coordinator", terminology=self.rules.terminology)
        return await self._create_final(final, content, request, task, panel), True

    async def _maybe_automatic(self, request: Resource, task: Resource, panel: Panel) -> None:
        """Issue the panel's final opinion when its rule is met (see :mod:`fhir_bridge.opinion.consensus`)."""
        opinions = await self._member_opinions(request["id"])
        automatic = automatic_consensus(panel, opinions)
        if automatic is None or await self._final_of(request["id"]) is not None:
            return
        body = with_tenant(merged_report(automatic), tenant_of(request))
        body["issued"] = instant(self.ports.clock())
        content = automatic.author.content
        final = panel_final(body, panel=panel, registry=self.rules.registry, opinions=opinions, position=content,
                            method=automatic.method, terminology=self.rules.terminology)
        with contextlib.suppress(Conflict):  # a concurrent post (or the coordinator) issued it first: one final
            await self._create_final(final, content, request, task, panel)

    async def _create_final(self, report: Resource, content: OpinionContent, request: Resource, task: Resource,
                            panel: Panel | None) -> Resource:
        """Store the case's one final opinion (unique key, see the module docstring), rendered."""
        report = {**report, "id": uuid.uuid4().hex, "meta": {**(report.get("meta") or {}), "versionId": "1"}}
        report = self.renderings.rendered(report, content, request, panel)
        stored, created = await self.ports.store.create(report, index=index_terms(report),
                                                  unique_key=final_key(request["id"]))
        if not created:
            raise Conflict(f"this case has its final opinion (DiagnosticReport/{stored['id']}): amend it with PUT")
        await self._after(task, stored, request)
        return stored

    # -- amend, delete ------------------------------------------------------------------------------------

    async def amend(self, report_id: str, body: Any, *, if_match: str | None, guard: Guard | None = None,
                    author: str | None = None) -> Resource:
        """PUT DiagnosticReport/{id}: a new version; see the module docstring for who may amend what."""
        current = await self.ports.store.read("DiagnosticReport", report_id)
        request_id = based_on_request(current)
        if guard is not None:
            await guard(request_id)
        report = dict(check_amendment(body, current))
        if report.get("id") not in (None, report_id):
            raise BusinessRuleViolation("the resource id does not match the URL", expression=["id"])
        if current["status"] in FINAL_TYPES and report["status"] not in (FINAL_TYPES - {"final"}) | {
                "entered-in-error"}:
            raise BusinessRuleViolation("a final opinion changes only to amended, corrected, appended or "
                                        "entered-in-error", expression=["status"])
        request = await self.ports.store.read("ServiceRequest", request_id)
        task = await self.book.for_request(request_id)
        panel = case_panel(task, self.rules.registry)
        self._check_amender(current, panel, author)
        stripped = {k: v for k, v in report.items() if k not in ("presentedForm",)}
        if panel is not None and current["status"] in FINAL_TYPES:
            stripped = without_dissents(stripped)
        stripped = compact(stripped)
        content = read_content(stripped, self.rules.terminology, systems=self.systems)
        report = {**stripped, "id": report_id, "basedOn": current["basedOn"],
                  "meta": {**current["meta"], "versionId": str(int(current["meta"]["versionId"]) + 1)}}
        report.setdefault("issued", current.get("issued"))
        if panel is None or current["status"] not in FINAL_TYPES:
            keep = current.get("resultsInterpreter")
            report = {**report, "resultsInterpreter": keep} if keep else report
            if current.get("performer"):
                report["performer"] = current["performer"]
        if report["status"] in FINAL_TYPES:
            if panel is not None and current["status"] == "preliminary":
                raise BusinessRuleViolation("on a panel, only the coordinator issues the final opinion",
                                            expression=["status"])
            if current["status"] == "preliminary" and (final := await self._final_of(request_id)) is not None:
                raise Conflict(f"this case has its final opinion (DiagnosticReport/{final['id']})")
            require_position(content, "a final opinion")
            if panel is not None:
                report = panel_final(report, panel=panel, registry=self.rules.registry,
                                     opinions=await self._member_opinions(request_id), position=content,
                                     method=consensus_method(current) or "coordinator",
                                     terminology=self.rules.terminology)
            report = self.renderings.rendered(report, content, request, panel,
                                    replaces=current if current["status"] in FINAL_TYPES else None)
        elif panel is not None and current["status"] == "preliminary":
            require_position(content, "a panel member's opinion")
        report["meta"] = current["meta"]
        stored = await self.ports.store.update(report, index=index_terms(report), if_match=if_match)
        await self._after(task, stored, request, amended_from=current)
        if panel is not None and stored["status"] == "preliminary":
            await self._maybe_automatic(request, task, panel)
        return stored

    async def delete(self, report_id: str, *, guard: Guard | None = None, author: str | None = None) -> None:
        """DELETE DiagnosticReport/{id}: a draft (``preliminary``) retracted by its author; never a final one."""
        current = await self.ports.store.read("DiagnosticReport", report_id)
        if guard is not None:
            await guard(based_on_request(current))
        if current["status"] != "preliminary":
            raise BusinessRuleViolation("only a preliminary opinion can be deleted; a final one is amended or "
                                        "marked entered-in-error", expression=["status"])
        if author is None or _interpreter(current) != author:
            raise Forbidden("only the author of a preliminary opinion can delete it")
        await self.ports.store.delete("DiagnosticReport", report_id)

    # -- shared ---------------------------------------------------------------------------------------------

    def _check_amender(self, current: Resource, panel: Panel | None, author: str | None) -> None:
        if author is None:
            return
        if panel is not None and current["status"] in FINAL_TYPES:
            if author != panel.coordinator:
                raise Forbidden("only the panel's coordinator amends its final opinion")
        elif _interpreter(current) not in (None, author):
            raise Forbidden("only the author of an opinion amends it")

    async def _after(self, task: Resource, report: Resource, request: Resource, *,
                     amended_from: Resource | None = None) -> None:
        """Move the case on, and after a final-type version enqueue its deliveries."""
        reference = {"reference": f"DiagnosticReport/{report['id']}"}
        status = report["status"]
        if status == "preliminary":
            if task["status"] == "ready":
                await self.book.move(task, "in-progress", "in-review")
            return
        if status == "entered-in-error":
            await self.deliveries.enqueue(report, task, request, event="opinion.entered-in-error")
            return
        task = await self.ports.store.read("Task", task["id"])
        known = any((o.get("valueReference") or {}) == reference for o in task.get("output") or [])
        output = [] if known else [{"type": output_type("opinion", "Opinion"), "valueReference": reference}]
        if task["status"] != "completed" or state_of(task) == "delivered":  # a new version has to be delivered
            task = await self.book.move(task, "completed", "opinion-final", output=output)
        elif output:

            def add_opinion(t: Resource) -> None:  # re-applied to a fresh read if another writer came first
                if not any((o.get("valueReference") or {}) == reference for o in t.get("output") or []):
                    t["output"] = [*(t.get("output") or []), *output]

            task = await self.book.edit(task, add_opinion)
        await self.deliveries.enqueue(report, task, request,
                                      event="opinion.amended" if amended_from else "opinion.final")

    async def _reports(self, request_id: str) -> list[Resource]:
        based_on = {"based-on": [f"ServiceRequest/{request_id}"]}
        page = await self.ports.store.search("DiagnosticReport", based_on, count=200)
        return page.resources

    async def _final_of(self, request_id: str) -> Resource | None:
        return next((r for r in await self._reports(request_id) if r.get("status") in FINAL_TYPES), None)

    async def _member_opinions(self, request_id: str) -> list[MemberOpinion]:
        """The members' current preliminary opinions on the case (oldest first)."""
        opinions = []
        for report in reversed(await self._reports(request_id)):
            member = _interpreter(report)
            if report.get("status") == "preliminary" and member:
                opinions.append(MemberOpinion(member, report,
                                              read_content(report, self.rules.terminology, systems=self.systems)))
        return opinions


def _interpreter(report: Resource) -> str | None:
    refs = [str(r.get("reference", "")) for r in report.get("resultsInterpreter", []) or []]
    return refs[0].rpartition("/")[2] if len(refs) == 1 and refs[0].startswith("PractitionerRole/") else None

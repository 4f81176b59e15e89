"""The renderings of an opinion (its ``presentedForm``): made when a final-type version is written, and made
again from a pseudonymised view for reviewers abroad.

Both the opinion use cases (:mod:`fhir_bridge.workflow.opinions`) and the readers' views of a case
(:mod:`fhir_bridge.workflow.case_bundles`) need them, so they live here, built once by
:func:`fhir_bridge.workflow.bridge.build_bridge` and given to both — neither reaches into the other. The HTML
and PDF themselves are :mod:`fhir_bridge.rendering`'s; a draft has none (STANDARDS.md §5).
"""

from __future__ import annotations

from fhir_bridge.fhir.elements import instant
from fhir_bridge.fhir.resources import Resource
from fhir_bridge.fhir.terminology import Terminology
from fhir_bridge.opinion.content import (
    DISSENT,
    OPINION,
    ConclusionSystems,
    OpinionContent,
    consensus_method,
    read_content,
)
from fhir_bridge.opinion.report import FINAL_TYPES
from fhir_bridge.ports import Clock, system_clock
from fhir_bridge.rendering.forms import LANGUAGES, Renderer, presented_forms, report_view
from fhir_bridge.rendering.view import ReportLabels
from fhir_bridge.review.reviewers import Panel, ReviewerRegistry


def case_panel(task: Resource, registry: ReviewerRegistry) -> Panel | None:
    """The panel that owns the case (``Task.owner`` a CareTeam of the registry), or None."""
    owner = str((task.get("owner") or {}).get("reference") or "")
    kind, _, ident = owner.rpartition("/")
    return registry.panels.get(ident) if kind.endswith("CareTeam") else None


class OpinionRenderings:
    """HTML and PDF renderings, French then English (``renderers`` None: none are made, e.g. in tests of
    the rules alone)."""

    def __init__(self, *, registry: ReviewerRegistry, terminology: Terminology, report_labels: ReportLabels,
                 renderers: tuple[Renderer, Renderer] | None, clock: Clock = system_clock) -> None:
        self.registry = registry
        self.terminology = terminology
        self.report_labels = report_labels  # config/report-labels.json, carried by each view to the renderers
        self.renderers = renderers
        self.clock = clock
        self.systems = ConclusionSystems.from_terminology(terminology)

    def rendered(self, report: Resource, content: OpinionContent, request: Resource, panel: Panel | None, *,
                 replaces: Resource | None = None) -> Resource:
        """``report`` with the bridge's renderings in ``presentedForm`` (none for a draft)."""
        report = compact(report)
        if self.renderers is None or report.get("status") not in FINAL_TYPES:
            return {k: v for k, v in report.items() if k != "presentedForm"}
        panel_name = panel.display if panel is not None else None
        views = [report_view(report, request, content=content, language=lang, registry=self.registry,
                             terminology=self.terminology, report_labels=self.report_labels, panel=panel_name,
                             replaces=replaces)
                 for lang in LANGUAGES]
        forms = presented_forms(views, *self.renderers, created=instant(self.clock()))
        return {**report, "presentedForm": forms}

    async def rerendered(self, report: Resource, request: Resource, task: Resource) -> Resource:
        """``report`` rendered again from what it says now (a pseudonymised view and its request's view); a
        panel's consensus names its panel, the case's owner."""
        content = read_content(without_dissents(report), self.terminology, systems=self.systems)
        panel = case_panel(task, self.registry) if consensus_method(report) else None
        return self.rendered(report, content, request, panel)


def compact(report: Resource) -> Resource:
    """No empty lists: R4 forbids empty arrays (json.html), and stripping dissents can leave some."""
    return {k: v for k, v in report.items() if v != [] and v is not None}


def without_dissents(report: Resource) -> Resource:
    """``report`` without its contained dissent Observations (the bridge recomputes them)."""
    def dissent(r: Resource) -> bool:
        return any(c.get("system") == OPINION and c.get("code") == DISSENT
                   for c in (r.get("code") or {}).get("coding", []) or [])

    gone = {f"#{r.get('id')}" for r in report.get("contained", []) or [] if dissent(r)}
    return {**report, "contained": [r for r in report.get("contained", []) or [] if not dissent(r)],
            "result": [r for r in report.get("result", []) or [] if str(r.get("reference")) not in gone]}

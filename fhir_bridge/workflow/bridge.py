"""The use cases of the exchange, built once per process from their collaborators.

The composition root (:mod:`fhir_bridge.main`) or a test gives the three groups of
:mod:`fhir_bridge.workflow.collaborators` — :class:`Ports`, :class:`CaseRules`, :class:`Deployment` — and gets a
:class:`Bridge`: one object per use case, each built here and nowhere else, each given what it uses and nothing
more. The API and the worker call these directly; no use case reaches into another's collaborators, and
nothing is wired by setting attributes after construction.

The order of construction is the order of dependency: the Task book (every case change), routing, deliveries,
the opinion renderings (shared by the opinions and the readers' views), opinions, case bundles, the case
service, the reads, and the incremental refresh when sync marks are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from fhir_bridge.access.tenancy import Tenancy
from fhir_bridge.workflow.assignment import Assignments
from fhir_bridge.workflow.case_bundles import CaseBundles
from fhir_bridge.workflow.cases import CaseService
from fhir_bridge.workflow.collaborators import CaseRules, Deployment, Ports
from fhir_bridge.workflow.delivery import Deliveries
from fhir_bridge.workflow.opinions import Opinions
from fhir_bridge.workflow.records import Records
from fhir_bridge.workflow.renderings import OpinionRenderings
from fhir_bridge.workflow.sync import CaseSync
from fhir_bridge.workflow.taskbook import TaskBook


@dataclass(frozen=True)
class Bridge:
    """Every use case, and the ports they share (for the worker's job handlers and the API's health)."""

    ports: Ports
    rules: CaseRules
    book: TaskBook
    assignments: Assignments
    deliveries: Deliveries
    opinions: Opinions
    bundles: CaseBundles
    cases: CaseService
    tenancy: Tenancy
    records: Records
    sync: CaseSync | None


def build_bridge(ports: Ports, rules: CaseRules, deployment: Deployment, *, refresh_concurrency: int = 4,
                 refresh_imaging: bool = False) -> Bridge:
    """The use cases over ``ports``; ``refresh_*`` tune the incremental refresh (``[sync]``)."""
    book = TaskBook(ports.store, rules.terminology, ports.clock, audit=ports.audit, agent=deployment.agent)
    assignments = Assignments(ports, rules, book)
    deliveries = Deliveries(ports, rules, book=book, agent=deployment.agent, public_base=deployment.public_base)
    renderings = OpinionRenderings(registry=rules.registry, terminology=rules.terminology,
                                   report_labels=rules.report_labels, renderers=deployment.renderers,
                                   clock=ports.clock)
    opinions = Opinions(ports, rules, book=book, deliveries=deliveries, renderings=renderings)
    bundles = CaseBundles(ports, rules, book=book, renderings=renderings, pseudonym_key=deployment.pseudonym_key)
    cases = CaseService(ports, rules, book=book, assignments=assignments, bundles=bundles,
                        work_dir=deployment.work_dir, max_attempts=deployment.max_attempts)
    tenancy = Tenancy(ports.store, rules.registry)
    sync = None
    if ports.sync_marks is not None:
        sync = CaseSync(ports, cases, ports.sync_marks, concurrency=refresh_concurrency, imaging=refresh_imaging)
    return Bridge(ports=ports, rules=rules, book=book, assignments=assignments, deliveries=deliveries,
                  opinions=opinions, bundles=bundles, cases=cases, tenancy=tenancy,
                  records=Records(ports.store, tenancy), sync=sync)

"""What the use cases are built from, in three named groups (the composition root fills them once).

* :class:`Ports` — the outside world, through the ports of :mod:`fhir_bridge.ports` only: the resource store,
  the job queue, the blob store, the source, and the optional audit log, webhooks, signer and sync marks; and
  the :data:`~fhir_bridge.ports.Clock` every use case asks for the time.
* :class:`CaseRules` — the reference data the rules of a case read: terminology, triage rules, the reviewer
  directory, deadlines, reviewer networks, write-back metadata, the renderings' labels. Loaded once at start-up
  by an adapter (:mod:`fhir_bridge.adapters.reference_data`, files found through the settings), never read from
  disk by the core.
* :class:`Deployment` — who this bridge is: its audit agent, public base URL, pseudonym key, work directory,
  how often a job is tried, and the renderers of an opinion.

:func:`fhir_bridge.workflow.bridge.build_bridge` turns them into the use cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fhir_bridge.access.pseudonym import ReviewerNetworks
from fhir_bridge.audit.events import Party
from fhir_bridge.case.deadlines import DeadlinePolicy
from fhir_bridge.fhir.terminology import Terminology
from fhir_bridge.opinion.writeback import WriteBackConfig
from fhir_bridge.ports import (
    AuditPort,
    BlobStorePort,
    Clock,
    JobQueuePort,
    ResourceStorePort,
    SignerPort,
    SourceFactory,
    SyncStatePort,
    WebhookPort,
    system_clock,
)
from fhir_bridge.rendering.forms import Renderer
from fhir_bridge.rendering.view import ReportLabels
from fhir_bridge.review.reviewers import ReviewerRegistry
from fhir_bridge.review.triage_rules import TriageRules


@dataclass(frozen=True)
class Ports:
    """The adapters the use cases talk through (``audit``, ``webhooks``, ``signer``, ``sync_marks`` None:
    not audited, no webhook delivery, unsigned bundles, no sync marks — for tests of the rules alone)."""

    store: ResourceStorePort
    queue: JobQueuePort
    blobs: BlobStorePort
    source: SourceFactory
    audit: AuditPort | None = None
    webhooks: WebhookPort | None = None
    signer: SignerPort | None = None
    sync_marks: SyncStatePort | None = None
    clock: Clock = system_clock


@dataclass(frozen=True)
class CaseRules:
    """Reference data, parsed and checked once (each file found through a setting, default: the shipped copy)."""

    terminology: Terminology
    triage_rules: TriageRules
    registry: ReviewerRegistry
    deadlines: DeadlinePolicy
    networks: ReviewerNetworks
    write_back: WriteBackConfig
    report_labels: ReportLabels


@dataclass(frozen=True)
class Deployment:
    """This bridge: ``agent`` in AuditEvents, ``public_base`` in webhook bodies, the key of case pseudonyms
    (None: pseudonymised readers are refused), where a pull writes, how often a job is tried, and the HTML and
    PDF renderers of an opinion (None: none made)."""

    work_dir: Path
    agent: Party | None = None
    public_base: str = ""
    pseudonym_key: bytes | None = None
    max_attempts: int = 5
    renderers: tuple[Renderer, Renderer] | None = None

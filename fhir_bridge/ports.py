"""The ports: what the core and the workflow need from the outside, as Protocols.

Adapters (``fhir_bridge.adapters``) implement them against real httpx, Redis and the file system; tests of
the core use in-memory fakes (``tests/fakes.py``). Nothing here imports a framework.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource

#: What every use case asks for the time: an aware UTC ``datetime`` (tests give a fixed or stepping clock).
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The machine's clock, in UTC: the :data:`Clock` of a running bridge."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RetrievedAttachment:
    """An attachment streamed to ``path``; ``sha1_b64`` is base64(SHA-1(bytes)) as in ``Attachment.hash``."""

    url: str
    path: Path
    size: int
    sha1_b64: str
    sha256_hex: str
    content_type: str | None


class SourcePort(Protocol):
    """A national-record FHIR source speaking IHE MHD (ITI-67/68) and ImagingStudy search."""

    base_url: str

    async def find_patient(self, identifier: PatientIdentifier) -> Resource:
        """``GET Patient?identifier=SYSTEM|VALUE``: exactly one Patient or UnknownPatient/AmbiguousPatient."""
        ...

    async def find_document_references(
        self, patient_id: str, *, extra: Mapping[str, str] | None = None
    ) -> list[Resource]:
        """ITI-67 ``DocumentReference?patient=<id>&status=current``, every page."""
        ...

    async def find_imaging_studies(
        self, patient_id: str, *, extra: Mapping[str, str] | None = None
    ) -> tuple[list[Resource], dict[str, Resource]]:
        """``ImagingStudy?patient=<id>`` every page, with the Endpoints they reference (by reference)."""
        ...

    async def retrieve(
        self, url: str, dest: Path, *, expected_size: int | None = None, expected_sha1_b64: str | None = None
    ) -> RetrievedAttachment:
        """ITI-68: stream the document's bytes to ``dest``; AttachmentError(reason=...) when unusable."""
        ...

    def absolute(self, reference: str) -> str:
        """A reference or URL made absolute against the source's base."""
        ...

    async def provide_document_bundle(self, bundle: Resource, *, patient: PatientIdentifier | None = None
                                      ) -> Resource:
        """ITI-65: POST the transaction Bundle to the source's base; its ``transaction-response``."""
        ...


#: Opens the source for one piece of work (the runtime's pooled client; a test's fake).
SourceFactory = Callable[[], AbstractAsyncContextManager[SourcePort]]


class AuditPort(Protocol):
    """The audit trail (``fhir_bridge.adapters.audit_log.RedisAuditLog``): stores one AuditEvent for good.

    ``append`` returns the event as stored (its ``id`` the position in the log, ``recorded`` stamped by the
    log) and raises :class:`~fhir_bridge.errors.AuditUnavailable` when it can not: the caller then refuses
    or fails the exchange (fail closed, no audit no exchange).
    """

    async def append(self, event: dict[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where and with which secret a client is notified (Standard Webhooks: ``whsec_`` + base64 key)."""

    url: str
    secret: str = field(repr=False)


class WebhookPort(Protocol):
    """Notifies requesting clients (``fhir_bridge.adapters.webhooks``)."""

    def target(self, client_id: str) -> WebhookTarget | None:
        """The client's webhook, or None when it has none."""
        ...

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """POST ``body``; the HTTP status, or DeliveryFailed when no answer came (connection, timeout)."""
        ...


@dataclass(slots=True)
class Job:
    """One unit of background work taken from the queue."""

    id: str
    kind: str
    payload: dict[str, Any]
    attempt: int = 1
    entry_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


JobHandler = Callable[[Job], Awaitable[None]]


class JobQueuePort(Protocol):
    async def enqueue(self, kind: str, payload: dict[str, Any], *, job_id: str | None = None) -> str: ...


@dataclass(frozen=True, slots=True)
class StoredBlob:
    digest: str  # sha256 hex of the plaintext
    size: int


class BlobStorePort(Protocol):
    """Content-addressed storage of large bytes (attachments, case bundles) under the data directory."""

    async def put_file(self, path: Path) -> StoredBlob: ...

    async def put_bytes(self, data: bytes) -> StoredBlob: ...

    def open_chunks(self, digest: str) -> AsyncIterator[bytes]: ...

    async def read_bytes(self, digest: str) -> bytes: ...

    async def exists(self, digest: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class SearchPage:
    """One page of a store search, newest first (``meta.lastUpdated`` descending)."""

    resources: list[Resource]
    total: int


class ResourceStorePort(Protocol):
    """Versioned FHIR resource storage (FHIR R4 http.html: versionId, lastUpdated, history, tombstones).

    ``index`` maps a search parameter name to the token values the resource answers to (computed by the
    core, ``fhir_bridge.fhir.search_index``), so the store needs no FHIR knowledge.
    """

    async def create(
        self,
        resource: Resource,
        *,
        index: Mapping[str, list[str]],
        unique_key: str | None = None,
    ) -> tuple[Resource, bool]:
        """Store a new resource (id assigned when missing, versionId "1", lastUpdated now).

        With ``unique_key``: atomically, if a resource was already created under that key, return it with
        ``False`` and store nothing (conditional create, If-None-Exist).
        """
        ...

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        """The current version; NotFound when unknown, Gone when deleted."""
        ...

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> Resource: ...

    async def history(self, resource_type: str, resource_id: str) -> list[Resource]:
        """Every version, newest first."""
        ...

    async def update(
        self,
        resource: Resource,
        *,
        index: Mapping[str, list[str]],
        if_match: str | None = None,
    ) -> Resource:
        """Store a new version; PreconditionFailed when ``if_match`` (a versionId) is not the current one."""
        ...

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """FHIR delete: later reads answer Gone; history keeps the versions; the unique key is released."""
        ...

    async def search(
        self,
        resource_type: str,
        criteria: Mapping[str, list[str]],
        *,
        count: int,
        offset: int = 0,
    ) -> SearchPage:
        """Resources matching every parameter (AND) with any of its values (OR)."""
        ...


class PayloadSigner(Protocol):
    """One signature being computed over a payload fed in pieces (see :class:`SignerPort`)."""

    def update(self, data: bytes) -> None: ...

    def finish(self) -> str:
        """The detached JWS (compact serialisation, empty payload part)."""
        ...


class SignerPort(Protocol):
    """Signs case bundles: ES384 detached JWS with an unencoded payload (RFC 7515 appendix F, RFC 7797), so a
    bundle of any size is signed while it streams (``fhir_bridge.adapters.signing.Es384Signer``)."""

    key_id: str

    def payload_signer(self, signed_at: str) -> PayloadSigner:
        """A fresh signer claiming ``signed_at`` (an RFC 3339 UTC instant) as its signing time."""
        ...


@dataclass(frozen=True, slots=True)
class SyncMark:
    """How far the bridge has read a patient's record at the source (issue 8, ``sync refresh``).

    ``patient_id``: the source's Patient id, so an incremental search needs no Patient search first;
    ``watermark``: the newest ``meta.lastUpdated`` seen, as the source wrote it (its own clock and precision),
    for ``_lastUpdated=gt<watermark>``.
    """

    patient_id: str | None = None
    watermark: str | None = None


class SyncStatePort(Protocol):
    """Per-patient sync marks (``fhir_bridge.adapters.sync_state.RedisSyncState``)."""

    async def get(self, patient: PatientIdentifier) -> SyncMark: ...

    async def advance(self, patient: PatientIdentifier, *, patient_id: str | None = None,
                      watermark: str | None = None) -> None:
        """Record the Patient id, and move the watermark forward only: an older one is ignored."""
        ...

"""In-memory fakes of the ports (STYLE.md rule 5): the observable behaviour of each real adapter
(``fhir_bridge.adapters``), with no Redis, no HTTP and no threads, for fast tests of the core."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

from fhir_bridge import errors
from fhir_bridge.adapters.blobstore import _check_digest
from fhir_bridge.adapters.queue_policy import PermanentJobError
from fhir_bridge.adapters.redis_store import _check_id, _check_type, _instant, _last_updated_bounds
from fhir_bridge.fhir.identity import PatientIdentifier
from fhir_bridge.fhir.resources import Resource, dumps, loads
from fhir_bridge.ports import Job, RetrievedAttachment, SearchPage, SourcePort, StoredBlob, SyncMark


def _load(body: bytes) -> Resource:
    return cast(Resource, loads(body))  # a fresh copy each time, decimals exact, as the real store reads back


@dataclass
class _Record:
    bodies: dict[int, bytes] = field(default_factory=dict)  # version → stored JSON (as the real store keeps it)
    cur: int = 0
    deleted: bool = False
    pairs: list[tuple[str, str]] = field(default_factory=list)
    unique_key: str | None = None
    score: int = 0  # lastUpdated in ms since the epoch


class InMemoryStore:
    """:class:`~fhir_bridge.ports.ResourceStorePort` plus ``delete``, like ``RedisResourceStore``."""

    def __init__(self, *, clock: Callable[[], datetime] | None = None, new_id: Callable[[], str] | None = None):
        self._clock = clock or (lambda: datetime.now(UTC))
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._records: dict[tuple[str, str], _Record] = {}
        self._unique: dict[tuple[str, str], str] = {}

    async def create(self, resource: Resource, *, index: Mapping[str, list[str]],
                     unique_key: str | None = None) -> tuple[Resource, bool]:
        _check_type(resource.get("resourceType"))
        rtype, rid = str(resource["resourceType"]), _check_id(resource.get("id") or self._new_id())
        if unique_key is not None and (rtype, unique_key) in self._unique:
            other = self._records[(rtype, self._unique[(rtype, unique_key)])]
            if not other.deleted:
                return _load(other.bodies[other.cur]), False
        if (rtype, rid) in self._records:
            raise errors.Conflict(f"{rtype}/{rid} already exists")
        record = self._records[(rtype, rid)] = _Record(unique_key=unique_key)
        if unique_key is not None:
            self._unique[(rtype, unique_key)] = rid
        return self._write(record, resource, rid, index), True

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        record = self._current(resource_type, resource_id)
        return _load(record.bodies[record.cur])

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> Resource:
        record, version = self._known(resource_type, resource_id), int(version_id) if version_id.isdigit() else -1
        if version in record.bodies:
            return _load(record.bodies[version])
        if record.deleted and version == record.cur:  # the tombstone version
            raise errors.Gone(f"version {version_id} of {resource_type}/{resource_id} is its deletion")
        raise errors.NotFound(f"{resource_type}/{resource_id} has no version {version_id}")

    async def history(self, resource_type: str, resource_id: str) -> list[Resource]:
        record = self._known(resource_type, resource_id)
        return [_load(record.bodies[v]) for v in sorted(record.bodies, reverse=True)]

    async def update(self, resource: Resource, *, index: Mapping[str, list[str]],
                     if_match: str | None = None) -> Resource:
        _check_type(resource.get("resourceType"))
        rtype, rid = str(resource["resourceType"]), _check_id(resource.get("id"))
        record = self._current(rtype, rid)
        if if_match is not None and if_match != str(record.cur):
            raise errors.PreconditionFailed(f"{rtype}/{rid} is at version {record.cur}, not {if_match}")
        return self._write(record, resource, rid, index)

    async def delete(self, resource_type: str, resource_id: str) -> None:
        """A tombstone: read answers Gone, history keeps the versions, the unique key is released."""
        record = self._known(resource_type, resource_id)
        if record.deleted:
            return
        record.cur, record.deleted, record.pairs = record.cur + 1, True, []
        if record.unique_key is not None and self._unique.get((resource_type, record.unique_key)) == resource_id:
            del self._unique[(resource_type, record.unique_key)]

    async def search(self, resource_type: str, criteria: Mapping[str, list[str]], *, count: int,
                     offset: int = 0) -> SearchPage:
        _check_type(resource_type)
        if count < 0 or offset < 0:
            raise errors.InvalidInput("count and offset must not be negative")
        low, high = -(2**53), 2**53
        for value in criteria.get("_lastUpdated", []):
            lo, hi = _last_updated_bounds(value)
            low, high = max(low, lo), min(high, hi)
        wanted = {p: set(v) for p, v in criteria.items() if p != "_lastUpdated"}
        if any(not values for values in criteria.values()):
            return SearchPage(resources=[], total=0)
        hits = [
            (record.score, rid, record)
            for (rtype, rid), record in self._records.items()
            if rtype == resource_type and not record.deleted and low <= record.score <= high
            and all(any((p, v) in record.pairs for v in values) for p, values in wanted.items())
        ]
        hits.sort(key=lambda hit: (hit[0], hit[1]), reverse=True)  # newest first, then id, as the Lua script
        page = [_load(record.bodies[record.cur]) for _, _, record in hits[offset:offset + count]]
        return SearchPage(resources=page, total=len(hits))

    def _write(self, record: _Record, resource: Resource, rid: str, index: Mapping[str, list[str]]) -> Resource:
        when, score = _instant(self._clock())
        meta = resource.get("meta") or {}
        if not isinstance(meta, dict):
            raise errors.InvalidInput("meta must be an object", expression=["meta"])
        record.cur += 1
        stored: Resource = {"resourceType": resource["resourceType"], "id": rid,
                            "meta": {**meta, "versionId": str(record.cur), "lastUpdated": when}}
        stored.update((k, v) for k, v in resource.items() if k not in stored)
        record.bodies[record.cur], record.score = dumps(stored), score
        record.pairs = list(dict.fromkeys((p, v) for p, values in index.items() for v in values))
        return _load(record.bodies[record.cur])

    def _known(self, rtype: str, rid: str) -> _Record:
        _check_type(rtype)
        record = self._records.get((rtype, rid))
        if record is None:
            raise errors.NotFound(f"{rtype}/{rid} is not known")
        return record

    def _current(self, rtype: str, rid: str) -> _Record:
        record = self._known(rtype, rid)
        if record.deleted:
            raise errors.Gone(f"{rtype}/{rid} has been deleted")
        return record


class InMemoryQueue:
    """:class:`~fhir_bridge.ports.JobQueuePort`; ``drain`` plays the worker loop (retries, dead letters)."""

    def __init__(self, *, max_attempts: int = 5) -> None:
        self.max_attempts = max_attempts
        self.enqueued: list[Job] = []  # every job actually added, in order
        self.state: dict[str, str] = {}  # job id → pending, done or dead
        self.dead: list[tuple[Job, BaseException]] = []
        self.ready: deque[Job] = deque()  # waiting to run, retries included

    async def enqueue(self, kind: str, payload: dict[str, Any], *, job_id: str | None = None) -> str:
        job_id = job_id or uuid.uuid4().hex
        if not 0 < len(job_id) <= 256:
            raise errors.InvalidInput("a job id is 1 to 256 characters")
        try:
            body = json.loads(json.dumps(payload, ensure_ascii=False))
        except (TypeError, ValueError):
            raise errors.InvalidInput(f"the payload of a {kind} job is not JSON") from None
        if self.state.get(job_id) in ("pending", "done"):
            return job_id
        job = Job(job_id, kind, body, 1, f"{len(self.enqueued) + 1}-0")
        self.enqueued.append(job)
        self.ready.append(job)
        self.state[job_id] = "pending"
        return job_id

    async def drain(self, handler: Callable[[Job], Awaitable[None]], *, limit: int = 100) -> int:
        """Run queued jobs (and their retries, at once) until none is left; returns how many runs were made."""
        made = 0
        while self.ready and made < limit:
            job, made = self.ready.popleft(), made + 1
            try:
                await handler(copy.deepcopy(job))
            except Exception as exc:
                if job.attempt >= self.max_attempts or isinstance(exc, PermanentJobError):
                    self.state[job.id] = "dead"
                    self.dead.append((job, exc))
                else:
                    self.ready.append(Job(job.id, job.kind, job.payload, job.attempt + 1, job.entry_id, job.meta))
            else:
                self.state[job.id] = "done"
        return made


class InMemoryBlobs:
    """:class:`~fhir_bridge.ports.BlobStorePort` named by SHA-256; small chunks so streaming is exercised."""

    def __init__(self, *, chunk_size: int = 4096) -> None:
        self.chunk_size = chunk_size
        self.blobs: dict[str, bytes] = {}

    async def put_file(self, path: Path) -> StoredBlob:
        return await self.put_bytes(Path(path).read_bytes())

    async def put_bytes(self, data: bytes) -> StoredBlob:
        digest = hashlib.sha256(data).hexdigest()
        self.blobs[digest] = bytes(data)
        return StoredBlob(digest=digest, size=len(data))

    def open_chunks(self, digest: str) -> AsyncGenerator[bytes, None]:
        data = self._get(digest)  # an unknown digest fails at the call, as in FileBlobStore
        async def chunks() -> AsyncGenerator[bytes, None]:
            for start in range(0, len(data), self.chunk_size):
                yield data[start:start + self.chunk_size]
        return chunks()

    async def read_bytes(self, digest: str) -> bytes:
        return self._get(digest)

    async def exists(self, digest: str) -> bool:
        _check_digest(digest)  # InvalidInput for anything but 64 lowercase hex characters, as on disk
        return digest in self.blobs

    def _get(self, digest: str) -> bytes:
        _check_digest(digest)
        if digest not in self.blobs:
            raise errors.NotFound(f"no blob {digest}")
        return self.blobs[digest]


class FakeSource:
    """:class:`~fhir_bridge.ports.SourcePort` over a small world: ``{"patients": [...], "documents": [...],
    "studies": [...], "endpoints": [...], "attachments": {url or reference: bytes}}``. Documents and studies are
    what the source answers for its patient, unfiltered (a source can be wrong; the core must screen)."""

    def __init__(self, world: Mapping[str, Any], base_url: str = "https://source.test/fhir") -> None:
        self.base_url = base_url.rstrip("/")
        self.patients, self.documents, self.studies, self.endpoints = (
            list[Resource](world.get(k, [])) for k in ("patients", "documents", "studies", "endpoints"))
        self.attachments: dict[str, bytes] = {self.absolute(k): v for k, v in world.get("attachments", {}).items()}
        self.unavailable = False  # True: every call raises SourceUnavailable, as after all the client's retries
        self.calls: list[str] = []
        self.provided: list[Resource] = []  # ITI-65 Bundles taken, in order
        self.lose_answer = False  # True: the next ITI-65 is stored but its answer "lost" (SourceUnavailable)
        self.searches: list[tuple[str, dict[str, str]]] = []  # (resource type, extra parameters) of each search

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.unavailable:
            raise errors.SourceUnavailable(f"source did not answer ({what})", url=self.base_url)

    async def find_patient(self, identifier: PatientIdentifier) -> Resource:
        self._call("find_patient")
        carrying = [p for p in self.patients if any(identifier.matches(i) for i in p.get("identifier", []))]
        if len(carrying) > 1:
            raise errors.AmbiguousPatient("the source has more than one Patient with that identifier")
        if not carrying:
            raise errors.UnknownPatient("no Patient with that identifier at the source")
        return copy.deepcopy(carrying[0])

    async def find_document_references(self, patient_id: str, *, extra: Mapping[str, str] | None = None
                                       ) -> list[Resource]:
        self._call("find_document_references")
        self.searches.append(("DocumentReference", dict(extra or {})))
        if extra and "identifier" in extra:  # MHD ITI-67 by identifier: the documents provided through ITI-65
            return [copy.deepcopy(d) for d in self.written()
                    if (d.get("masterIdentifier") or {}).get("value") == extra["identifier"].split("|")[-1]]
        return _updated_after(copy.deepcopy(self.documents), extra)

    async def provide_document_bundle(self, bundle: Resource, *, patient: PatientIdentifier | None = None
                                      ) -> Resource:
        """ITI-65 like the sandbox: a duplicate masterIdentifier is refused (409), replaced documents superseded."""
        self._call("provide_document_bundle")
        docs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
        known = {(d.get("masterIdentifier") or {}).get("value") for d in self.written()}
        if any((d.get("masterIdentifier") or {}).get("value") in known for d in docs):
            raise errors.SourceRejected("source refused the request: HTTP 409", status=409)
        stored = copy.deepcopy(bundle)
        for n, entry in enumerate(e for e in stored["entry"] if e["resource"]["resourceType"] == "DocumentReference"):
            entry["resource"]["id"] = f"w{len(self.provided) + 1}-{n}"
        self.provided.append(stored)
        if self.lose_answer:
            self.lose_answer = False
            raise errors.SourceUnavailable("connection lost while reading the answer")
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [{"response": {"status": "201 Created",
                                        "location": f"{e['resource']['resourceType']}/"
                                                    f"{e['resource'].get('id', 'x')}/_history/1"}}
                          for e in stored["entry"]]}

    def written(self) -> list[Resource]:
        """Every DocumentReference provided through ITI-65, with its server id."""
        return [e["resource"] for b in self.provided for e in b["entry"]
                if e["resource"]["resourceType"] == "DocumentReference"]

    async def find_imaging_studies(self, patient_id: str, *, extra: Mapping[str, str] | None = None
                                   ) -> tuple[list[Resource], dict[str, Resource]]:
        self._call("find_imaging_studies")
        self.searches.append(("ImagingStudy", dict(extra or {})))
        endpoints = {self.absolute(f"Endpoint/{e['id']}"): copy.deepcopy(e) for e in self.endpoints}
        return _updated_after(copy.deepcopy(self.studies), extra), endpoints

    async def retrieve(self, url: str, dest: Path, *, expected_size: int | None = None,
                       expected_sha1_b64: str | None = None) -> RetrievedAttachment:
        """ITI-68 like SourceClient.retrieve: bytes written to ``dest`` only when size and hash check out."""
        url = self.absolute(url)
        self._call(f"retrieve {url}")
        data = self.attachments.get(url)
        if data is None:
            raise errors.AttachmentError("retrieve answered HTTP 404", reason="retrieve-failed", status=404, url=url)
        if expected_size is not None and len(data) != expected_size:
            raise errors.AttachmentError(f"attachment has {len(data)} bytes, {expected_size} declared",
                                         reason="size-mismatch", url=url)
        sha1 = hashlib.sha1(data, usedforsecurity=False).digest()
        if expected_sha1_b64 is not None and base64.b64encode(sha1).decode() != expected_sha1_b64:
            raise errors.AttachmentError("attachment bytes do not match attachment.hash (SHA-1)",
                                         reason="hash-mismatch", url=url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return RetrievedAttachment(url=url, path=dest, size=len(data), sha1_b64=base64.b64encode(sha1).decode(),
                                   sha256_hex=hashlib.sha256(data).hexdigest(), content_type=None)

    def absolute(self, reference: str) -> str:
        return reference if urlsplit(reference).scheme else urljoin(self.base_url + "/", reference)


class FakeWebhooks:
    """:class:`~fhir_bridge.ports.WebhookPort`: ``targets`` by client id; ``down`` makes every send fail as a
    refused connection; ``answers`` pops the statuses to answer (default 204). ``sent`` keeps what arrived."""

    def __init__(self, targets: Mapping[str, Any]) -> None:
        self.targets = dict(targets)
        self.down = False
        self.answers: list[int] = []
        self.sent: list[tuple[str, bytes, dict[str, str]]] = []

    def target(self, client_id: str) -> Any:
        return self.targets.get(client_id)

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        if self.down:
            raise errors.DeliveryFailed("the webhook did not answer (ConnectError)")
        status = self.answers.pop(0) if self.answers else 204
        if 200 <= status < 300:
            self.sent.append((url, body, dict(headers)))
        return status


def _updated_after(resources: list[Resource], extra: Mapping[str, str] | None) -> list[Resource]:
    """``_lastUpdated`` as a source applies it (a resource without meta.lastUpdated never matches a bound)."""
    value = (extra or {}).get("_lastUpdated")
    if value is None:
        return resources
    low, high = _last_updated_bounds(value)
    stamps = [(r, str((r.get("meta") or {}).get("lastUpdated") or "")) for r in resources]
    return [r for r, stamp in stamps if stamp and low <= _last_updated_bounds(stamp)[0] <= high]


def fake_source_factory(source: SourcePort) -> Callable[[], AbstractAsyncContextManager[SourcePort]]:
    """The ``source`` factory CaseService takes: each ``async with`` yields the same fake."""
    @asynccontextmanager
    async def open_source() -> AsyncIterator[SourcePort]:
        yield source

    return open_source


class InMemorySyncState:
    """:class:`~fhir_bridge.ports.SyncStatePort` like ``RedisSyncState``: the watermark only moves forward."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[str | None, str | None]] = {}

    async def get(self, patient: PatientIdentifier) -> SyncMark:
        pid, wm = self.marks.get(patient.token, (None, None))
        return SyncMark(pid, wm)

    async def advance(self, patient: PatientIdentifier, *, patient_id: str | None = None,
                      watermark: str | None = None) -> None:
        from fhir_bridge.case.watermarks import instant_micros

        pid, wm = self.marks.get(patient.token, (None, None))
        if watermark and (wm is None or instant_micros(watermark) > instant_micros(wm)):
            wm = watermark
        self.marks[patient.token] = (patient_id or pid, wm)


def make_bridge(*, store: Any, queue: Any, blobs: Any, source: Callable[[], AbstractAsyncContextManager[SourcePort]],
                terminology: Any, work_dir: Path, max_attempts: int = 5, clock: Callable[[], datetime] | None = None,
                triage_rules: Any = None, registry: Any = None, deadlines: Any = None, networks: Any = None,
                write_back: Any = None, report_labels: Any = None, audit: Any = None, audit_agent: Any = None,
                signer: Any = None, pseudonym_key: bytes | None = None, webhooks: Any = None, sync_marks: Any = None,
                renderers: Any = "default", public_base: str = "") -> Any:
    """The use cases (:func:`fhir_bridge.workflow.bridge.build_bridge`) over fakes, with the shipped reference
    data for whatever a test does not give, and the real HTML/PDF renderers unless told otherwise."""
    from fhir_bridge.ports import system_clock
    from fhir_bridge.rendering.html import render_html
    from fhir_bridge.rendering.pdf import render_pdf
    from fhir_bridge.workflow.bridge import build_bridge
    from fhir_bridge.workflow.collaborators import CaseRules, Deployment, Ports
    from tests.reference import shipped

    data = shipped().rules
    ports = Ports(store=store, queue=queue, blobs=blobs, source=source, audit=audit, webhooks=webhooks,
                  signer=signer, sync_marks=sync_marks, clock=clock or system_clock)
    rules = CaseRules(terminology=terminology, triage_rules=triage_rules or data.triage_rules,
                      registry=registry or data.registry, deadlines=deadlines or data.deadlines,
                      networks=networks or data.networks, write_back=write_back or data.write_back,
                      report_labels=report_labels or data.report_labels)
    deployment = Deployment(work_dir=work_dir, agent=audit_agent, public_base=public_base,
                            pseudonym_key=pseudonym_key, max_attempts=max_attempts,
                            renderers=(render_html, render_pdf) if renderers == "default" else renderers)
    return build_bridge(ports, rules, deployment)

"""The composition root: settings → reference data and adapters → the use cases → the API app or a worker.

The API, the worker and the CLI's runtime get their adapters here and nowhere else (a one-off ``pull``, the
demo and the sandbox open their own few). The data files are read once (:func:`load_reference_data`, through
the settings) and handed down; the use cases are built by :func:`fhir_bridge.workflow.bridge.build_bridge`.
Redis: ``redis.url`` when set; otherwise the bridge starts a private ``redis-server`` with append-only
persistence under ``data_dir/redis`` and writes its URL to ``data_dir/redis/url`` so a ``fhir-bridge worker``
with the same data directory joins it.

The audit trail (issue 7) is wired here: one :class:`RedisAuditLog` per process, signing with the bridge's
audit key, on the same Redis (the private server runs with ``appendfsync always`` by default, so an event is
on disk before the answer it records leaves). Three writers feed it: the API's audit middleware (one event per
inbound call, ``fhir_bridge.api.audit_middleware``), the source client's exchange hook (one per outbound
exchange, :func:`fhir_bridge.adapters.source_audit.source_recorder`) and the TaskBook (one per case change).
A timer signs a checkpoint every ``[audit] checkpoint_seconds`` in quiet periods, and the runtime signs one
when it closes (API and worker shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from fhir_bridge import worker
from fhir_bridge.adapters.audit_log import RedisAuditLog
from fhir_bridge.adapters.blobstore import BlobKeyring, FileBlobStore
from fhir_bridge.adapters.clients import ClientRegistry
from fhir_bridge.adapters.pseudonym_key import load_or_create_pseudonym_key
from fhir_bridge.adapters.queue import RedisJobQueue
from fhir_bridge.adapters.queue_admin import QueueAdmin
from fhir_bridge.adapters.queue_policy import KindPolicy
from fhir_bridge.adapters.redis_clients import connect
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.redis_store import RedisResourceStore
from fhir_bridge.adapters.reference_data import (
    ReferenceFiles,
    load_deadline_policy,
    load_labels,
    load_networks,
    load_profiles,
    load_registry,
    load_role_ceilings,
    load_terminology,
    load_triage_rules,
    load_write_back_config,
)
from fhir_bridge.adapters.scheduler import RedisScheduler
from fhir_bridge.adapters.settings import Settings, clients_file
from fhir_bridge.adapters.signing import Es384Signer, JwsVerifier, SigningKeyError, load_or_create_signer
from fhir_bridge.adapters.source_audit import source_recorder
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.adapters.sync_state import RedisSyncState
from fhir_bridge.adapters.webhooks import HttpWebhooks
from fhir_bridge.audit.events import Party
from fhir_bridge.errors import AuditUnavailable, BusinessRuleViolation, InvalidInput, NotFound, SourceRejected
from fhir_bridge.fhir.profiles import Profiles
from fhir_bridge.ports import SourcePort
from fhir_bridge.rendering.html import render_html
from fhir_bridge.rendering.pdf import render_pdf
from fhir_bridge.schedule import JOB_KINDS, load_schedule
from fhir_bridge.workflow.bridge import Bridge, build_bridge
from fhir_bridge.workflow.collaborators import CaseRules, Deployment, Ports
from fhir_bridge.workflow.delivery import DELIVERY_KINDS

if TYPE_CHECKING:
    from fastapi import FastAPI

log = structlog.get_logger("fhir_bridge.main")


@dataclass
class Runtime:
    """What one process opened: the adapters it closes at the end, and the use cases built on them."""

    settings: Settings
    redis: Redis
    queue: RedisJobQueue
    audit: RedisAuditLog
    party: Party  # the bridge as an AuditEvent agent and observer
    reference: ReferenceData  # the data files, read once from the settings' paths
    bridge: Bridge


@dataclass(frozen=True)
class ReferenceData:
    """Every data file a process passes down, parsed and checked once at start-up (each found through the
    settings, else the shipped copy): the rules of a case, the roles' scope ceilings, our published profiles."""

    rules: CaseRules
    role_ceilings: Mapping[str, tuple[str, ...]]
    profiles: Profiles


def load_reference_data(settings: Settings | None = None) -> ReferenceData:
    """Read every data file (None: the shipped copies); the reviewer networks are checked against the registry
    where both meet (the case bundles' readers)."""
    where = ReferenceFiles.of(settings)
    rules = CaseRules(terminology=load_terminology(where.mappings), triage_rules=load_triage_rules(where.mappings),
                      registry=load_registry(where.reviewers), deadlines=load_deadline_policy(where.deadlines),
                      networks=load_networks(where.reviewer_networks),
                      write_back=load_write_back_config(where.write_back),
                      report_labels=load_labels(where.report_labels))
    return ReferenceData(rules=rules, role_ceilings=load_role_ceilings(where.roles),
                         profiles=load_profiles(where.profiles))


def bridge_party(settings: Settings, role: str) -> Party:
    """The bridge in AuditEvents: its public FHIR base when configured (one id for every process of a
    deployment), else ``fhir-bridge``; ``role`` (api, worker…) and the host tell the processes apart."""
    base = settings.api.public_base_url.rstrip("/")
    return Party(f"{base}/fhir" if base else "fhir-bridge", address=socket.gethostname(), name=f"fhir-bridge {role}")


def audit_signer(settings: Settings) -> Es384Signer:
    """The key that signs audit checkpoints and export manifests ([audit] signing_key, or the bridge's own)."""
    if settings.audit.signing_key:
        path = Path(settings.audit.signing_key)
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read [audit] signing_key {path.name}: {type(exc).__name__}") from None
        return Es384Signer.from_pem(pem)
    return load_or_create_signer(settings.data_dir / "keys")


def audit_verifier(settings: Settings, signer: Es384Signer, extra: tuple[Path, ...] = ()) -> JwsVerifier:
    """Verifies checkpoints signed by the current key and by the earlier ones ([audit] verify_keys)."""
    jwks: list[dict[str, Any]] = [signer.public_jwk()]
    for path in [*map(Path, settings.audit.verify_keys), *extra]:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise SigningKeyError(f"cannot read the verification key {path.name}: {type(exc).__name__}") from None
        jwks += data.get("keys", [data]) if isinstance(data, dict) else []
    return JwsVerifier(jwks)


def open_audit_log(settings: Settings, redis: Redis, *, verify_keys: tuple[Path, ...] = ()) -> RedisAuditLog:
    signer = audit_signer(settings)
    return RedisAuditLog(redis, signer=signer, verifier=audit_verifier(settings, signer, verify_keys),
                         checkpoint_every=settings.audit.checkpoint_every,
                         checkpoint_seconds=settings.audit.checkpoint_seconds)  # fmt: skip


def url_file(settings: Settings) -> Path:
    return settings.data_dir / "redis" / "url"


@contextlib.contextmanager
def redis_url_for(settings: Settings, *, may_start: bool) -> Iterator[str]:
    """Yield the Redis URL to use, starting the private server when allowed and needed."""
    if settings.redis.url:
        yield settings.redis.url
        return
    recorded = url_file(settings)
    if recorded.is_file():
        url = recorded.read_text("utf-8").strip()
        if _answers(url):
            yield url
            return
    if not may_start:
        raise InvalidInput(
            "no Redis: set FHIR_BRIDGE_REDIS_URL, or start `fhir-bridge serve` with the same data directory first"
        )
    with EmbeddedRedis(settings.data_dir, binary=settings.redis.server_binary,
                       appendfsync=settings.redis.appendfsync) as server:
        recorded.parent.mkdir(parents=True, exist_ok=True)
        recorded.write_text(server.url, "utf-8")
        try:
            yield server.url
        finally:
            recorded.unlink(missing_ok=True)


def _answers(url: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def open_queue(settings: Settings, redis_url: str) -> RedisJobQueue:
    """The job queue with its own clients (close it with ``aclose``), as every process of a deployment sees it;
    deliveries retry on their own policy (``[delivery]``: a webhook may be down for hours)."""
    # a delivery that can not succeed as it is (no PDF, the source refuses the document: the source client has
    # already retried what retrying can mend) is a dead letter at once, for `sync deliver` once the cause is fixed
    delivery = KindPolicy(settings.delivery.max_attempts, settings.delivery.backoff_initial,
                          settings.delivery.backoff_max,
                          permanent=(BusinessRuleViolation, InvalidInput, NotFound, SourceRejected))
    return RedisJobQueue.from_url(
        redis_url,
        cluster=settings.redis.cluster,
        max_attempts=settings.worker.max_attempts,
        reclaim_idle_ms=settings.worker.reclaim_idle_ms,
        backoff_initial=settings.worker.retry_backoff_initial,
        backoff_max=settings.worker.retry_backoff_max,
        policies=dict.fromkeys(DELIVERY_KINDS, delivery),
    )


@contextlib.asynccontextmanager
async def open_queue_admin(settings: Settings, redis_url: str) -> AsyncIterator[QueueAdmin]:
    """The queue's administration (``fhir-bridge jobs``, ``sync deliver``) with its own clients."""
    queue = open_queue(settings, redis_url)
    try:
        yield QueueAdmin(queue)
    finally:
        await queue.aclose()


@contextlib.asynccontextmanager
async def open_audit(settings: Settings, redis_url: str, *, verify_keys: tuple[Path, ...] = ()
                     ) -> AsyncIterator[RedisAuditLog]:
    """The audit log alone (``fhir-bridge audit``), on its own Redis client; ``verify_keys``: earlier keys."""
    redis = connect(redis_url, cluster=settings.redis.cluster)
    try:
        yield open_audit_log(settings, redis, verify_keys=verify_keys)
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, redis_url: str, role: str = "cli",
                       reference: ReferenceData | None = None) -> AsyncIterator[Runtime]:
    """Open every adapter once for this process, and close them at the end (signing a last audit checkpoint).
    ``reference``: the data files when already read (the API needs its profiles first); None: read here."""
    reference = reference or load_reference_data(settings)
    redis = connect(redis_url, cluster=settings.redis.cluster)
    audit = open_audit_log(settings, redis)
    party = bridge_party(settings, role)
    queue = open_queue(settings, redis_url)
    webhooks = HttpWebhooks(ClientRegistry.load(clients_file(settings), missing_ok=True),
                            timeout=settings.delivery.webhook_timeout)
    source = None
    if settings.source.url:
        source_as_party = Party(settings.source.url.rstrip("/"), address=settings.source.url.rstrip("/"))
        source = SourceClient(settings.source.url, settings.source,
                              on_exchange=source_recorder(audit, party, source_as_party))

    @contextlib.asynccontextmanager
    async def shared_source() -> AsyncIterator[SourcePort]:
        if source is None:
            raise InvalidInput("no source: set FHIR_BRIDGE_SOURCE_URL or [source] url in the configuration")
        yield source  # one pooled client per process; closed with the runtime

    ports = Ports(
        store=RedisResourceStore(redis),
        queue=queue,
        # attachments and case bundles are encrypted at rest (AES-256-GCM, key id stored with each blob)
        blobs=FileBlobStore(settings.data_dir / "blobs",
                            BlobKeyring.load_or_create(settings.data_dir / "keys" / "blob-keys.json")),
        source=shared_source,
        audit=audit,
        webhooks=webhooks,
        # case bundles are signed with the bridge's (audit) key; reviewers abroad read them pseudonymised
        signer=audit_signer(settings),
        # sync marks per patient, recorded by every pull, for the incremental refresh (``sync refresh``)
        sync_marks=RedisSyncState(redis),
    )
    deployment = Deployment(work_dir=settings.data_dir / "work", agent=party, public_base=settings.api.public_base_url,
                            pseudonym_key=load_or_create_pseudonym_key(settings.data_dir / "keys"),
                            max_attempts=settings.worker.max_attempts, renderers=(render_html, render_pdf))
    bridge = build_bridge(ports, reference.rules, deployment, refresh_concurrency=settings.sync.refresh_concurrency,
                          refresh_imaging=settings.sync.refresh_imaging)
    timer = asyncio.create_task(_checkpoint_timer(audit, settings.audit.checkpoint_seconds))
    try:
        yield Runtime(settings=settings, redis=redis, queue=queue, audit=audit, party=party, reference=reference,
                      bridge=bridge)
    finally:
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer
        await _checkpoint(audit)
        if source is not None:
            await source.aclose()
        await webhooks.aclose()
        await queue.aclose()
        await redis.aclose()


async def _checkpoint(audit: RedisAuditLog) -> None:
    """Sign the chain's end now (a no-op when a checkpoint covers it); a failure is logged, never raised."""
    try:
        await audit.checkpoint()
    except (AuditUnavailable, RedisError, OSError) as exc:
        log.warning("audit.checkpoint_failed", error=type(exc).__name__)


async def _checkpoint_timer(audit: RedisAuditLog, seconds: float) -> None:
    """Appends checkpoint when one is due; this signs the last events of a quiet period too."""
    while True:
        await asyncio.sleep(seconds)
        await _checkpoint(audit)


def build_app(settings: Settings, redis_url: str) -> FastAPI:
    """The API app; its lifespan opens the runtime. The API's modules are imported here, in the one process
    that serves: a worker or a CLI command does not load the routes, the auditor page and FastAPI."""
    from fhir_bridge.adapters.auth import BridgeKeys, ClientRegistry, RedisReplayCache
    from fhir_bridge.api.app import create_app
    from fhir_bridge.api.auth_routes import AuthServer

    holder: dict[str, Runtime] = {}
    reference = load_reference_data(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, redis_url, "api", reference) as runtime:
            holder["runtime"] = runtime
            app.state.bridge = runtime.bridge
            app.state.queue = runtime.queue
            app.state.queue_admin = QueueAdmin(runtime.queue)  # for /metrics: jobs by kind and state
            app.state.audit = runtime.audit
            app.state.audit_bridge = runtime.party
            app.state.schedule = open_scheduler(runtime)  # for /metrics: ticks claimed per scheduled job
            app.state.auth = AuthServer(
                registry=ClientRegistry.load(clients_file(settings), missing_ok=True),
                keys=BridgeKeys.load_or_create(settings.data_dir / "keys"),
                replay_cache=RedisReplayCache(runtime.redis),
                token_lifetime=settings.auth.token_lifetime,
                ceilings=reference.role_ceilings,
            )
            yield

    async def ready() -> None:
        await holder["runtime"].redis.ping()

    return create_app(settings, None, lifespan=lifespan, ready=ready, profiles=reference.profiles)


async def run_worker(settings: Settings, redis_url: str, name: str | None = None) -> None:
    """Take jobs until SIGTERM/SIGINT; the current job finishes first (:mod:`fhir_bridge.worker`)."""
    consumer = name or f"{socket.gethostname()}-{os.getpid()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings, redis_url, "worker") as runtime:
        scheduler = open_scheduler(runtime)
        handlers = worker.job_handlers(runtime.bridge, scheduler, consumer,
                                       redrive=QueueAdmin(runtime.queue).redrive,
                                       delivery_kinds=settings.sync.delivery_kinds)
        await worker.work(runtime.queue, scheduler, handlers, consumer, stop)


def open_scheduler(runtime: Runtime) -> RedisScheduler:
    """The ``[schedule]`` jobs, claimed tick by tick through a Redis lease (InvalidInput for a bad expression)."""
    conf = runtime.settings.schedule
    jobs = load_schedule({name: getattr(conf, name) for name in JOB_KINDS}, conf.timezone)
    return RedisScheduler(runtime.redis, runtime.queue, jobs, grace_seconds=conf.grace_seconds)

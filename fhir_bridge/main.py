"""The composition root: settings → adapters → the case service → the API app or a worker.

Nothing else builds adapters. Redis: ``redis.url`` when set; otherwise the bridge starts a private
``redis-server`` with append-only persistence under ``data_dir/redis`` and writes its URL to
``data_dir/redis/url`` so a ``fhir-bridge worker`` with the same data directory joins it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog
from fastapi import FastAPI
from redis.asyncio import Redis

from fhir_bridge.adapters.blobstore import BlobKeyring, FileBlobStore
from fhir_bridge.adapters.queue import RedisJobQueue
from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.adapters.redis_store import RedisResourceStore
from fhir_bridge.adapters.settings import Settings
from fhir_bridge.adapters.source_client import SourceClient
from fhir_bridge.errors import InvalidInput
from fhir_bridge.ports import Job, SourcePort
from fhir_bridge.terminology import load_terminology
from fhir_bridge.workflow.cases import COLLECT_JOB, CaseService

log = structlog.get_logger("fhir_bridge.main")


@dataclass
class Runtime:
    settings: Settings
    redis: Redis
    queue: RedisJobQueue
    cases: CaseService


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


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, redis_url: str) -> AsyncIterator[Runtime]:
    """Open every adapter once for this process, and close them at the end."""
    redis = Redis.from_url(redis_url)
    queue = RedisJobQueue.from_url(
        redis_url,
        max_attempts=settings.worker.max_attempts,
        reclaim_idle_ms=settings.worker.reclaim_idle_ms,
        backoff_initial=settings.worker.retry_backoff_initial,
        backoff_max=settings.worker.retry_backoff_max,
    )
    source = SourceClient(settings.source.url, settings.source) if settings.source.url else None

    @contextlib.asynccontextmanager
    async def shared_source() -> AsyncIterator[SourcePort]:
        if source is None:
            raise InvalidInput("no source: set FHIR_BRIDGE_SOURCE_URL or [source] url in the configuration")
        yield source  # one pooled client per process; closed with the runtime

    cases = CaseService(
        store=RedisResourceStore(redis),
        queue=queue,
        # attachments and case bundles are encrypted at rest (AES-256-GCM, key id stored with each blob)
        blobs=FileBlobStore(settings.data_dir / "blobs",
                            BlobKeyring.load_or_create(settings.data_dir / "keys" / "blob-keys.json")),
        source=shared_source,
        terminology=load_terminology(),
        work_dir=settings.data_dir / "work",
        max_attempts=settings.worker.max_attempts,
    )
    try:
        yield Runtime(settings=settings, redis=redis, queue=queue, cases=cases)
    finally:
        if source is not None:
            await source.aclose()
        await queue.aclose()
        await redis.aclose()


def build_app(settings: Settings, redis_url: str) -> FastAPI:
    """The API app; its lifespan opens the runtime."""
    from fhir_bridge.api.app import create_app

    holder: dict[str, Runtime] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_runtime(settings, redis_url) as runtime:
            holder["runtime"] = runtime
            app.state.cases = runtime.cases
            app.state.queue = runtime.queue
            yield

    async def ready() -> None:
        await holder["runtime"].redis.ping()

    return create_app(settings, None, lifespan=lifespan, ready=ready)


async def run_worker(settings: Settings, redis_url: str, name: str | None = None) -> None:
    """Take jobs until SIGTERM/SIGINT; the current job finishes first."""
    consumer = name or f"{socket.gethostname()}-{os.getpid()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings, redis_url) as runtime:
        handlers = {COLLECT_JOB: runtime.cases.run_collect_job}

        async def handle(job: Job) -> None:
            handler = handlers.get(job.kind)
            if handler is None:
                raise InvalidInput(f"unknown job kind {job.kind!r}")
            structlog.contextvars.bind_contextvars(job=job.id, attempt=job.attempt)
            try:
                await handler(job)
            finally:
                structlog.contextvars.clear_contextvars()

        log.info("worker.started", consumer=consumer)
        await runtime.queue.run(consumer, handle, stop)
        log.info("worker.stopped", consumer=consumer)

"""Sandbox configuration and per-app state, with the FastAPI dependencies that hand them to routes."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response

from fhir_bridge.fhir.resources import FHIR_JSON, dumps
from fhir_bridge.sandbox.render import Urls
from fhir_bridge.sandbox.world import World

_REQUEST_LOG_LIMIT = 100_000


@dataclass
class SandboxConfig:
    """How the sandbox behaves; read once by the CLI and passed in."""

    seed: int = 1
    patients: int = 5
    page_cap: int = 50
    latency_ms: int = 0
    fault_rate: float = 0.0
    #: serve the world's damaged attachments damaged; off, every attachment matches its size and hash
    corrupt: bool = True
    big_docs: int = 0
    big_total_bytes: int = 0
    #: extra, older ImagingStudies for patient 0 (benchmarks)
    archive_studies: int = 0
    public_base_url: str | None = None
    corrupt_patients: tuple[int, ...] = (0,)
    #: the day the world is dated from; None: the real current UTC date when the app is created
    today: date | None = None
    #: indexes of the patients whose case lacks its pathology report (else its first blocking group)
    incomplete: tuple[int, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.page_cap < 1:
            raise ValueError("page_cap must be at least 1")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate is a fraction between 0 and 1")
        if self.latency_ms < 0:
            raise ValueError("latency_ms cannot be negative")
        if any(not 0 <= index < self.patients for index in self.incomplete):
            raise ValueError(f"incomplete patients are indexes from 0 to {self.patients - 1}")


@dataclass
class SandboxState:
    """One app's world (mutated by ITI-65 writes), its fault generator and its request log."""

    config: SandboxConfig
    world: World
    rng: random.Random
    requests: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=_REQUEST_LOG_LIMIT))

    def urls(self, request: Request) -> Urls:
        base = self.config.public_base_url or str(request.base_url)
        return Urls(base.rstrip("/"))


def get_state(request: Request) -> SandboxState:
    state: SandboxState = request.app.state.sandbox
    return state


def get_urls(request: Request) -> Urls:
    return get_state(request).urls(request)


StateDep = Annotated[SandboxState, Depends(get_state)]
UrlsDep = Annotated[Urls, Depends(get_urls)]


class FhirResponse(Response):
    """A FHIR JSON body (``application/fhir+json``), decimals kept exact by :func:`resources.dumps`."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return dumps(content)

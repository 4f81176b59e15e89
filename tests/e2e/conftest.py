"""End-to-end fixtures: real processes on free ports (redis-server, sandbox, API, workers)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fhir_bridge.adapters.redis_server import EmbeddedRedis
from fhir_bridge.dev.clients import DevClients, provision
from fhir_bridge.dev.processes import ProcessGroup, free_port


@dataclass
class Sandbox:
    url: str  # FHIR base
    root: str

    def world(self) -> dict[str, Any]:
        return httpx.get(f"{self.root}/_sandbox/world", timeout=10).raise_for_status().json()


def start_on_free_port(group: ProcessGroup, name: str, args: list[str], health_path: str, **kwargs: Any) -> int:
    """Start a child on a free port, trying another port if one was taken between the pick and the bind."""
    for attempt in range(3):
        port = free_port()
        try:
            group.start(name, [*args, "--port", str(port)], health_url=f"http://127.0.0.1:{port}{health_path}",
                        **kwargs)
            return port
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_sandbox(group: ProcessGroup, name: str, *args: str) -> Sandbox:
    port = start_on_free_port(group, name, ["sandbox", *args], "/healthz")
    return Sandbox(url=f"http://127.0.0.1:{port}/fhir", root=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="session")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    with ProcessGroup(tmp_path_factory.mktemp("logs")) as group:
        yield group


@pytest.fixture(scope="session")
def sandbox(processes: ProcessGroup) -> Sandbox:
    """The sandbox with small pages (3) so every search pages, corrupted attachments on."""
    return start_sandbox(processes, "sandbox", "--patients", "4", "--page-cap", "3")


@dataclass
class Bridge:
    api: str
    redis_url: str
    data_dir: Path
    env: dict[str, str]
    group: ProcessGroup
    clients: DevClients

    def start_worker(self, name: str, **env: str) -> Any:
        return self.group.start(name, ["worker", "--name", name], extra_env={**self.env, **env})

    def auth(self, client_id: str = "platform", scope: str | None = None) -> httpx.Auth:
        """SMART Backend Services tokens for one of the registered clients (see fhir_bridge.dev.clients):
        ``platform``, ``platform-other``, ``auditor``, ``operator``, ``reviewer-<PractitionerRole id>``."""
        return self.clients.auth(client_id, self.api, scope)

    def client(self, client_id: str = "platform", **kwargs: Any) -> httpx.Client:
        """An httpx client calling as ``client_id`` (close it, or use it in a ``with``)."""
        return httpx.Client(auth=self.auth(client_id), timeout=kwargs.pop("timeout", 30), **kwargs)

    def reviewer_of(self, task: dict[str, Any]) -> str:
        """The client id of a reviewer the case of ``task`` is assigned to."""
        return self.clients.reviewer_for(task["owner"]["reference"])


def start_bridge(group: ProcessGroup, redis: EmbeddedRedis, source: str, data_dir: Path, name: str,
                 webhooks: dict[str, str] | None = None, **env: str) -> Bridge:
    clients = provision(data_dir / "clients.json", data_dir / "client-keys", webhooks=webhooks)
    full_env = {"FHIR_BRIDGE_REDIS_URL": redis.url, "FHIR_BRIDGE_SOURCE_URL": source,
                "FHIR_BRIDGE_DATA_DIR": str(data_dir), "FHIR_BRIDGE_LOG_LEVEL": "INFO",
                "FHIR_BRIDGE_SOURCE__BACKOFF_INITIAL": "0.05", **env}
    port = start_on_free_port(group, f"{name}-api", ["serve"], "/readyz", extra_env=full_env)
    return Bridge(api=f"http://127.0.0.1:{port}/fhir", redis_url=redis.url, data_dir=data_dir, env=full_env,
                  group=group, clients=clients)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, sandbox: Sandbox) -> Iterator[Bridge]:
    """Redis, the API and one worker against the session sandbox."""
    data_dir = tmp_path_factory.mktemp("bridge")
    with EmbeddedRedis(data_dir) as redis, ProcessGroup(data_dir / "logs") as group:
        bridge = start_bridge(group, redis, sandbox.url, data_dir, "main")
        bridge.start_worker("worker-1")
        yield bridge


from tests.liar_source import liar  # noqa: E402,F401  (a fixture)

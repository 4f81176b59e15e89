"""With no FHIR_BRIDGE_REDIS_URL, `serve` starts a private redis-server (append-only) under its data directory,
a `worker` with the same data directory joins it, and stopping `serve` stops it (issue 3, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fhir_bridge.dev.clients import provision
from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Sandbox, start_on_free_port
from tests.e2e.test_exchange import post, wait_task

pytestmark = pytest.mark.e2e


def test_serve_starts_a_private_redis_that_a_worker_joins_and_that_stops_with_it(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    env = {"FHIR_BRIDGE_SOURCE_URL": sandbox.url, "FHIR_BRIDGE_DATA_DIR": str(tmp_path)}
    clients = provision(tmp_path / "clients.json", tmp_path / "client-keys")  # data_dir/clients.json: the default
    clean = {k: v for k, v in os.environ.items() if k != "FHIR_BRIDGE_REDIS_URL"}
    with ProcessGroup(tmp_path / "logs", env=clean) as group:
        alone = subprocess.run([sys.executable, "-m", "fhir_bridge", "worker"], env={**clean, **env},
                               capture_output=True, text=True, timeout=60)
        assert alone.returncode == 2 and "no Redis" in alone.stderr  # nothing to join yet: one line, exit 2

        port = start_on_free_port(group, "api", ["serve"], "/readyz", extra_env=env)
        api = f"http://127.0.0.1:{port}/fhir"
        url_file = tmp_path / "redis" / "url"
        assert url_file.is_file()
        config = (tmp_path / "redis" / "redis.conf").read_text()
        assert "appendonly yes" in config and "appendfsync always" in config
        group.start("worker", ["worker"], extra_env=env)

        patient = sandbox.world()["patients"][2]
        with httpx.Client(auth=clients.auth("platform", api), timeout=30) as platform:
            answer = post(platform, api, "ServiceRequest", second_opinion_request(patient, "EMBEDDED-1"))
            assert answer.status_code == 201, answer.text
            assert wait_task(platform, api, answer.json()["id"])["status"] in ("ready", "on-hold")
        assert list((tmp_path / "redis").glob("*.aof")) or list((tmp_path / "redis").glob("appendonly*"))
        overdue = subprocess.run([sys.executable, "-m", "fhir_bridge", "sync", "overdue"], env={**clean, **env},
                                 capture_output=True, text=True, timeout=60)
        assert overdue.returncode == 0 and overdue.stdout.strip() == '{"flagged": 0}', overdue.stderr
        for command in (["audit", "purge"], ["audit", "verify"]):  # retention 0 keeps all; the chain still holds
            done = subprocess.run([sys.executable, "-m", "fhir_bridge", *command], env={**clean, **env},
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (command, done.stdout, done.stderr)

        pid = int((tmp_path / "redis" / "redis.pid").read_text().strip())
        group.stop_all()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not _alive(pid), "the private redis-server outlived serve"
        assert not url_file.exists()
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{api}/metadata", timeout=2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()

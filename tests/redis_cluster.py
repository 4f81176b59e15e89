"""A real three-node Redis Cluster for tests (issue 8): three ``redis-server --cluster-enabled yes`` on free
ports, slots split in three and the nodes introduced with CLUSTER ADDSLOTS / MEET (no redis-cli needed)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fhir_bridge.adapters.redis_server import _find_binary
from fhir_bridge.dev.processes import free_port

SLOTS = 16384


class RedisClusterNodes:
    def __init__(self, root: Path, nodes: int = 3) -> None:
        self.root, self.count = root, nodes
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> RedisClusterNodes:
        binary = _find_binary("redis-server")
        for n in range(self.count):
            port = _port_with_free_bus()
            where = self.root / f"node-{n}"
            where.mkdir(parents=True)
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                    "--cluster-config-file", str(where / "nodes.conf"), "--dir", str(where), "--save", "",
                    "--appendonly", "no", "--logfile", str(where / "redis.log")]
            self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True))
            self.ports.append(port)
        clients = [self._wait(port) for port in self.ports]
        share = SLOTS // self.count
        for n, client in enumerate(clients):
            last = SLOTS - 1 if n == self.count - 1 else (n + 1) * share - 1
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", n + 1)  # distinct epochs, as redis-cli does
            client.execute_command("CLUSTER ADDSLOTS", *range(n * share, last + 1))
        for port in self.ports[1:]:
            clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 20
        while not all(_state(c.execute_command("CLUSTER INFO")) == "ok" for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        for client in clients:
            client.close()
        return self

    def _wait(self, port: int) -> redis.Redis:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _state(info: object) -> str:
    """cluster_state from CLUSTER INFO, which redis-py answers parsed (a dict) or raw, by version."""
    if isinstance(info, dict):
        return str(info.get("cluster_state", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "ok" if "cluster_state:ok" in text else ""


def _port_with_free_bus() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(50):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield nodes.start()
    finally:
        nodes.stop()

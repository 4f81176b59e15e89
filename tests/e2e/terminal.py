"""Running a command with its stderr on a pseudo-terminal, to see what a person at a terminal sees."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Mapping


def run_on_terminal(args: list[str], env: Mapping[str, str], timeout: float = 120) -> tuple[int, bytes]:
    """``args`` with stdout discarded and stderr on a pty; its exit code and everything the terminal showed."""
    main_fd, terminal = pty.openpty()
    try:
        done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=terminal, timeout=timeout,
                              env={**env, "TERM": "xterm", "COLUMNS": "100"}, check=False)
        os.close(terminal)
        seen = b""
        while True:
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # the terminal closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(main_fd)
    return done.returncode, seen

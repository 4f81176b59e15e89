"""A small webhook receiver that checks Standard Webhooks signatures: for ``fhir-bridge demo`` and the tests.

A platform receiving the bridge's notifications does what this does (standardwebhooks.com "Verifying
webhooks"): recompute ``v1,`` + base64 HMAC-SHA256 over ``webhook-id.webhook-timestamp.body`` with its secret,
compare in constant time, refuse a timestamp more than five minutes off, and treat ``webhook-id`` as the
idempotency key (a notification seen before is acknowledged again but counted once). It serves real HTTP on
``127.0.0.1`` from a thread, and can be stopped and started again on the same port (a receiver that is down for
a while: connections are refused meanwhile).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 300


def verify(secret: str, headers: dict[str, str], body: bytes, *, now: float | None = None) -> bool:
    """Whether ``body`` with these headers was signed with ``secret`` (and is fresh)."""
    try:
        message_id, timestamp = headers["webhook-id"], int(headers["webhook-timestamp"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > TOLERANCE_S:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, f"{message_id}.{timestamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    offered = [s.partition(",")[2] for s in headers.get("webhook-signature", "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, o) for o in offered)


@dataclass
class Notification:
    id: str
    event: dict[str, Any]
    headers: dict[str, str]


@dataclass
class WebhookReceiver:
    """``received``: each distinct notification once; ``deliveries``: every request that came (duplicates too)."""

    port: int
    secret: str
    path: str = "/hooks"
    received: list[Notification] = field(default_factory=list)
    deliveries: int = 0
    refused: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                ok = self.path == receiver.path and verify(receiver.secret, headers, body)
                with receiver._lock:
                    receiver.deliveries += 1
                    if not ok:
                        receiver.refused += 1
                    elif all(n.id != headers["webhook-id"] for n in receiver.received):
                        receiver.received.append(Notification(headers["webhook-id"], json.loads(body), headers))
                self.send_response(204 if ok else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True, name="webhook-receiver").start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Notification]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.1)
        raise TimeoutError(f"{len(self.received)} of {count} notifications arrived")

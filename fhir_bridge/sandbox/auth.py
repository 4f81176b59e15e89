"""The sandbox as a SMART Backend Services source (``fhir-bridge sandbox --require-token --clients FILE``).

A real national-record source hands out tokens only to registered systems (STANDARDS.md §8), so the bridge's
outbound side (``[source] token_url``…) needs a source that does the same to be tested for real. This module
makes the sandbox one, reusing the bridge's own checks (:mod:`fhir_bridge.adapters.auth`) with a key of its own:

* ``POST /auth/token``: ``client_credentials`` with a ``private_key_jwt`` assertion whose ``aud`` is this URL,
  checked against the clients in FILE (the bridge's registry format: each client's public JWK Set and scopes),
  jti replay refused; answered with an ES384 access token of at most 300 s for the scopes granted;
* every ``/fhir`` request but ``metadata`` and the discovery document needs ``Authorization: Bearer`` with such
  a token for this server (``aud`` = the FHIR base the request reached): none → 401, refused → 401 with
  ``WWW-Authenticate: Bearer error="invalid_token"`` (which makes a client renew its token once), a scope
  not covering the resource type and interaction → 403 (``insufficient_scope``);
* ``GET /_sandbox/auth-log``: for tests, every gated request's host, path, whether it carried a bearer token
  and the status it got, so a test can show a token never went to another origin. Never the token itself.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fhir_bridge.access.scopes import Interaction, has_scope
from fhir_bridge.adapters.auth import (
    BridgeKeys,
    ClientRegistry,
    InvalidToken,
    OAuthError,
    issue_access_token,
    oauth_error_body,
    read_token_request,
    smart_configuration,
    verify_access_token,
    verify_client_assertion,
)
from fhir_bridge.sandbox.app import outcome_response

__all__ = ["MemoryReplayCache", "TokenGate", "require_tokens"]

_OPEN = ("/fhir/metadata", "/fhir/.well-known/smart-configuration")
_MAX_FORM_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class MemoryReplayCache:
    """Assertion ``jti``s seen, for their lifetime (one sandbox process: no need for Redis)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    async def remember(self, jti: str, ttl_s: int) -> bool:
        now = time.monotonic()
        self._until = {k: t for k, t in self._until.items() if t > now}
        if jti in self._until:
            return False
        self._until[jti] = now + ttl_s
        return True


@dataclass
class TokenGate:
    """The sandbox's authorization server state: registered clients, its signing key, the replay cache."""

    registry: ClientRegistry
    keys: BridgeKeys = field(default_factory=lambda: BridgeKeys(_new_p384_pem()))
    replay_cache: MemoryReplayCache = field(default_factory=MemoryReplayCache)
    lifetime_s: int = 300
    log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100_000))


def _new_p384_pem() -> bytes:
    return ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def require_tokens(app: FastAPI, clients_file: Path) -> TokenGate:
    """Put ``app`` (the sandbox) behind SMART Backend Services tokens for the clients in ``clients_file``."""
    gate = TokenGate(ClientRegistry.load(clients_file))

    async def token(request: Request) -> Response:
        body = await request.body()
        if len(body) > _MAX_FORM_BYTES:
            return JSONResponse({"error": "invalid_request", "error_description": "form too large"}, 400)
        try:
            asked = read_token_request(dict(parse_qsl(body.decode("latin-1"))))
            now = time.time()
            client = await verify_client_assertion(asked.assertion, token_url=_root(request) + "/auth/token",
                                                   registry=gate.registry, replay_cache=gate.replay_cache, now=now)
            answer = issue_access_token(client, asked.scope, signing_key=gate.keys,
                                        issuer=_root(request) + "/auth/token", audience=_root(request) + "/fhir",
                                        lifetime_s=gate.lifetime_s, now=now)
        except OAuthError as exc:  # RFC 6749 §5.2: invalid_client is 401, the others 400
            return JSONResponse(oauth_error_body(exc), 401 if exc.code == "invalid_client" else 400, _NO_STORE)
        return JSONResponse(answer, headers=_NO_STORE)

    async def discovery(request: Request) -> Response:
        return JSONResponse(smart_configuration(_root(request) + "/auth/token"))

    async def auth_log(request: Request) -> Response:
        return JSONResponse(list(gate.log))

    app.add_api_route("/auth/token", token, methods=["POST"], include_in_schema=False)
    app.add_api_route("/fhir/.well-known/smart-configuration", discovery, methods=["GET"], include_in_schema=False)
    app.add_api_route("/_sandbox/auth-log", auth_log, methods=["GET"], include_in_schema=False)
    app.add_middleware(_BearerGate, gate=gate)
    return gate


def _root(request: Request) -> str:
    # the address the caller reached, not a configured public one: tokens are for the server that was asked
    return str(request.base_url).rstrip("/")


class _BearerGate:
    """ASGI middleware: the bearer check of every gated ``/fhir`` request (RFC 6750 §2.1 header only)."""

    def __init__(self, app: ASGIApp, gate: TokenGate) -> None:
        self.app, self.gate = app, gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not path.startswith("/fhir") or path in _OPEN:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        record: dict[str, Any] = {"host": request.headers.get("host", ""), "path": path, "bearer": bool(token)}
        self.gate.log.append(record)
        response = self._refusal(request, token)
        record["status"] = response.status_code if response is not None else "passed"
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request, token: str) -> Response | None:
        if not token:
            return outcome_response(401, "login", "this source needs an access token (POST /auth/token)",
                                    headers={"WWW-Authenticate": 'Bearer realm="sandbox"'})
        try:
            context = verify_access_token(token, keys=self.gate.keys, audience=_root(request) + "/fhir",
                                          now=time.time())
        except InvalidToken as exc:
            return outcome_response(401, "login", exc.message,
                                    headers={"WWW-Authenticate": 'Bearer realm="sandbox", error="invalid_token"'})
        resource_type, interaction = _asked(request)
        if resource_type and not has_scope(context, resource_type, interaction):
            return outcome_response(403, "forbidden", f"the token's scopes do not allow this on {resource_type}",
                                    headers={"WWW-Authenticate": 'Bearer realm="sandbox", error="insufficient_scope"'})
        return None


def _asked(request: Request) -> tuple[str, Interaction]:
    """The resource type and SMART interaction letter of a ``/fhir`` request (``""``: the ITI-65 transaction,
    whose entries carry their own types; the token is still required)."""
    parts = [p for p in request.url.path.removeprefix("/fhir").split("/") if p]
    if not parts:
        return "", "c"
    if request.method == "POST":
        return parts[0], "s" if parts[-1] == "_search" else "c"
    return parts[0], "r" if len(parts) > 1 else "s"

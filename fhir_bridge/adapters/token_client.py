"""The client side of SMART Backend Services (SMART App Launch 2.2, backend-services.html): get and use tokens.

:class:`BackendServicesAuth` is an ``httpx.Auth``: on the first request (and when the token is within
:data:`REFRESH_MARGIN_S` of its expiry, or the server answered 401 ``invalid_token``) it posts a one-time
``private_key_jwt`` client assertion to the token endpoint ("Obtain access token") and sends the access token
as ``Authorization: Bearer``. It works with sync and async httpx clients alike (httpx's generator auth flow),
so the demo, the tests, ``fhir-bridge`` calling its own API and the source client calling a SMART source all
share one implementation.

Refusals from the token endpoint raise :class:`TokenRequestFailed` with the RFC 6749 ``error`` code and the
server's description, never the assertion or a token.

:class:`SourceTokenAuth` is the same flow for the source client (``[source] token_url``), shaped as its
:class:`~fhir_bridge.adapters.source_auth.OutboundAuth` (``headers()``, ``refused()``) because the source
client decides itself, per request, whether credentials go out at all (only to the source's own origin, never
to an attachment elsewhere). It sends the token request through the source client's own HTTP client, so the
source's CA bundle and our client certificate apply to the token endpoint too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from pathlib import Path
from typing import Any

import httpx

from fhir_bridge.adapters.auth import JWT_BEARER
from fhir_bridge.adapters.clients import make_client_assertion
from fhir_bridge.errors import InvalidInput, Unauthenticated

__all__ = ["REFRESH_MARGIN_S", "BackendServicesAuth", "SourceTokenAuth", "TokenRequestFailed", "load_private_jwk"]

REFRESH_MARGIN_S = 30  # a token this close to its expiry is renewed first: the request must not land expired


class TokenRequestFailed(Unauthenticated):
    """The token endpoint refused us (``error`` is its RFC 6749 §5.2 code, or ``http-<status>``)."""

    code = "token-request-failed"

    def __init__(self, message: str, error: str) -> None:
        super().__init__(message)
        self.error = error


def load_private_jwk(path: Path) -> dict[str, Any]:
    """A private JWK written by ``fhir-bridge clients keygen`` (``client-private.jwk.json``)."""
    try:
        jwk = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        raise InvalidInput(f"cannot read a private JWK from {path}") from None
    if not isinstance(jwk, dict) or "kid" not in jwk or not ({"d"} & set(jwk)):
        raise InvalidInput(f"{path} is not a private JWK with a kid")
    return jwk


class BackendServicesAuth(httpx.Auth):
    """``Authorization: Bearer`` from a SMART token endpoint, renewed as needed (see the module docstring)."""

    def __init__(self, token_url: str, client_id: str, private_jwk: Mapping[str, Any], scope: str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self._jwk = dict(private_jwk)
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self.granted_scope = ""
        self.tokens_fetched = 0

    def token_request(self) -> httpx.Request:
        """The token request (backend-services.html "Request"), with a fresh one-time assertion."""
        assertion = make_client_assertion(self._jwk, client_id=self.client_id, token_url=self.token_url,
                                          now=self._clock())
        form = {"grant_type": "client_credentials", "scope": self.scope,
                "client_assertion_type": JWT_BEARER, "client_assertion": assertion}
        return httpx.Request("POST", self.token_url, data=form, headers={"Accept": "application/json"})

    def take_token_response(self, response: httpx.Response) -> str:
        """Keep the token of a token response; TokenRequestFailed if it is a refusal or malformed."""
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            described = body.get("error_description") if isinstance(body, dict) else None
            raise TokenRequestFailed(
                f"the token endpoint refused client {self.client_id}: {error or response.status_code}"
                + (f" ({described})" if isinstance(described, str) else ""),
                str(error or f"http-{response.status_code}"),
            )
        token, lifetime = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or str(body.get("token_type", "")).lower() != "bearer":
            raise TokenRequestFailed("the token endpoint answered without a bearer access_token", "invalid_response")
        lifetime = lifetime if isinstance(lifetime, int | float) and lifetime > 0 else 60
        self._token, self._expires_at = token, self._clock() + float(lifetime)
        self.granted_scope = str(body.get("scope", ""))
        self.tokens_fetched += 1
        return token

    def current_token(self) -> str | None:
        """The token in hand while it has more than :data:`REFRESH_MARGIN_S` to live."""
        return self._token if self._token and self._clock() < self._expires_at - REFRESH_MARGIN_S else None

    def forget_token(self) -> None:
        self._token, self._expires_at = None, 0.0

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # only the token responses are read here: the answer to the real request may be a streamed 2 GB bundle
        token = self.current_token()
        if token is None:
            answer = yield self.token_request()
            answer.read()
            token = self.take_token_response(answer)
        response = yield self._with_token(request, token)
        if _token_refused(response):
            self.forget_token()
            answer = yield self.token_request()
            answer.read()
            yield self._with_token(request, self.take_token_response(answer))

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self.current_token()
        if token is None:
            answer = yield self.token_request()
            await answer.aread()
            token = self.take_token_response(answer)
        response = yield self._with_token(request, token)
        if _token_refused(response):
            # the server no longer takes our token (restarted with a new key, clock drift): one fresh try
            self.forget_token()
            answer = yield self.token_request()
            await answer.aread()
            yield self._with_token(request, self.take_token_response(answer))

    @staticmethod
    def _with_token(request: httpx.Request, token: str) -> httpx.Request:
        request.headers["Authorization"] = f"Bearer {token}"
        return request


class SourceTokenAuth:
    """The source client's ``OutboundAuth`` for a SMART source: a token from its token endpoint, reused until
    :data:`REFRESH_MARGIN_S` before it expires, renewed once when the source refuses it (``refused``).

    Concurrent requests share one token request: the first fetches under a lock, the others wait and reuse it.
    """

    def __init__(self, flow: BackendServicesAuth,
                 send: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> None:
        self._flow = flow
        self._send = send
        self._lock = asyncio.Lock()

    @property
    def tokens_fetched(self) -> int:
        return self._flow.tokens_fetched

    async def headers(self) -> dict[str, str]:
        token = self._flow.current_token()
        if token is None:
            async with self._lock:
                token = self._flow.current_token() or await self._fetch()
        return {"Authorization": f"Bearer {token}"}

    async def refused(self, sent: Mapping[str, str]) -> bool:
        """The source answered 401 ``invalid_token`` to a request carrying ``sent``: drop that token (unless a
        concurrent request already replaced it) so the next ``headers()`` fetches a new one. Always worth one
        more try: the source may have restarted with a new key, or our clocks drifted."""
        async with self._lock:
            if sent.get("Authorization") == f"Bearer {self._flow.current_token()}":
                self._flow.forget_token()
        return True

    async def _fetch(self) -> str:
        request = self._flow.token_request()
        response = await self._send(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return self._flow.take_token_response(response)


def _token_refused(response: httpx.Response) -> bool:
    return response.status_code == 401 and "invalid_token" in response.headers.get("WWW-Authenticate", "")

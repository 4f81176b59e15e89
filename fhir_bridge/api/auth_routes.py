"""The SMART Backend Services authorization server of the bridge (SMART App Launch 2.2, backend-services.html).

* ``POST /auth/token``: ``grant_type=client_credentials`` with a ``private_key_jwt`` client assertion (RS384
  or ES384), answered with an ES384 access token of at most 300 s and the scopes granted (no refresh token);
  refusals are RFC 6749 §5.2 JSON (``invalid_client`` 401, others 400), ``Cache-Control: no-store``;
* ``GET /fhir/.well-known/smart-configuration``: discovery (conformance.html "Metadata");
* ``GET /auth/jwks``: the bridge's public keys, to verify its access tokens.

The checks themselves live in :mod:`fhir_bridge.adapters.auth`; this module only moves HTTP in and out.
"""

from __future__ import annotations

import hmac
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from fhir_bridge.adapters.auth import (
    BridgeKeys,
    ClientRegistry,
    InvalidClient,
    ReplayCache,
    issue_access_token,
    read_token_request,
    smart_configuration,
    verify_client_assertion,
)
from fhir_bridge.adapters.clients import certificate_thumbprint
from fhir_bridge.api.fhir_io import base_url, read_form

router = APIRouter()
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class AuthServer:
    """What the token endpoint needs, opened once per process by the composition root."""

    registry: ClientRegistry
    keys: BridgeKeys
    replay_cache: ReplayCache
    token_lifetime: int = 300
    ceilings: Mapping[str, tuple[str, ...]] = field(kw_only=True)  # config/roles.json, from the settings


def _server(request: Request) -> AuthServer:
    server: AuthServer = request.app.state.auth
    return server


def token_url(request: Request) -> str:
    return base_url(request).removesuffix("/fhir") + "/auth/token"


def client_certificate_thumbprint(request: Request) -> str | None:
    """``x5t#S256`` of the client certificate this connection presented (mutual TLS), or None."""
    tls = (request.scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    if not chain:
        return None
    try:
        return certificate_thumbprint(ssl.PEM_cert_to_DER_cert(str(chain[0])))
    except ValueError:
        return None


@router.post("/auth/token", include_in_schema=False)
async def token(request: Request) -> Response:
    server = _server(request)
    form = dict(await read_form(request, _MAX_FORM_BYTES, "the token request"))
    asked = read_token_request(form)
    now = time.time()
    client = await verify_client_assertion(asked.assertion, token_url=token_url(request), registry=server.registry,
                                           replay_cache=server.replay_cache, now=now)
    if client.cert_thumbprint and not hmac.compare_digest(client.cert_thumbprint,
                                                          client_certificate_thumbprint(request) or ""):
        # RFC 8705 §3: a certificate-bound client gets its tokens over mutual TLS with that certificate only
        raise InvalidClient("this client is bound to a certificate: ask for tokens over mutual TLS presenting it")
    answer = issue_access_token(client, asked.scope, signing_key=server.keys, issuer=token_url(request),
                                audience=base_url(request), lifetime_s=server.token_lifetime, now=now,
                                ceilings=server.ceilings)
    request.state.client_id = client.id  # for the audit trail
    return JSONResponse(answer, headers=NO_STORE)


@router.get("/fhir/.well-known/smart-configuration", include_in_schema=False)
async def discovery(request: Request) -> Response:
    document = smart_configuration(token_url(request), jwks_uri=base_url(request).removesuffix("/fhir") + "/auth/jwks")
    return JSONResponse(document)


@router.get("/auth/jwks", include_in_schema=False)
async def jwks(request: Request) -> Response:
    return JSONResponse(_server(request).keys.jwks())

"""The bearer-token gate of the FHIR API (SMART Backend Services, RFC 6750) and the caller it yields.

:func:`caller` is the FastAPI dependency every ``/fhir`` route but ``metadata`` and the SMART discovery
document depends on (as :data:`fhir_bridge.api.deps.Caller`, through :func:`~fhir_bridge.api.deps.current_caller`,
the seam in-process tests override): it reads ``Authorization: Bearer <token>`` (RFC 6750 §2.1; no query or
form tokens), verifies it (:func:`fhir_bridge.adapters.auth.verify_access_token`: ES384 by the bridge key,
``at+jwt``, not expired, ``aud`` = this server, bound certificate if any) and gives the
:class:`~fhir_bridge.access.scopes.AccessContext`.
Its scopes are cut again to the role's ceiling (``config/roles.json``), so a registry edit can not widen a token
already issued. The client id and the token's ``jti`` go to ``request.state`` for the audit trail.

The client certificate (mutual TLS, RFC 8705) is read from the ASGI TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``, asgi.readthedocs.io specs/tls.html), filled in by the
server adapter of :mod:`fhir_bridge.adapters.tls`; its thumbprint must match a certificate-bound token.

Refusals: no token → 401 ``WWW-Authenticate: Bearer realm="fhir-bridge"``; a token refused → 401 with
``error="invalid_token"``; a scope missing → 403 (``insufficient_scope``). Messages never repeat the token.
"""

from __future__ import annotations

import time
from dataclasses import replace

from fastapi import Request

from fhir_bridge.access.scopes import AccessContext, within_ceiling
from fhir_bridge.adapters.auth import verify_access_token
from fhir_bridge.api.auth_routes import AuthServer, client_certificate_thumbprint
from fhir_bridge.api.fhir_io import base_url
from fhir_bridge.errors import Unauthenticated

__all__ = ["MissingToken", "bearer_token", "caller", "client_certificate_thumbprint", "context_from"]


class MissingToken(Unauthenticated):
    """No bearer token at all (RFC 6750 §3.1: the challenge then carries no error code)."""

    code = "unauthenticated"


def bearer_token(request: Request) -> str | None:
    """The token of ``Authorization: Bearer …`` (scheme case-insensitive, RFC 6750 §2.1), or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def context_from(request: Request, token: str | None) -> AccessContext:
    """Verify ``token`` for this request and record who called (request.state) for the audit trail."""
    if not token:
        raise MissingToken("this endpoint needs an access token: Authorization: Bearer <token> (see "
                           "/fhir/.well-known/smart-configuration)")
    server: AuthServer = request.app.state.auth
    context = verify_access_token(token, keys=server.keys, audience=base_url(request), now=time.time(),
                                  cert_thumbprint=client_certificate_thumbprint(request))
    context = replace(context, scopes=frozenset(within_ceiling(context.role, context.scopes, server.ceilings)))
    request.state.client_id = context.client_id
    request.state.jti = context.jti
    request.state.caller = context
    return context


async def caller(request: Request) -> AccessContext:
    """The FastAPI dependency: the verified caller of this request (see the module docstring)."""
    return context_from(request, bearer_token(request))


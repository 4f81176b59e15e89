"""Which credentials the source client sends to the source (STANDARDS.md §8), chosen from ``[source]`` settings.

Apart from the HTTP layer (:mod:`fhir_bridge.adapters.source_http`) because it is a decision about
configuration, not about requests: a static bearer token, or SMART Backend Services (``token_url``:
``private_key_jwt`` tokens, :class:`~fhir_bridge.adapters.token_client.SourceTokenAuth`, renewed once when the
source answers 401 ``invalid_token``), or none. The HTTP layer only asks an :class:`OutboundAuth` for headers,
and only for requests to the source's own origin. A client certificate for mutual TLS is the HTTP layer's own
(it is part of the connection, not of a request).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from fhir_bridge.adapters.settings import SourceSettings
from fhir_bridge.errors import InvalidInput


class OutboundAuth(Protocol):
    """Gives the headers that authenticate us to the source (the SMART token flow plugs in here)."""

    async def headers(self) -> dict[str, str]: ...

    async def refused(self, sent: Mapping[str, str]) -> bool:
        """The source answered 401 ``invalid_token`` to a request sent with ``sent``; True when fresh headers
        are worth one more try (RFC 6750 §3.1)."""
        ...


class StaticBearer:
    """A fixed bearer token from configuration."""

    def __init__(self, token: str) -> None:
        self._headers = {"Authorization": f"Bearer {token}"}

    async def headers(self) -> dict[str, str]:
        return self._headers

    async def refused(self, sent: Mapping[str, str]) -> bool:
        return False  # the same token again would be refused again


def outbound_auth(settings: SourceSettings,
                  send: Callable[[httpx.Request], Awaitable[httpx.Response]]) -> OutboundAuth | None:
    """The source authentication the settings ask for: SMART Backend Services when ``token_url`` is set (token
    requests go out through ``send``), a static bearer token, or none. InvalidInput when half configured."""
    if settings.token_url and settings.bearer_token:
        raise InvalidInput("set either source.token_url (SMART tokens) or source.bearer_token, not both")
    if settings.token_url:
        from fhir_bridge.adapters.token_client import BackendServicesAuth, SourceTokenAuth, load_private_jwk

        if urlsplit(settings.token_url).scheme not in ("http", "https") or not settings.client_id:
            raise InvalidInput("source.token_url must be an http(s) URL and source.client_id must be set")
        if not settings.private_key_jwk:
            raise InvalidInput("source.private_key_jwk must name our private JWK file (fhir-bridge clients keygen)")
        flow = BackendServicesAuth(settings.token_url, settings.client_id,
                                   load_private_jwk(Path(settings.private_key_jwk)), settings.scope)
        return SourceTokenAuth(flow, send)
    return StaticBearer(settings.bearer_token) if settings.bearer_token else None

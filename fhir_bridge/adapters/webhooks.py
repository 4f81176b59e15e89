"""Posting opinion notifications to the clients' webhooks (:class:`~fhir_bridge.ports.WebhookPort`).

The targets are the ``webhook`` entries of the client registry (``fhir-bridge clients add --webhook``); what is
sent and how it is signed is decided in :mod:`fhir_bridge.workflow.delivery`. Redirects are not followed (a
notification goes where the operator registered it, nowhere else), and no answer within the timeout is a
failure the delivery job retries.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from fhir_bridge.adapters.clients import ClientRegistry
from fhir_bridge.errors import DeliveryFailed
from fhir_bridge.ports import WebhookTarget


class HttpWebhooks:
    """One pooled httpx client; close with :meth:`aclose`."""

    def __init__(self, registry: ClientRegistry, *, timeout: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.registry = registry
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport)

    def target(self, client_id: str) -> WebhookTarget | None:
        client = self.registry.get(client_id)
        if client is None or not client.webhook_url or not client.webhook_secret:
            return None
        return WebhookTarget(client.webhook_url, client.webhook_secret)

    async def send(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        try:
            response = await self._http.post(url, content=body, headers=dict(headers))
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise DeliveryFailed(f"the webhook did not answer ({type(exc).__name__})") from None
        await response.aclose()
        return response.status_code

    async def aclose(self) -> None:
        await self._http.aclose()

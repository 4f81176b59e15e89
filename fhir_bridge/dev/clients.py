"""Registered clients for the demo and the tests: real key pairs, a real registry file, real tokens.

``fhir-bridge demo`` and the end-to-end tests do not bypass security: before the API starts, this module
writes one client per role (a platform of tenant ``demo-platform``, a second platform of another tenant, an
auditor, an operator) and one reviewer client per PractitionerRole of the reviewer registry, each with a fresh
ES384 key pair (``fhir-bridge clients keygen``) registered by ``add_client`` (``fhir-bridge clients add``).
:meth:`DevClients.auth` gives the ``httpx.Auth`` that gets that client's tokens from ``/auth/token``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_bridge.adapters.clients import add_client, generate_client_keypair, set_webhook
from fhir_bridge.adapters.reference_data import load_registry, load_role_ceilings
from fhir_bridge.adapters.token_client import BackendServicesAuth, load_private_jwk
from fhir_bridge.review.reviewers import ReviewerRegistry

__all__ = ["PLATFORM_TENANT", "DevClients", "provision"]

PLATFORM_TENANT = "demo-platform"
OTHER_TENANT = "other-platform"


@dataclass(frozen=True)
class DevClient:
    id: str
    role: str
    scope: str
    private_jwk: dict[str, Any] = field(repr=False)
    reviewer: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)


@dataclass
class DevClients:
    """The clients written by :func:`provision`, by id."""

    clients: dict[str, DevClient]
    registry: ReviewerRegistry

    def auth(self, client_id: str, api_base: str, scope: str | None = None) -> BackendServicesAuth:
        """Token-getting auth for ``client_id`` against the bridge whose FHIR base is ``api_base``."""
        client = self.clients[client_id]
        token_url = api_base.rstrip("/").removesuffix("/fhir") + "/auth/token"
        return BackendServicesAuth(token_url, client.id, client.private_jwk, scope or client.scope)

    def reviewer_for(self, owner_reference: str) -> str:
        """The client id of a reviewer who may act on a case owned by ``owner_reference`` (Task.owner)."""
        kind, _, ident = owner_reference.rpartition("/")
        if kind == "CareTeam":
            ident = sorted(self.registry.panels[ident].members)[0]
        return f"reviewer-{ident}"


def provision(clients_file: Path, keys_dir: Path, registry: ReviewerRegistry | None = None, *,
              webhooks: Mapping[str, str] | None = None,
              ceilings: Mapping[str, tuple[str, ...]] | None = None) -> DevClients:
    """Write the demo/test clients into ``clients_file`` (created) with their keys under ``keys_dir``;
    ``webhooks``: client id → the URL it is notified at (``clients webhook``), its secret in the DevClient.
    ``registry`` and ``ceilings`` default to the shipped reviewers and roles: the demo and the tests run the
    bridge on the shipped data."""
    registry = registry or load_registry()
    ceilings = ceilings if ceilings is not None else load_role_ceilings()
    wanted: list[tuple[str, str, str, str | None]] = [
        ("platform", "platform", PLATFORM_TENANT, None),
        ("platform-other", "platform", OTHER_TENANT, None),
        ("auditor", "auditor", "audit", None),
        ("operator", "operator", "operations", None),
    ] + [(f"reviewer-{rid}", "reviewer", "reviewers", rid) for rid in sorted(registry.reviewers)]
    made: dict[str, DevClient] = {}
    for client_id, role, tenant, reviewer in wanted:
        where = keys_dir / client_id
        where.mkdir(parents=True, exist_ok=True)
        private_path, public_path = generate_client_keypair(where)
        scopes = list(ceilings[role])
        add_client(clients_file, client_id, role, public_path, scopes, tenant, reviewer=reviewer,
                   ceilings=ceilings)
        url = (webhooks or {}).get(client_id)
        secret = set_webhook(clients_file, client_id, url) if url else None
        made[client_id] = DevClient(client_id, role, " ".join(scopes), load_private_jwk(private_path), reviewer,
                                    secret)
    return DevClients(made, registry)

"""``fhir-bridge clients keygen | add | webhook | token``: the registry of the systems that may call the bridge."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fhir_bridge.cli.common import cli_settings, one_line_errors


@click.group()
def clients() -> None:
    """Register the systems that may call the bridge (SMART Backend Services, private_key_jwt)."""


@clients.command("keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for client-private.jwk.json (0600) and client-public.jwks.json.")
@click.option("--alg", type=click.Choice(["ES384", "RS384"]), default="ES384", show_default=True)
@one_line_errors
def clients_keygen(out_dir: Path, alg: str) -> None:
    """Write a new client key pair; give the public JWK Set to `clients add`, keep the private one secret."""
    from fhir_bridge.adapters.clients import generate_client_keypair

    private, public = generate_client_keypair(out_dir, alg)  # type: ignore[arg-type]
    click.echo(json.dumps({"private": str(private), "public": str(public)}))


@clients.command("add")
@click.option("--id", "client_id", required=True, help="The client_id (iss and sub of its assertions).")
@click.option("--role", required=True, type=click.Choice(["platform", "reviewer", "auditor", "operator"]))
@click.option("--jwks", "jwks_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's public JWK Set (or one public JWK).")
@click.option("--scope", "scopes", multiple=True, required=True,
              help="A scope the client may be granted, e.g. system/ServiceRequest.c; repeatable.")
@click.option("--tenant", default=None, help="The tenant whose cases the client sees (default: its id).")
@click.option("--reviewer", default=None, help="For a reviewer: its PractitionerRole id in config/reviewers.json.")
@click.option("--cert", "cert_file", default=None, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's TLS certificate (PEM): its tokens are then accepted only over mutual TLS with it.")
@click.option("--webhook", "webhook_url", default=None,
              help="Notify this client at this URL when its opinions are ready (https; http only to loopback). "
                   "The signing secret is printed once.")
@one_line_errors
def clients_add(client_id: str, role: str, jwks_file: Path, scopes: tuple[str, ...], tenant: str | None,
                reviewer: str | None, cert_file: Path | None, webhook_url: str | None) -> None:
    """Register a client in the registry file (auth.clients_file); the API reads it when it starts."""
    from fhir_bridge.adapters.clients import add_client, set_webhook
    from fhir_bridge.adapters.reference_data import ReferenceFiles, load_role_ceilings
    from fhir_bridge.adapters.settings import clients_file
    from fhir_bridge.adapters.tls import certificate_file_thumbprint

    settings = cli_settings()
    thumbprint = certificate_file_thumbprint(cert_file) if cert_file else None  # RFC 8705 x5t#S256
    client = add_client(clients_file(settings), client_id, role, jwks_file, list(scopes), tenant or client_id,
                        reviewer=reviewer, cert_thumbprint=thumbprint,
                        ceilings=load_role_ceilings(ReferenceFiles.of(settings).roles))
    answer: dict[str, Any] = {"id": client.id, "role": client.role, "scopes": list(client.scopes),
                              "registry": str(clients_file(settings))}
    if thumbprint:
        answer["x5t#S256"] = thumbprint
    if webhook_url:
        answer["webhook"] = {"url": webhook_url,
                             "secret": set_webhook(clients_file(settings), client.id, webhook_url)}
    click.echo(json.dumps(answer))


@clients.command("webhook")
@click.option("--id", "client_id", required=True, help="The registered client_id.")
@click.option("--url", "url", default=None, help="The new webhook URL (a new secret is made and printed once).")
@click.option("--remove", is_flag=True, default=False, help="Remove the client's webhook.")
@one_line_errors
def clients_webhook(client_id: str, url: str | None, remove: bool) -> None:
    """Set (or rotate the secret of) a client's opinion webhook, or remove it; restart serve and workers."""
    from fhir_bridge.adapters.clients import set_webhook
    from fhir_bridge.adapters.settings import clients_file

    if bool(url) == remove:
        raise click.UsageError("give either --url URL or --remove")
    secret = set_webhook(clients_file(cli_settings()), client_id, None if remove else url)
    click.echo(json.dumps({"id": client_id, "webhook": {"url": url, "secret": secret} if url else None}))


@clients.command("token")
@click.option("--id", "client_id", required=True, help="The registered client_id.")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="The client's private JWK (client-private.jwk.json from `clients keygen`).")
@click.option("--scope", required=True, help='Space-separated scopes to ask for, e.g. "system/AuditEvent.rs".')
@click.option("--url", "base_url", default=None, help="The bridge's FHIR base (default: api.public_base_url, "
              "else http://api.host:api.port/fhir).")
@one_line_errors
def clients_token(client_id: str, key_file: Path, scope: str, base_url: str | None) -> None:
    """Get an access token from the bridge as a registered client and print it (for curl, or the /audit page)."""
    import httpx

    from fhir_bridge.adapters.token_client import BackendServicesAuth, load_private_jwk

    settings = cli_settings()
    base = (base_url or settings.api.public_base_url or f"http://{settings.api.host}:{settings.api.port}").rstrip("/")
    base = base.removesuffix("/fhir")
    auth = BackendServicesAuth(f"{base}/auth/token", client_id, load_private_jwk(key_file), scope)
    with httpx.Client(timeout=30) as http:
        request = auth.token_request()
        try:
            token = auth.take_token_response(http.send(request))
        except httpx.HTTPError as exc:
            raise click.ClickException(f"cannot reach the token endpoint {request.url}: {type(exc).__name__}") from None
    click.echo(json.dumps({"access_token": token, "scope": auth.granted_scope}))

"""``fhir-bridge verify-bundle``: check a served case Bundle's signature offline."""

from __future__ import annotations

from pathlib import Path

import click

from fhir_bridge.cli.common import EXIT_FAILURE, cli_settings, fail, one_line_errors
from fhir_bridge.errors import InvalidInput


@click.command("verify-bundle")
@click.argument("bundle_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jwks", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The bridge's public JWK or JWK Set (default: data_dir/keys/audit-signing.jwk.json).")
@one_line_errors
def verify_bundle(bundle_file: Path, jwks: Path | None) -> None:
    """Check a served case Bundle's signature: a detached ES384 JWS over its R4 canonical form without id, meta
    and signature. Exit 0 when valid, 1 when not (changed, unsigned, another key), 2 when unreadable."""
    from fhir_bridge.adapters.signing import JwsVerifier, SigningKeyError
    from fhir_bridge.case.signature import check_bundle_signature
    from fhir_bridge.fhir.resources import parse_resource

    jwks = jwks or cli_settings().data_dir / "keys" / "audit-signing.jwk.json"
    try:
        verifier = JwsVerifier.from_file(jwks)
    except (OSError, ValueError, AttributeError, SigningKeyError) as exc:
        raise InvalidInput(f"cannot read the key {jwks.name}: {type(exc).__name__}") from None
    try:
        data = bundle_file.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {bundle_file.name}: {type(exc).__name__}") from None
    check = check_bundle_signature(parse_resource(data, expected_type="Bundle"), verifier.verify_unencoded,
                                   verifier.key_ids)
    if not check.ok:
        fail(f"signature invalid: {check.reason}", EXIT_FAILURE)
    click.echo(f"signature valid (kid {check.key_id}, signed {check.signed_at})")

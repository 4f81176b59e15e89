"""Development and test certificates: a CA, a server certificate for this machine, client certificates by name.

For development and tests only (``fhir-bridge certs dev``, the mutual-TLS tests): real deployments mount
certificates from their PKI (in France, IGC-Santé for organisations, STANDARDS.md §8), never these. Everything
is PEM; private keys are PKCS#8, unencrypted, written 0600 through :mod:`fhir_bridge.adapters.key_files`.
Keys are EC P-256: quick to make in every test run and accepted by every TLS stack.

The certificates carry what strict verifiers (Python 3.13's ``VERIFY_X509_STRICT``, RFC 5280) ask for: a
critical ``basicConstraints`` and ``keyUsage``, subject and authority key identifiers, and on leaves the
extended key usage of their side (``serverAuth`` with ``localhost``/``127.0.0.1``/``::1`` names for the
server, ``clientAuth`` for clients). A directory that already holds a CA keeps it, so client certificates can
be added to it later.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fhir_bridge.adapters import key_files
from fhir_bridge.errors import Conflict, InvalidInput

__all__ = ["CertAndKey", "DevCertificates", "make_client_certificate", "make_dev_certificates"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ORGANISATION = "fhir-bridge development (not for production)"
_SERVER_NAMES = ("localhost",)
_SERVER_ADDRESSES = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class CertAndKey:
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevCertificates:
    """Where :func:`make_dev_certificates` wrote things: ``ca.pem`` (give it to clients and as
    ``tls_client_ca``), the server's pair, and one pair per client name."""

    ca: CertAndKey
    server: CertAndKey
    clients: dict[str, CertAndKey] = field(default_factory=dict)


def make_dev_certificates(out_dir: Path, clients: tuple[str, ...] = ("client",), *,
                          days: int = 365) -> DevCertificates:
    """Write (or reuse) the development CA in ``out_dir``, a server certificate, and the named client certificates.

    Files: ``ca.pem``/``ca-key.pem``, ``server.pem``/``server-key.pem``, ``client-<name>.pem``/
    ``client-<name>-key.pem``. The CA and server pair are reused when present; an existing client name is a
    :class:`Conflict` (a certificate is not silently replaced: its thumbprint may be registered).
    """
    out_dir = Path(out_dir)
    ca = _ca(out_dir, days)
    server = CertAndKey(out_dir / "server.pem", out_dir / "server-key.pem")
    if not (server.cert.exists() and server.key.exists()):
        _issue(ca, server, x509.Name(_subject("fhir-bridge dev server")), days, server_side=True)
    made = {name: make_client_certificate(out_dir, name, days=days) for name in clients}
    return DevCertificates(ca=ca, server=server, clients=made)


def make_client_certificate(out_dir: Path, name: str, *, days: int = 365) -> CertAndKey:
    """One more client certificate (``CN=<name>``) signed by the development CA in ``out_dir``."""
    if not _NAME.fullmatch(name):
        raise InvalidInput("a client certificate name is 1-64 characters [A-Za-z0-9._-]")
    pair = CertAndKey(Path(out_dir) / f"client-{name}.pem", Path(out_dir) / f"client-{name}-key.pem")
    if pair.cert.exists() or pair.key.exists():
        raise Conflict(f"{pair.cert} already exists; choose another name")
    _issue(_ca(Path(out_dir), days), pair, x509.Name(_subject(name)), days, server_side=False)
    return pair


def _subject(common_name: str) -> list[x509.NameAttribute[str]]:
    return [x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANISATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name)]


def _ca(out_dir: Path, days: int) -> CertAndKey:
    ca = CertAndKey(out_dir / "ca.pem", out_dir / "ca-key.pem")
    if ca.cert.exists() and ca.key.exists():
        return ca
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(_subject("fhir-bridge development CA"))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days * 5))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(ca, cert, key)
    return ca


def _issue(ca: CertAndKey, pair: CertAndKey, subject: x509.Name, days: int, *, server_side: bool) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput(f"{ca.key} is not the EC key of a development CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_side else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server_side:
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in _SERVER_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in _SERVER_ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    _write(pair, builder.sign(ca_key, hashes.SHA256()), key)


def _write(pair: CertAndKey, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if key_files.create_once(pair.key, pem_key) != pem_key:  # 0600, published atomically
        raise Conflict(f"{pair.key} already exists without its certificate; remove it or choose another directory")
    key_files.replace(pair.cert, cert.public_bytes(serialization.Encoding.PEM))
    pair.cert.chmod(0o644)  # a certificate is public

"""A test PKI made at test time with `cryptography`: a trusted CA, an unknown CA, and server
certificates that are valid, expired, for the wrong name or from the unknown CA.

Generated once per test process into a temporary directory (EC P-256 keys: milliseconds).
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["MX_NAME", "Pki", "pki", "server_context"]

# The name every valid test server certificate is issued for (plus localhost and 127.0.0.1).
MX_NAME = "mx.dest.test"


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    subject: str
    sha256: str  # openssl style, "AB:CD:..."


@dataclass(frozen=True)
class Pki:
    ca: Path  # the trusted CA's certificate: what a transport's tls_ca_file names
    valid: Issued
    expired: Issued
    wrong_name: Issued
    unknown_ca: Issued
    client: Issued


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postflow tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    directory: Path,
    label: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    names: list[str],
    *,
    not_before: datetime,
    not_after: datetime,
    client: bool = False,
) -> Issued:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{label}.pem", directory / f"{label}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return Issued(
        cert=cert_path,
        key=key_path,
        subject=cert.subject.rfc4514_string(),
        sha256=":".join(digest[i : i + 2] for i in range(0, len(digest), 2)),
    )


@cache
def pki() -> Pki:
    """The test PKI, made on first use and removed when the test process exits."""
    directory = Path(tempfile.mkdtemp(prefix="postflow-certs-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    trusted, unknown = _ca("Postflow Test CA"), _ca("Unknown Test CA")
    (directory / "ca.pem").write_bytes(trusted[0].public_bytes(serialization.Encoding.PEM))
    now = datetime.now(UTC)
    fresh = {"not_before": now - timedelta(days=1), "not_after": now + timedelta(days=30)}
    names = [MX_NAME, "localhost", "127.0.0.1"]
    return Pki(
        ca=directory / "ca.pem",
        valid=_issue(directory, "valid", trusted, names, **fresh),
        expired=_issue(
            directory,
            "expired",
            trusted,
            names,
            not_before=now - timedelta(days=30),
            not_after=now - timedelta(days=1),
        ),
        wrong_name=_issue(directory, "wrong-name", trusted, ["other.example"], **fresh),
        unknown_ca=_issue(directory, "unknown-ca", unknown, names, **fresh),
        client=_issue(directory, "client", trusted, ["client.postflow.test"], client=True, **fresh),
    )


def server_context(issued: Issued, require_client_cert: bool = False) -> ssl.SSLContext:
    """The TLS context an aiosmtpd test server offers with STARTTLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki().ca)
    return context

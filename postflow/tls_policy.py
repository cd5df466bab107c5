"""A transport's TLS policy: builds its ssl context, checks the peer's names or fingerprint
and describes the outcome. Opens no connection; the SMTP session drives the handshake.

Verification is split like Postfix's `verify` level: OpenSSL checks the chain during the
handshake (system store or `tls_ca_file`); the names are checked here afterwards, because a
transport may accept several names (`tls_verify_names`), which OpenSSL's single
`server_hostname` check cannot express. Pinned fingerprints replace the CA check.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from postflow.config import TransportSettings
from postflow.models import TlsInfo

__all__ = [
    "TlsConfigError",
    "TlsPolicy",
    "describe_handshake_error",
    "fingerprint",
    "name_matches",
    "normalize_fingerprint",
    "peer_names",
]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")

# OpenSSL X509_V_ERR_* codes worth a short name in an attempt record.
_VERIFY_REASONS = {
    2: "unknown CA",  # unable to get issuer certificate
    9: "not yet valid",
    10: "expired",
    18: "unknown CA (self-signed certificate)",
    19: "unknown CA (self-signed certificate in chain)",
    20: "unknown CA",  # unable to get local issuer certificate
    21: "unknown CA",  # unable to verify the first certificate
}


class TlsConfigError(ValueError):
    """A transport's TLS files cannot be used; the message names the setting and the file."""


def normalize_fingerprint(text: str) -> str:
    """`sha256:AB:CD:...`, `AB:CD:...` or plain hex, as lowercase hex; ValueError otherwise."""
    value = text.strip().lower().removeprefix("sha256:").removeprefix("sha256=")
    value = value.replace(":", "")
    if not _HEX64.match(value):
        raise ValueError("not a SHA-256 fingerprint (sha256:AB:CD:... with 32 bytes)")
    return value


def fingerprint(der: bytes) -> str:
    """The certificate's SHA-256 fingerprint as openssl prints it: `AB:CD:...`."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def peer_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """The certificate's DNS names and IP addresses; the CN only when it has no SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        dns_names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        if dns_names or ips:
            return dns_names, ips
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [c.lower().rstrip(".") for c in cns], []


def _dns_match(cert_name: str, wanted: str) -> bool:
    if cert_name == wanted:
        return True
    # RFC 6125 §6.4.3: a wildcard stands for exactly one whole leftmost label.
    if cert_name.startswith("*.") and "." in wanted:
        return wanted.split(".", 1)[1] == cert_name[2:] and wanted.count(".") >= 2
    return False


def name_matches(dns_names: list[str], ips: list[str], wanted: str) -> bool:
    """Does a certificate with these names serve `wanted`? A leading dot in `wanted`
    accepts any subdomain (Postfix's `.example.com` match)."""
    wanted = wanted.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(wanted)) in ips
    except ValueError:
        pass
    if wanted.startswith("."):
        suffix = wanted
        return any(
            name.endswith(suffix) or (name.startswith("*.") and name[1:].endswith(suffix))
            for name in dns_names
        )
    return any(_dns_match(name, wanted) for name in dns_names)


def describe_handshake_error(exc: BaseException) -> tuple[bool, str]:
    """(is a certificate verification failure, short reason) for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(exc.verify_code, exc.verify_message or str(exc))
        return True, reason
    if isinstance(exc, ssl.SSLError):
        return False, exc.reason or exc.__class__.__name__
    return False, str(exc) or exc.__class__.__name__


_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True)
class TlsPolicy:
    """One transport's TLS rules and the context they need; build once, use per session."""

    level: Literal["none", "opportunistic", "required", "verify"]
    context: ssl.SSLContext | None = None
    verify_names: tuple[str, ...] = ()
    fingerprints: frozenset[str] = frozenset()

    @property
    def must_encrypt(self) -> bool:
        return self.level in ("required", "verify")

    @classmethod
    def from_settings(cls, settings: TransportSettings, where: str) -> TlsPolicy:
        """Builds the context (loads CA and client certificate files: call off the loop).

        `where` is the transport's key, e.g. `transports.relay`, for error messages.
        """
        if settings.tls == "none":
            return cls(level="none")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = _VERSIONS[settings.tls_min_version]
        pins = frozenset(normalize_fingerprint(f) for f in settings.tls_fingerprints or [])
        # Names are checked after the handshake (see the module docstring).
        context.check_hostname = False
        if settings.tls == "verify" and not pins:
            context.verify_mode = ssl.CERT_REQUIRED
            if settings.tls_ca_file:
                _load(context.load_verify_locations, f"{where}.tls_ca_file", settings.tls_ca_file)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        else:
            context.verify_mode = ssl.CERT_NONE
        if settings.tls_cert_file:
            _load(
                lambda path: context.load_cert_chain(path, settings.tls_key_file),
                f"{where}.tls_cert_file",
                settings.tls_cert_file,
            )
        return cls(
            level=settings.tls,
            context=context,
            verify_names=tuple(settings.tls_verify_names or ()),
            fingerprints=pins,
        )

    def check_peer(self, der: bytes | None, host_name: str) -> str | None:
        """After the handshake: None if the peer passes this policy, else the reason."""
        if self.level != "verify":
            return None
        if not der:
            return "no server certificate"
        if self.fingerprints:
            if fingerprint(der).replace(":", "").lower() in self.fingerprints:
                return None
            return "fingerprint mismatch (not one of tls_fingerprints)"
        cert = x509.load_der_x509_certificate(der)
        dns_names, ips = peer_names(cert)
        wanted = self.verify_names or (host_name,)
        if any(name_matches(dns_names, ips, w) for w in wanted):
            return None
        offered = ", ".join(dns_names + ips) or "none"
        return f"name mismatch: wanted {' or '.join(wanted)}, certificate has {offered}"

    def info(
        self, ssl_object: ssl.SSLObject | None, verified: bool, error: str | None = None
    ) -> TlsInfo:
        """The attempt record's TLS part: what was negotiated and who the peer was."""
        info = TlsInfo(policy=self.level, verified=verified, error=error)
        if ssl_object is None:
            return info
        cipher = ssl_object.cipher()
        info.protocol = ssl_object.version()
        info.cipher = cipher[0] if cipher else None
        der = ssl_object.getpeercert(binary_form=True)
        if der:
            info.peer_sha256 = fingerprint(der)
            try:
                info.peer_subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
            except ValueError:
                info.peer_subject = None
        return info


def _load(loader: Callable[[str], object], setting: str, path: str) -> None:
    try:
        loader(path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"{setting}: {path!r}: cannot load: {exc}") from None

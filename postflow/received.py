"""The `Received:` trace header the ingest prepends (RFC 5321 §4.4, RFC 3848). Pure.

Layout follows Postfix, so existing log and header tooling reads it:

    Received: from client.example ([192.0.2.7])
    \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
    \tby mx.example.org (Postflow) with ESMTPS id 4ZK3X...
    \tfor <bob@example.com>; Tue, 01 Jul 2025 12:00:00 +0000
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["TraceInfo", "protocol_name", "received_header"]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_COMMENT_UNSAFE = re.compile(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e ]")


@dataclass(frozen=True)
class TraceInfo:
    helo: str | None
    client_ip: str
    by: str
    queue_id: str
    extended: bool = True
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    authenticated: bool = False
    smtputf8: bool = False
    recipient: str | None = None  # given only when the message has exactly one
    when: datetime | None = None


def protocol_name(info: TraceInfo) -> str:
    """SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848) or UTF8SMTP... (RFC 6531 §3.7.3)."""
    if not info.extended:
        return "SMTP"
    base = "UTF8SMTP" if info.smtputf8 else "ESMTP"
    return base + ("S" if info.tls_version else "") + ("A" if info.authenticated else "")


def _literal(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "[unknown]"
    return f"[IPv6:{address}]" if address.version == 6 else f"[{address}]"


def _safe(text: str) -> str:
    """Client-chosen text inside a comment: no parentheses, backslashes or non-ASCII."""
    return _COMMENT_UNSAFE.sub("?", text)[:255]


def received_header(info: TraceInfo) -> bytes:
    """The complete header field, folded, ending in CRLF."""
    literal = _literal(info.client_ip)
    helo = info.helo or ""
    if helo and (_DOMAIN.match(helo) or helo == literal):
        origin = f"from {helo} ({literal})"
    else:
        # RFC 5321 wants a domain here; an odd EHLO argument goes in a comment instead.
        origin = f"from {literal}" + (f" (HELO {_safe(helo)})" if helo else "")
    lines = [f"Received: {origin}"]
    if info.tls_version:
        cipher = f" with cipher {_safe(info.tls_cipher)}" if info.tls_cipher else ""
        bits = f" ({info.tls_bits}/{info.tls_bits} bits)" if info.tls_bits else ""
        lines.append(f"\t(using {_safe(info.tls_version)}{cipher}{bits})")
    lines.append(f"\tby {info.by} (Postflow) with {protocol_name(info)} id {info.queue_id}")
    when = format_datetime(info.when or datetime.now(UTC))
    if info.recipient and info.recipient.isascii() and len(info.recipient) < 200:
        lines.append(f"\tfor <{info.recipient}>; {when}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{when}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")

"""What MX answers and DNS outcomes mean (RFC 5321 §5.1, RFC 7505): pure, no I/O.

`activities/resolve.py` asks DNS and feeds the answers here; every rule about order, null
MX, and which DNS outcome is temporary or permanent lives in this module, once.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from enum import StrEnum
from itertools import groupby

import dns.exception
import dns.resolver

from postflow.models import DeliveryError

__all__ = [
    "ROOT",
    "DnsOutcome",
    "classify",
    "describe_failure",
    "dns_error",
    "drop_self",
    "filter_family",
    "ip_literal",
    "is_null_mx",
    "loop_error",
    "no_address_error",
    "null_mx_error",
    "order_mx",
    "unroutable_error",
]

# An MX exchange that is the root name: "this domain accepts no mail" when alone (RFC 7505).
ROOT = "."


def order_mx(
    records: Iterable[tuple[int, str]], rng: random.Random | None = None
) -> list[tuple[int, str]]:
    """Lower preference first; equal preferences shuffled ("MUST randomize", §5.1)."""
    rng = rng or random.Random()
    ordered: list[tuple[int, str]] = []
    for _, same in groupby(sorted(records, key=lambda r: r[0]), key=lambda r: r[0]):
        tier = list(same)
        rng.shuffle(tier)
        ordered.extend(tier)
    return ordered


def drop_self(
    records: list[tuple[int, str]], my_names: Iterable[str]
) -> tuple[list[tuple[int, str]], int | None]:
    """RFC 5321 §5.1: when we are one of the MX hosts, records at our own preference and
    higher MUST be discarded (we would send the mail to ourselves, or further from its
    destination). Returns the records left and our preference, or None if we are not listed.
    """
    names = {n.lower().rstrip(".") for n in my_names}
    mine = [preference for preference, name in records if name in names]
    if not mine:
        return records, None
    own = min(mine)
    return [r for r in records if r[0] < own], own


def loop_error(qname: str, preference: int) -> DeliveryError:
    """Postfix's `mail for X loops back to myself`: permanent, 5.4.6 (RFC 3463 routing loop)."""
    return DeliveryError(
        permanent=True,
        enhanced="5.4.6",
        text=f"mail for {qname} loops back to myself (we are its MX at preference {preference})",
    )


def is_null_mx(records: list[tuple[int, str]]) -> bool:
    """RFC 7505 §3: exactly one MX, preference 0, exchange the root; preference 0 alone is not."""
    return len(records) == 1 and records[0] == (0, ROOT)


def ip_literal(name: str) -> str | None:
    """The address an MX exchange spells, e.g. `192.0.2.1.`; such an MX is a misconfiguration
    (RFC 5321 §5.1 wants a host name), but it is what the domain owner meant, so it is used."""
    text = name.rstrip(".")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def filter_family(addresses: Iterable[str], ip_version: str) -> list[str]:
    """Keeps the addresses of the transport's `ip_version` ("any", "ipv4", "ipv6")."""
    if ip_version == "any":
        return list(addresses)
    want = 4 if ip_version == "ipv4" else 6
    return [a for a in addresses if ipaddress.ip_address(a).version == want]


class DnsOutcome(StrEnum):
    """A DNS query's result class; dnspython's exceptions map one to one onto these."""

    ANSWER = "answer"
    NODATA = "nodata"  # the name exists, no record of the type
    NXDOMAIN = "nxdomain"  # the name does not exist
    TEMPORARY = "temporary"  # SERVFAIL, REFUSED, timeout, no server reachable


def classify(exc: BaseException) -> DnsOutcome:
    """dnspython's structured errors to outcomes (MAIL-SEMANTICS §3).

    Anything not known to be an authoritative "no" is temporary: a malformed answer or an
    unreachable server must not bounce mail (Haraka's A/AAAA fallback lost SERVFAILs that way).
    """
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return DnsOutcome.NXDOMAIN
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsOutcome.NODATA
    return DnsOutcome.TEMPORARY


def describe_failure(exc: BaseException) -> str:
    """A short, precise reason: which server answered what, or how long we waited."""
    if isinstance(exc, dns.resolver.NoNameservers):
        errors = exc.kwargs.get("errors") or []
        parts = [f"{_server(e[0], e[2])} answered {e[3]}" for e in errors]
        return "; ".join(dict.fromkeys(parts)) or "no DNS server to ask"
    if isinstance(exc, dns.resolver.LifetimeTimeout):
        timeout = exc.kwargs.get("timeout")
        servers = {_server(e[0], e[2]) for e in exc.kwargs.get("errors") or []}
        where = f" from {', '.join(sorted(servers))}" if servers else ""
        return f"no answer{where} after {timeout:.1f} s" if timeout else f"timeout{where}"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    return f"{type(exc).__name__}: {exc}"


def _server(text: str, port: int) -> str:
    address = text.partition(":")[2].rpartition("@")[0] or text
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def dns_error(outcome: DnsOutcome, what: str, detail: str, nxdomain: str) -> DeliveryError:
    """The group-wide failure for a failed query about the recipient domain itself."""
    if outcome == DnsOutcome.NXDOMAIN:
        # RFC 5321 §5.1: a non-existent domain "MUST be reported as an error"; 5.1.2 is RFC
        # 3463's bad destination system. `nxdomain = "defer"` lets flaky resolvers retry.
        permanent = nxdomain != "defer"
        return DeliveryError(
            permanent=permanent,
            enhanced="5.1.2" if permanent else "4.1.2",
            text=f"{what}: domain does not exist (NXDOMAIN)"
            + ("" if permanent else "; deferred by nxdomain = defer"),
        )
    # RFC 5321 §5.1: a temporary error "the message MUST be queued and retried later";
    # 4.4.3 is RFC 3463's directory server failure.
    return DeliveryError(permanent=False, enhanced="4.4.3", text=f"{what}: DNS failure: {detail}")


def null_mx_error(domain: str) -> DeliveryError:
    """RFC 7505 §3-4: fail at once, never fall back to A/AAAA; 5.1.10 per RFC 7505 §4.2."""
    return DeliveryError(
        permanent=True,
        enhanced="5.1.10",
        text=f"{domain}: null MX (RFC 7505): the domain accepts no mail",
    )


def no_address_error(domain: str) -> DeliveryError:
    """RFC 5321 §5.1: no MX and the implicit MX has no address: nowhere to deliver, ever."""
    return DeliveryError(
        permanent=True,
        enhanced="5.1.2",
        text=f"{domain}: domain has neither MX nor A/AAAA records",
    )


def unroutable_error(domain: str, skipped: list[str], ip_version: str) -> DeliveryError:
    """RFC 5321 §5.1: MX records present but none usable; temporary, DNS may be fixed (4.4.4)."""
    family = "" if ip_version == "any" else f" {ip_version}"
    why = f" ({'; '.join(skipped)})" if skipped else ""
    return DeliveryError(
        permanent=False,
        enhanced="4.4.4",
        text=f"{domain}: no MX host has an{family} address{why}",
    )

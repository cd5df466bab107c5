"""Decides whether a message is prioritized by the `[[priority]]` rules. Pure; no I/O.

A message matching any rule is prioritized; within a rule, every criterion given must
match. The decision is made once, at ingest, and never revisited while the message waits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32

from postflow.config import PriorityRule

__all__ = ["PriorityRules", "describe_rule", "domain_matches", "fairness_key"]

# Temporal's limit on a fairness key.
_FAIRNESS_KEY_BYTES = 64
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """Exact, or with a leading dot any subdomain: the same patterns as `[[routes]]`."""
    domain = domain.lower().rstrip(".")
    if not domain:
        return False
    for pattern in patterns:
        if pattern.startswith(".") and domain.endswith(pattern):
            return True
        if domain == pattern:
            return True
    return False


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def fairness_key(mail_from: str) -> str | None:
    """The sender's domain, so that one sender's campaign cannot starve other senders."""
    domain = _domain(mail_from).lower().rstrip(".")
    if not domain:
        return None
    return domain.encode()[:_FAIRNESS_KEY_BYTES].decode(errors="ignore")


def _parse_head(data: bytes) -> Message:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 2]
    return BytesHeaderParser(policy=compat32).parsebytes(head)


def _header_text(value: object) -> str:
    """The unfolded value with RFC 2047 encoded words decoded, so rules see what users see."""
    text = _FOLD.sub("", str(value)).strip()
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


class _Compiled:
    def __init__(self, rule: PriorityRule) -> None:
        self.rule = rule
        self.pattern = re.compile(rule.match) if rule.match is not None else None

    def matches(
        self,
        sender_domain: str,
        recipient_domains: set[str],
        transports: set[str],
        size: int,
        headers: _Headers,
    ) -> bool:
        rule = self.rule
        if rule.max_size is not None and size > rule.max_size:
            return False
        if rule.sender_domains is not None and not domain_matches(
            sender_domain, rule.sender_domains
        ):
            return False
        if rule.recipient_domains is not None and not any(
            domain_matches(d, rule.recipient_domains) for d in recipient_domains
        ):
            return False
        if rule.transports is not None and not transports & set(rule.transports):
            return False
        if rule.header is not None:
            values = headers.values(rule.header)
            if not values:
                return False
            if self.pattern is not None and not any(self.pattern.search(v) for v in values):
                return False
        return True


class _Headers:
    """The header block, parsed only if a rule gets as far as asking for a header."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._parsed: Message | None = None

    def values(self, name: str) -> list[str]:
        if self._parsed is None:
            self._parsed = _parse_head(self._data)
        return [_header_text(v) for v in self._parsed.get_all(name) or []]


class PriorityRules:
    """The configured rules, compiled once; `match` runs for every message at ingest."""

    def __init__(self, rules: Sequence[PriorityRule]) -> None:
        self._rules = [_Compiled(r) for r in rules]

    def __bool__(self) -> bool:
        return bool(self._rules)

    def match(
        self,
        mail_from: str,
        recipient_domains: Iterable[str],
        transports: Iterable[str],
        data: bytes,
    ) -> int | None:
        """The index of the first rule the message matches, or None: an ordinary message.

        Recipient domains and transports match when any of the message's do: one
        recipient at a partner is enough to prioritize the message.
        """
        if not self._rules:
            return None
        sender = _domain(mail_from)
        domains = {d.lower().rstrip(".") for d in recipient_domains}
        names = set(transports)
        headers = _Headers(data)
        for index, rule in enumerate(self._rules):
            if rule.matches(sender, domains, names, len(data), headers):
                return index
        return None


def describe_rule(rule: PriorityRule) -> str:
    """One line for `postflow config check`, in the words of the configuration."""
    parts = []
    if rule.sender_domains is not None:
        parts.append(f"sender domain {' or '.join(rule.sender_domains)}")
    if rule.recipient_domains is not None:
        parts.append(f"any recipient domain {' or '.join(rule.recipient_domains)}")
    if rule.transports is not None:
        parts.append(f"any recipient via transport {' or '.join(rule.transports)}")
    if rule.header is not None:
        if rule.match is None:
            parts.append(f"header {rule.header} present")
        else:
            parts.append(f"header {rule.header} matching /{rule.match}/")
    if rule.max_size is not None:
        parts.append(f"size up to {rule.max_size} bytes")
    return " and ".join(parts)

"""RFC 5321 envelope addresses (with RFC 6531 SMTPUTF8): syntax and length checks. Pure.

`split_path` cuts `<path> params` from a MAIL/RCPT argument; `parse_path` checks the path
and returns the mailbox. Problems raise `AddressError` carrying the SMTP reply to give,
worded so that the client learns exactly what is wrong.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["AddressError", "parse_path", "split_path"]

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, §4.5.3.1.2
MAX_PATH = 256  # octets including the angle brackets, §4.5.3.1.3
MAX_LABEL = 63  # octets, RFC 1035 §2.3.4

_ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")
# RFC 6531 adds every non-ASCII character to atext and qtext.
_ATEXT_UTF8 = re.compile(r"^(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])+$")
_LDH = re.compile(r"^[A-Za-z0-9-]+$")
_LDH_UTF8 = re.compile(r"^(?:[A-Za-z0-9-]|[^\x00-\x7f])+$")  # U-labels, RFC 6531 §3.3
_GENERAL_TAG = re.compile(r"^[A-Za-z0-9-]*[A-Za-z0-9]$")


class AddressError(ValueError):
    """A bad envelope address; `reply` is the complete SMTP reply line to send."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def _syntax(what: str, problem: str) -> AddressError:
    return AddressError(501, "5.1.3", f"Bad {what} address syntax: {problem}")


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


def split_path(arg: str) -> tuple[str, str]:
    """`<a@b> SIZE=10` → (`<a@b>`, `SIZE=10`); a bare `a@b` is taken up to the first space.

    Quoted local parts may hold `>` and spaces, so the end is found outside quotes.
    """
    arg = arg.lstrip(" ")  # RFC 5321 has no space after the colon; Postfix allows it.
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest.strip(" ")
    quoted = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                return arg, ""  # parse_path reports the junk after '>'
            return arg[: i + 1], rest.strip(" ")
    return arg, ""


def _check_domain(domain: str, what: str, smtputf8: bool) -> None:
    if not domain:
        raise _syntax(what, "no domain after '@'")
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _syntax(what, f"address literal {domain!r} lacks ']'")
        _check_literal(domain[1:-1], what)
        return
    if _octets(domain) > MAX_DOMAIN:
        raise AddressError(
            553, "5.1.3", f"Bad {what} address: domain longer than {MAX_DOMAIN} octets"
        )
    ldh = _LDH_UTF8 if smtputf8 else _LDH
    for label in domain.split("."):
        if not label:
            raise _syntax(what, f"empty label in domain {domain!r}")
        if _octets(label) > MAX_LABEL:
            raise AddressError(
                553, "5.1.3", f"Bad {what} address: domain label longer than {MAX_LABEL} octets"
            )
        if not ldh.match(label) or label.startswith("-") or label.endswith("-"):
            raise _syntax(what, f"invalid domain label {label!r}")


def _check_literal(body: str, what: str) -> None:
    tag, colon, value = body.partition(":")
    if not colon:
        try:
            ipaddress.IPv4Address(body)
        except ValueError:
            raise _syntax(what, f"[{body}] is not an IPv4 address literal") from None
        return
    if tag.upper() == "IPV6":
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise _syntax(what, f"[{body}] is not an IPv6 address literal") from None
        return
    if not _GENERAL_TAG.match(tag) or not value or not all(33 <= ord(c) <= 126 for c in value):
        raise _syntax(what, f"[{body}] is not an address literal")
    if "[" in value or "]" in value or "\\" in value:
        raise _syntax(what, f"[{body}] is not an address literal")


def _check_quoted(local: str, what: str, smtputf8: bool) -> None:
    inner, i = local[1:-1], 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            if i + 1 >= len(inner) or not 32 <= ord(inner[i + 1]) <= 126:
                raise _syntax(what, "bad quoted pair in the local part")
            i += 2
            continue
        if ch == '"' or (ord(ch) < 32 or ord(ch) == 127) or (ord(ch) > 127 and not smtputf8):
            raise _syntax(what, f"character {ch!r} not allowed in a quoted local part")
        i += 1


def _check_local(local: str, what: str, smtputf8: bool) -> None:
    if not local:
        raise _syntax(what, "empty local part")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(
            553, "5.1.3", f"Bad {what} address: local part longer than {MAX_LOCAL_PART} octets"
        )
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        _check_quoted(local, what, smtputf8)
        return
    atext = _ATEXT_UTF8 if smtputf8 else _ATEXT
    for atom in local.split("."):
        if not atom:
            raise _syntax(what, "empty atom in the local part (leading, trailing or double dot)")
        if not atext.match(atom):
            bad = next(c for c in atom if not atext.match(c))
            raise _syntax(what, f"character {bad!r} not allowed in the local part")


def _split_mailbox(mailbox: str, what: str) -> tuple[str, str]:
    """The '@' that separates local part and domain is the last one outside quotes."""
    if mailbox.startswith('"'):
        end, i = -1, 1
        while i < len(mailbox):
            if mailbox[i] == "\\":
                i += 2
                continue
            if mailbox[i] == '"':
                end = i
                break
            i += 1
        if end < 0:
            raise _syntax(what, "unterminated quoted local part")
        local, rest = mailbox[: end + 1], mailbox[end + 1 :]
        if not rest.startswith("@"):
            raise _syntax(what, "missing '@domain'")
        return local, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if not at:
        raise _syntax(what, "missing '@domain'")
    return local, domain


def parse_path(path: str, *, what: str, null_ok: bool, smtputf8: bool) -> str:
    """The mailbox of a reverse-path (`null_ok`: `<>` gives "") or forward-path.

    `what` ("sender", "recipient") words the error. A source route (`<@a,@b:u@d>`) is
    accepted and dropped, as RFC 5321 §4.1.1.3 requires.
    """
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in path):
        raise _syntax(what, "not valid UTF-8")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise _syntax(what, "control character")
    if not path.startswith("<"):
        if not path:
            raise _syntax(what, "empty address, expected <local@domain>")
        # Postfix accepts a bare address too; only the brackets are implied.
        path = f"<{path}>"
    if not path.endswith(">"):
        raise _syntax(what, "missing '>' or text after it")
    if _octets(path) > MAX_PATH:
        raise AddressError(553, "5.1.3", f"Bad {what} address: path longer than {MAX_PATH} octets")
    inner = path[1:-1]
    if not inner:
        if null_ok:
            return ""
        raise _syntax(what, "the null address <> is allowed for the sender only")
    if inner.startswith("@"):
        _route, colon, inner = inner.partition(":")
        if not colon or not inner:
            raise _syntax(what, "bad source route")
    non_ascii = not inner.isascii()
    if non_ascii and not smtputf8:
        raise AddressError(
            553, "5.6.7", f"Bad {what} address: non-ASCII address needs MAIL FROM ... SMTPUTF8"
        )
    local, domain = _split_mailbox(inner, what)
    _check_local(local, what, smtputf8)
    _check_domain(domain, what, smtputf8)
    return inner

"""MAIL and RCPT parameters (RFC 5321 §4.1.2): SIZE, BODY, SMTPUTF8, AUTH and the RFC 3461
DSN parameters RET, ENVID, NOTIFY, ORCPT, with RFC 3461 xtext. Pure.

Values keep their case (ENVID and ORCPT are case-sensitive). ENVID and ORCPT are kept in
canonical xtext, the form they take on the wire, so they can be passed on unchanged;
`xtext_decode` gives the text for a DSN. Problems raise `ParamError` with the reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MailParams",
    "ParamError",
    "RcptParams",
    "parse_mail_params",
    "parse_rcpt_params",
    "split_params",
    "xtext_decode",
    "xtext_encode",
]

MAX_ENVID = 100  # characters, RFC 3461 §4.4
MAX_ORCPT = 500  # characters, RFC 3461 §4.2 allows the RCPT line to grow by 500
NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+$")
_HEX = "0123456789ABCDEF"


class ParamError(ValueError):
    """A bad MAIL/RCPT parameter; `reply` is the complete SMTP reply line to send."""

    def __init__(self, code: int, text: str, enhanced: str = "5.5.4") -> None:
        super().__init__(text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: str | None = None  # 7BIT or 8BITMIME
    smtputf8: bool = False
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None  # canonical xtext
    auth: str | None = None  # RFC 4954 AUTH=, xtext or "<>"


@dataclass(frozen=True)
class RcptParams:
    notify: list[str] | None = None  # ["NEVER"] or a subset of NOTIFY_WORDS
    orcpt: str | None = None  # "addr-type;xtext", canonical


def xtext_decode(text: str) -> str:
    """`a+2Bb` → `a+b`; raises ValueError on anything that is not xtext."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            pair = text[i + 1 : i + 3].upper()
            if len(pair) != 2 or any(c not in _HEX for c in pair):
                raise ValueError("'+' must be followed by two hex digits")
            out.append(chr(int(pair, 16)))
            i += 3
            continue
        if not 33 <= ord(ch) <= 126 or ch == "=":
            raise ValueError(f"character {ch!r} must be written as +XX")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """Printable ASCII except '+' and '=' as is, everything else as +XX (RFC 3461 §4)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def split_params(text: str, verb: str) -> dict[str, str | None]:
    """`SIZE=10 SMTPUTF8` → {"SIZE": "10", "SMTPUTF8": None}; keywords upper-cased."""
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword) or (eq and not value):
            raise ParamError(501, f"Bad {verb} parameter syntax: {item!r}")
        if any(ord(c) < 33 or ord(c) == 127 or 0xDC80 <= ord(c) <= 0xDCFF for c in value):
            raise ParamError(501, f"Bad {verb} parameter syntax: {item!r}")
        keyword = keyword.upper()
        if keyword in params:
            raise ParamError(501, f"{verb} parameter {keyword} given twice")
        params[keyword] = value if eq else None
    return params


def _canonical_xtext(value: str, what: str) -> tuple[str, str]:
    try:
        decoded = xtext_decode(value)
    except ValueError as exc:
        raise ParamError(501, f"Bad {what} parameter: not xtext ({exc})") from None
    return decoded, xtext_encode(decoded)


def parse_mail_params(text: str, *, extended: bool = True) -> MailParams:
    """Every MAIL FROM parameter Postflow announces; anything else is refused with 555."""
    params = split_params(text, "MAIL")
    if params and not extended:
        raise ParamError(501, "MAIL parameters need EHLO, not HELO")
    fields: dict[str, object] = {}
    for keyword, value in params.items():
        if keyword == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParamError(501, f"Bad SIZE parameter: {value!r} is not a number of octets")
            fields["size"] = int(value)
        elif keyword == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise ParamError(501, f"Bad BODY parameter: {value!r} (7BIT or 8BITMIME)")
            fields["body"] = body
        elif keyword == "SMTPUTF8":
            if value is not None:
                raise ParamError(501, "SMTPUTF8 takes no value")
            fields["smtputf8"] = True
        elif keyword == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise ParamError(501, f"Bad RET parameter: {value!r} (FULL or HDRS)")
            fields["ret"] = ret
        elif keyword == "ENVID":
            decoded, canonical = _canonical_xtext(value or "", "ENVID")
            if not decoded or len(decoded) > MAX_ENVID:
                raise ParamError(501, f"Bad ENVID parameter: 1 to {MAX_ENVID} characters")
            if not all(33 <= ord(c) <= 126 for c in decoded):
                raise ParamError(501, "Bad ENVID parameter: only printable ASCII allowed")
            fields["envid"] = canonical
        elif keyword == "AUTH":
            if value != "<>":
                fields["auth"] = _canonical_xtext(value or "", "AUTH")[1]
        else:
            raise ParamError(555, f"Unsupported MAIL parameter {keyword}")
    return MailParams(**fields)  # type: ignore[arg-type]


def _orcpt(value: str, smtputf8: bool) -> str:
    addr_type, semicolon, address = value.partition(";")
    if not semicolon or not _ATOM.match(addr_type) or not address:
        raise ParamError(501, "Bad ORCPT parameter: expected addr-type;address, e.g. rfc822;a@b")
    if addr_type.lower() == "utf-8":
        # RFC 6533 utf-8-addr-xtext: non-ASCII as is (SMTPUTF8 only), kept as given.
        if not address.isascii() and not smtputf8:
            raise ParamError(501, "Bad ORCPT parameter: non-ASCII needs SMTPUTF8")
        canonical = address
    else:
        decoded, canonical = _canonical_xtext(address, "ORCPT")
        if not decoded.isascii():
            raise ParamError(501, "Bad ORCPT parameter: non-ASCII needs addr-type utf-8")
    if len(canonical) > MAX_ORCPT:
        raise ParamError(501, f"Bad ORCPT parameter: longer than {MAX_ORCPT} characters")
    return f"{addr_type.lower()};{canonical}"  # addr-type is case-insensitive


def _notify(value: str) -> list[str]:
    words = [w.upper() for w in value.split(",")]
    if words == ["NEVER"]:
        return words
    if "NEVER" in words:
        raise ParamError(501, "Bad NOTIFY parameter: NEVER must stand alone")
    if len(set(words)) != len(words) or any(w not in NOTIFY_WORDS for w in words):
        raise ParamError(
            501, f"Bad NOTIFY parameter: {value!r} (NEVER, or any of SUCCESS,FAILURE,DELAY)"
        )
    return words


def parse_rcpt_params(text: str, *, extended: bool = True, smtputf8: bool = False) -> RcptParams:
    """NOTIFY and ORCPT (RFC 3461 §4.1, §4.2); anything else is refused with 555."""
    params = split_params(text, "RCPT")
    if params and not extended:
        raise ParamError(501, "RCPT parameters need EHLO, not HELO")
    notify: list[str] | None = None
    orcpt: str | None = None
    for keyword, value in params.items():
        if keyword == "NOTIFY":
            notify = _notify(value or "")
        elif keyword == "ORCPT":
            orcpt = _orcpt(value or "", smtputf8)
        else:
            raise ParamError(555, f"Unsupported RCPT parameter {keyword}")
    return RcptParams(notify=notify, orcpt=orcpt)

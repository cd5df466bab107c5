"""Builds delivery status notifications (RFC 3464 inside RFC 6522 multipart/report). Pure.

Takes the workflow's per-recipient results and the original's bytes, returns the report's
bytes; never reads files, clocks or the network. Every value that comes from the original
message or from a server reply is sanitized before it reaches a header.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from datetime import datetime, timedelta
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.utils import format_datetime
from io import BytesIO

from postflow import esmtp_params
from postflow.models import FailureReportRequest, Recipient, RecipientReport
from postflow.schedule import format_minutes

__all__ = [
    "ACTIONS",
    "DEFAULT_NOTIFY",
    "build_report",
    "notify_set",
    "report_queue_id",
    "sanitize_header",
    "xtext_decode",
]

ACTIONS = ("failed", "delayed", "delivered", "relayed")
# RFC 3461 §4.1 leaves the default to the MTA; Postfix's is "delay,failure".
DEFAULT_NOTIFY = frozenset({"FAILURE", "DELAY"})

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "delivered": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_MESSAGE_ID = re.compile(r"^<[^<>\s\"]{1,250}>$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,253}$")
# RFC 3464 fields and a header line stay readable below RFC 5322's 998-octet limit.
MAX_FIELD = 300
MAX_DIAGNOSTIC = 600
# Headers-only returns still carry the whole header block, up to this much.
MAX_HEADER_BLOCK = 64 * 1024


class _Generator(BytesGenerator):
    """Writes 8-bit originals verbatim: the stdlib encodes message/rfc822 payloads as ASCII."""

    def _encode(self, s: str) -> bytes:
        return s.encode("ascii", "surrogateescape")


def report_queue_id(queue_id: str, sequence: int) -> str:
    """The report's own queue id: fixed by the original and the report's number, so a
    retried activity finds the report it already queued instead of queuing a second one."""
    return f"{queue_id}-DSN{sequence}"


def notify_set(recipient: Recipient | None) -> frozenset[str]:
    """The RFC 3461 NOTIFY conditions that apply; empty for NEVER."""
    if recipient is None or not recipient.notify:
        return DEFAULT_NOTIFY
    wanted = frozenset(n.strip().upper() for n in recipient.notify)
    return frozenset() if "NEVER" in wanted else wanted


def sanitize_header(value: str, limit: int = MAX_FIELD) -> str:
    """One line of text: control characters (CR and LF above all) become spaces."""
    text = " ".join(_CONTROL.sub(" ", value).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def xtext_decode(value: str) -> str:
    """RFC 3461 §4 xtext as the ingest checked it; anything else (an old or foreign
    input) is shown as it is rather than failing the report."""
    try:
        return esmtp_params.xtext_decode(value)
    except ValueError:
        return value


def _ascii(text: str) -> str:
    """RFC 3464 fields are US-ASCII; other characters as RFC 6533's `\\x{HEX}`."""
    return "".join(c if " " <= c <= "~" else f"\\x{{{ord(c):X}}}" for c in text)


def _address_field(address: str) -> str:
    """`rfc822; addr`, or RFC 6533 `utf-8; ` with utf-8-addr-xtext for internationalized ones."""
    address = sanitize_header(address)
    if address.isascii():
        return f"rfc822; {address}"
    encoded = "".join(
        c if ("!" <= c <= "~" and c not in "+=\\") else f"\\x{{{ord(c):X}}}" for c in address
    )
    return f"utf-8; {encoded}"


def _original_recipient(orcpt: str | None) -> str | None:
    if not orcpt or ";" not in orcpt:
        return None
    kind, _, value = orcpt.partition(";")
    kind = sanitize_header(kind).lower()
    if not re.fullmatch(r"[a-z0-9-]{1,40}", kind):
        return None
    value = value.strip()
    # rfc822 addresses arrive xtext-encoded; utf-8 ones are already in their field form.
    decoded = xtext_decode(value) if kind == "rfc822" else value
    decoded = _ascii(sanitize_header(decoded))
    return f"{kind}; {decoded}" if decoded else None


def _host(name: str) -> str | None:
    name = sanitize_header(name, 253)
    try:
        ipaddress.ip_address(name)
        return f"[{name}]"
    except ValueError:
        return name if _HOSTNAME.fullmatch(name) else None


def _status(report: RecipientReport, action: str) -> str:
    status = report.enhanced if report.enhanced and _STATUS.match(report.enhanced) else None
    if action in ("delivered", "relayed"):
        return "2.0.0"
    if action == "delayed":
        # A delay report always speaks of a transient condition (RFC 3463 class 4).
        return "4" + status[1:] if status else "4.0.0"
    # A recipient given up after temporary failures keeps its 4.x.y: RFC 3463 class 4
    # covers "abandonment", and senders' tools must not treat it as a hard bounce.
    return status or "5.0.0"


def _diagnostic(report: RecipientReport) -> str | None:
    """The remote server's own reply, only when one answered (RFC 3464 §2.3.6)."""
    if report.code is None:
        return None
    text = sanitize_header(report.text, MAX_DIAGNOSTIC)
    if not text.startswith(str(report.code)):
        text = f"{report.code} {text}".strip()
    return "smtp; " + _ascii(text)


def _date(when: datetime) -> str:
    return format_datetime(when)


def _header_block(original: bytes) -> bytes:
    """The original's header section up to the blank line, cut at a line end if huge."""
    match = re.search(rb"\r?\n\r?\n", original)
    head = original if match is None else original[: match.start()]
    if len(head) > MAX_HEADER_BLOCK:
        head = head[: head.rfind(b"\n", 0, MAX_HEADER_BLOCK)]
    return _crlf(head.rstrip(b"\r\n") + b"\r\n")


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _per_message_fields(req: FailureReportRequest, reporting_mta: str) -> Message:
    block = Message(policy=email_policy.SMTP)
    msg = req.message
    block["Reporting-MTA"] = f"dns; {reporting_mta}"
    block["X-Postflow-Queue-ID"] = sanitize_header(msg.queue_id)
    if msg.mail_from:
        block["X-Postflow-Sender"] = _address_field(msg.mail_from)
    if msg.envid:
        envid = _ascii(sanitize_header(xtext_decode(msg.envid), 100))
        if envid:
            block["Original-Envelope-Id"] = envid
    block["Arrival-Date"] = _date(msg.arrival)
    return block


def _per_recipient_fields(
    report: RecipientReport, recipient: Recipient | None, req: FailureReportRequest
) -> Message:
    block = Message(policy=email_policy.SMTP)
    original = _original_recipient(recipient.orcpt if recipient else None)
    if original:
        block["Original-Recipient"] = original
    block["Final-Recipient"] = _address_field(report.address)
    block["Action"] = req.action
    block["Status"] = _status(report, req.action)
    diagnostic = _diagnostic(report)
    if diagnostic and report.remote_host:
        host = _host(report.remote_host)
        if host:
            block["Remote-MTA"] = f"dns; {host}"
    if diagnostic:
        block["Diagnostic-Code"] = diagnostic
    if report.last_attempt_at:
        block["Last-Attempt-Date"] = _date(report.last_attempt_at)
    until = req.retry_until.get(report.address)
    if req.action == "delayed" and until:
        block["Will-Retry-Until"] = _date(until)
    return block


def _how_long(req: FailureReportRequest, report: RecipientReport) -> str:
    start = req.queued_since or req.message.arrival
    if report.last_attempt_at is None or report.last_attempt_at < start:
        return ""
    span = report.last_attempt_at - start
    tried = "1 attempt" if report.attempts == 1 else f"{report.attempts} attempts"
    if span < timedelta(minutes=1):
        return f"{tried}"
    return f"{tried} over {format_minutes(span)}"


def _explanation(
    req: FailureReportRequest, reporting_mta: str, returned: str, original_size: int | None
) -> str:
    msg = req.message
    lines = [f"This is the mail delivery system at {reporting_mta}.", ""]
    intro = {
        "failed": (
            "Your message could not be delivered to the recipients below; the mail system "
            "has given up on them. The reason each one failed is given with it."
        ),
        "delayed": (
            "Your message has not been delivered to the recipients below yet. This is only "
            "a warning: the mail system keeps trying, and you do not need to send the "
            "message again. You will be told if it finally fails."
        ),
        "delivered": "Your message was delivered to the recipients below.",
        "relayed": (
            "Your message was handed to the mail servers of the recipients below. Those "
            "servers do not send delivery notifications, so this is the last report you "
            "will receive about these recipients."
        ),
    }[req.action]
    lines += [intro, ""]
    for report in req.recipients:
        reason = sanitize_header(report.text or report.note or "", MAX_DIAGNOSTIC)
        where = ""
        if report.remote_host:
            host = sanitize_header(report.remote_host, 253)
            ip = sanitize_header(report.remote_ip or "", 64)
            where = f"{host} [{ip}]" if ip and ip != host else host
        lines.append(f"<{sanitize_header(report.address)}>:")
        if reason:
            lines.append(f"    {reason}")
        details = [
            d
            for d in (
                f"answered by {where}" if where and report.code is not None else "",
                f"while trying {where}" if where and report.code is None else "",
                _how_long(req, report),
            )
            if d
        ]
        if details:
            lines.append(f"    ({'; '.join(details)})")
        until = req.retry_until.get(report.address)
        if req.action == "delayed" and until:
            lines.append(f"    (will be retried until {_date(until)})")
        lines.append("")
    about = [f"Queue ID: {sanitize_header(msg.queue_id)}"]
    if msg.subject:
        about.append(f"Subject: {sanitize_header(msg.subject, 200)}")
    if msg.message_id:
        about.append(f"Message-ID: {sanitize_header(msg.message_id, 200)}")
    about.append(f"Received: {_date(msg.arrival)}")
    lines += ["About your message:", *(f"    {a}" for a in about), ""]
    if returned == "full":
        lines.append("Your message is attached.")
    elif returned == "headers" and msg.ret and msg.ret.upper() == "FULL":
        lines.append(
            f"Your message ({original_size} bytes) is too large to return in full; "
            "its headers are attached."
        )
    elif returned == "headers":
        lines.append("The headers of your message are attached.")
    else:
        lines.append("Your message could no longer be read, so it is not attached.")
    return "\n".join(lines) + "\n"


def _boundary(report_id: str, original: bytes | None) -> str:
    digest = hashlib.sha256(report_id.encode()).hexdigest()[:24]
    boundary = f"=_postflow_report_{digest}"
    while original is not None and boundary.encode() in original:
        boundary += "_"
    return boundary


def build_report(
    req: FailureReportRequest,
    original: bytes | None,
    *,
    reporting_mta: str,
    report_id: str,
    return_size_limit: int,
    now: datetime,
) -> bytes:
    """The report's bytes (CRLF line ends); deterministic for the same arguments.

    `original` is the spooled message or None when it could not be read (the report is then
    sent without it, RFC 6522 makes that part optional). RET=FULL returns the whole message
    only up to `return_size_limit` bytes, otherwise its headers (Postfix's bounce_size_limit).
    """
    if req.action not in ACTIONS:
        raise ValueError(f"unknown DSN action {req.action!r} (known: {', '.join(ACTIONS)})")
    if not req.recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    mta = _host(reporting_mta) or "localhost"
    msg = req.message
    utf8 = not msg.mail_from.isascii()
    policy = email_policy.SMTPUTF8 if utf8 else email_policy.SMTP

    returned = "none"
    if original is not None:
        full = (msg.ret or "").upper() == "FULL" and len(original) <= return_size_limit
        returned = "full" if full else "headers"

    text = EmailMessage(policy=policy)
    explanation = _explanation(req, mta, returned, len(original) if original else None)
    text.set_content(explanation, cte="7bit" if explanation.isascii() else "quoted-printable")
    del text["MIME-Version"]

    status = EmailMessage(policy=policy)
    status["Content-Type"] = "message/delivery-status"
    by_address = {r.address: r for r in msg.recipients}
    status.set_payload(
        [_per_message_fields(req, mta)]
        + [_per_recipient_fields(r, by_address.get(r.address), req) for r in req.recipients]
    )
    parts = [text, status]

    if original is not None:
        returned_part = EmailMessage(policy=policy)
        if returned == "full":
            body = _crlf(original)
            returned_part["Content-Type"] = "message/rfc822"
            returned_part["Content-Transfer-Encoding"] = "7bit" if body.isascii() else "8bit"
            returned_part.set_payload(body.decode("ascii", "surrogateescape"))
        else:
            head = _header_block(original)
            returned_part.set_content(
                head,
                maintype="text",
                subtype="rfc822-headers",
                cte="7bit" if head.isascii() else "8bit",
            )
            del returned_part["MIME-Version"]
        parts.append(returned_part)

    report = EmailMessage(policy=policy)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{mta.strip('[]')}>"
    report["To"] = f"<{sanitize_header(msg.mail_from)}>"
    report["Subject"] = _SUBJECTS[req.action]
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{report_id}@{mta.strip('[]')}>"
    original_id = sanitize_header(msg.message_id or "", 300)
    if _MESSAGE_ID.match(original_id):
        report["In-Reply-To"] = original_id
        report["References"] = original_id
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"
    report.set_payload(parts)
    report.set_boundary(_boundary(report_id, original))

    out = BytesIO()
    # Each header and RFC 3464 field on one line (all are well below 998 octets): line-based
    # DSN parsers read them, and the stdlib would fold some right after the field name.
    _Generator(out, policy=policy.clone(max_line_length=998)).flatten(report)
    return out.getvalue()

"""postflow.dsn: reports built from result sets and parsed back with the stdlib `email`."""

from __future__ import annotations

import email
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime

import pytest

from postflow.dsn import build_report, notify_set, report_queue_id, sanitize_header
from postflow.models import (
    DeliverInput,
    DeliveryGroup,
    FailureReportRequest,
    Recipient,
    RecipientReport,
    RecipientState,
)
from postflow.schedule import RetrySchedule

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ORIGINAL = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <q1@sender.test>\r\n"
    b"\r\n"
    b"The numbers are in.\r\n"
)


def _message(recipients: list[Recipient], **fields: object) -> DeliverInput:
    values: dict[str, object] = {
        "queue_id": "4ZQTEST0001",
        "spool_key": "4ZQTEST0001",
        "mail_from": "alice@sender.test",
        "groups": [
            DeliveryGroup(
                transport="default",
                domain="dest.test",
                recipients=recipients,
                schedule=RetrySchedule(delays=[60, 120, 180], count=30),
            )
        ],
        "size": len(ORIGINAL),
        "arrival": T0,
        "message_id": "<q1@sender.test>",
        "subject": "Quarterly numbers",
    }
    values.update(fields)
    return DeliverInput.model_validate(values)


def _failed(address: str, **fields: object) -> RecipientReport:
    values: dict[str, object] = {
        "address": address,
        "transport": "default",
        "state": RecipientState.FAILED,
        "attempts": 1,
        "last_attempt_at": T0 + timedelta(seconds=2),
    }
    values.update(fields)
    return RecipientReport.model_validate(values)


def _build(
    req: FailureReportRequest, original: bytes | None = ORIGINAL, limit: int = 50_000
) -> tuple[bytes, EmailMessage]:
    data = build_report(
        req,
        original,
        reporting_mta="mx.postflow.test",
        report_id=report_queue_id(req.message.queue_id, 1),
        return_size_limit=limit,
        now=T0 + timedelta(minutes=5),
    )
    return data, email.message_from_bytes(data, policy=policy.default)


def _when(block: Message, name: str) -> datetime:
    return parsedate_to_datetime(str(block[name]))


def _status_blocks(report: EmailMessage) -> tuple[Message, list[Message]]:
    part = report.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def test_three_recipients_with_different_failures() -> None:
    recipients = [
        Recipient(address="gone@dest.test", orcpt="rfc822;gone+2Bold@dest.test"),
        Recipient(address="full@dest.test"),
        Recipient(address="nodns@dest.test"),
    ]
    msg = _message(recipients, envid="QT+2B42", ret="HDRS")
    reports = [
        _failed(
            "gone@dest.test",
            code=550,
            enhanced="5.1.1",
            text="550 5.1.1 <gone@dest.test>: user unknown",
            remote_host="mx1.dest.test",
            remote_ip="127.0.0.9",
            stage="rcpt",
        ),
        _failed(
            "full@dest.test",
            code=452,
            enhanced="4.2.2",
            text="452 4.2.2 mailbox full",
            remote_host="mx1.dest.test",
            remote_ip="127.0.0.9",
            attempts=31,
            last_attempt_at=T0 + timedelta(hours=87, seconds=3),
            note="gave up after 31 attempts",
        ),
        _failed(
            "nodns@dest.test",
            enhanced="5.1.2",
            text="dest.test: domain does not exist",
            stage="dns",
        ),
    ]
    req = FailureReportRequest(message=msg, recipients=reports, created_at=T0)
    data, report = _build(req)

    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.postflow.test"
    assert report["From"].addresses[0].display_name == "Mail Delivery System"
    assert report["To"].addresses[0].addr_spec == "alice@sender.test"
    assert report["Subject"] == "Undelivered Mail Returned to Sender"
    assert report["Auto-Submitted"] == "auto-replied"
    assert report["Message-ID"] == "<4ZQTEST0001-DSN1@mx.postflow.test>"
    assert report["Date"].datetime == T0 + timedelta(minutes=5)
    assert report["In-Reply-To"] == "<q1@sender.test>"
    assert report["References"] == "<q1@sender.test>"
    parts = report.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert all(line.endswith(b"\r") or not line for line in data.split(b"\n")[:-1])

    human = parts[0].get_content()
    for address in ("gone@dest.test", "full@dest.test", "nodns@dest.test"):
        assert f"<{address}>" in human
    assert "user unknown" in human and "mailbox full" in human and "does not exist" in human
    assert "31 attempts over 87 h 0 min" in human

    per_message, per_recipient = _status_blocks(report)
    assert per_message["Reporting-MTA"] == "dns; mx.postflow.test"
    assert per_message["Original-Envelope-Id"] == "QT+42"  # xtext-decoded
    assert _when(per_message, "Arrival-Date") == T0
    assert len(per_recipient) == 3
    gone, full, nodns = per_recipient
    assert gone["Final-Recipient"] == "rfc822; gone@dest.test"
    assert gone["Original-Recipient"] == "rfc822; gone+old@dest.test"
    assert gone["Action"] == "failed"
    assert gone["Status"] == "5.1.1"
    assert gone["Remote-MTA"] == "dns; mx1.dest.test"
    assert gone["Diagnostic-Code"] == "smtp; 550 5.1.1 <gone@dest.test>: user unknown"
    assert _when(gone, "Last-Attempt-Date") == T0 + timedelta(seconds=2)
    assert full["Final-Recipient"] == "rfc822; full@dest.test"
    assert full["Original-Recipient"] is None
    assert full["Action"] == "failed"
    # Given up after temporary failures: the 4.x.y stays (RFC 3463 "abandonment").
    assert full["Status"] == "4.2.2"
    assert full["Diagnostic-Code"] == "smtp; 452 4.2.2 mailbox full"
    assert _when(full, "Last-Attempt-Date") == T0 + timedelta(hours=87, seconds=3)
    # No server answered: no Remote-MTA, no smtp Diagnostic-Code.
    assert nodns["Status"] == "5.1.2"
    assert nodns["Remote-MTA"] is None and nodns["Diagnostic-Code"] is None
    for block in per_recipient:
        assert block["Will-Retry-Until"] is None

    headers = parts[2].get_content()
    assert "Subject: Quarterly numbers" in headers
    assert "The numbers are in." not in headers


def test_ret_full_returns_the_message_and_hdrs_only_headers() -> None:
    rcpt = [Recipient(address="gone@dest.test")]
    failed = [_failed("gone@dest.test", code=550, enhanced="5.1.1", text="550 5.1.1 unknown")]

    _, full = _build(FailureReportRequest(message=_message(rcpt, ret="FULL"), recipients=failed))
    returned = full.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "Quarterly numbers"
    assert inner.get_content() == "The numbers are in.\r\n"
    assert "is attached" in full.get_payload()[0].get_content()

    _, hdrs = _build(FailureReportRequest(message=_message(rcpt, ret="HDRS"), recipients=failed))
    assert hdrs.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "numbers are in" not in hdrs.get_payload()[2].get_content()

    # No RET at all: headers (RFC 3461 leaves it to the MTA; Postfix returns headers too).
    _, default = _build(FailureReportRequest(message=_message(rcpt), recipients=failed))
    assert default.get_payload()[2].get_content_type() == "text/rfc822-headers"

    # RET=FULL over the size limit: headers only, and the text says why.
    _, big = _build(
        FailureReportRequest(message=_message(rcpt, ret="FULL"), recipients=failed),
        limit=len(ORIGINAL) - 1,
    )
    assert big.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert "too large to return in full" in big.get_payload()[0].get_content()


def test_original_unreadable_still_reports() -> None:
    failed = [_failed("gone@dest.test", code=550, enhanced="5.1.1", text="550 5.1.1 unknown")]
    req = FailureReportRequest(
        message=_message([Recipient(address="gone@dest.test")]), recipients=failed
    )
    _, report = _build(req, original=None)
    assert [p.get_content_type() for p in report.get_payload()] == [
        "text/plain",
        "message/delivery-status",
    ]
    assert "could no longer be read" in report.get_payload()[0].get_content()


def test_header_injection_in_reply_text_and_original_headers() -> None:
    evil_reply = "550 5.1.1 no such user\r\nBcc: victim@evil.test\r\n\r\nX-Injected: yes"
    failed = [
        _failed(
            "gone@dest.test",
            code=550,
            enhanced="5.1.1\r\nX-Evil: 1",
            text=evil_reply,
            remote_host="mx.dest.test\r\nX-Host: evil",
        )
    ]
    msg = _message(
        [Recipient(address="gone@dest.test")],
        message_id="<q1@sender.test>\r\nBcc: victim@evil.test",
        subject="hi\r\nBcc: victim@evil.test",
        envid="E1\r\nX-Envid: evil",
    )
    data, report = _build(FailureReportRequest(message=msg, recipients=failed))
    for name in ("Bcc", "X-Injected", "X-Evil", "X-Host", "X-Envid"):
        assert report[name] is None
    # An In-Reply-To that is not one clean Message-ID is left out rather than passed on.
    assert report["In-Reply-To"] is None
    per_message, (gone,) = _status_blocks(report)
    for block in (per_message, gone):
        assert set(block.keys()) <= {
            "Reporting-MTA",
            "X-Postflow-Queue-ID",
            "X-Postflow-Sender",
            "Original-Envelope-Id",
            "Arrival-Date",
            "Final-Recipient",
            "Action",
            "Status",
            "Remote-MTA",
            "Diagnostic-Code",
            "Last-Attempt-Date",
        }
    assert gone["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 no such user Bcc: victim@evil.test X-Injected: yes"
    )
    assert gone["Status"] == "5.0.0"  # the malformed code is not copied
    assert gone["Remote-MTA"] is None  # neither is a malformed host name
    assert per_message["Original-Envelope-Id"] == "E1 X-Envid: evil"
    # Every line of our own headers and fields is short and free of bare CR or LF.
    for line in data.split(b"\r\n"):
        assert b"\r" not in line and b"\n" not in line
        assert len(line) <= 998


def test_long_reply_is_length_limited() -> None:
    failed = [_failed("gone@dest.test", code=550, enhanced="5.1.1", text="550 " + "x" * 5000)]
    msg = _message([Recipient(address="gone@dest.test")])
    _, report = _build(FailureReportRequest(message=msg, recipients=failed))
    _, (gone,) = _status_blocks(report)
    assert len(gone["Diagnostic-Code"]) <= 610
    assert gone["Diagnostic-Code"].endswith("...")


def test_non_ascii_sender_recipient_reply_and_subject() -> None:
    recipients = [Recipient(address="jürgen@bücher.test")]
    failed = [
        _failed(
            "jürgen@bücher.test",
            code=550,
            enhanced="5.1.1",
            text="550 5.1.1 Benutzer unbekannt: Jürgen",
            remote_host="mx.bücher.test",
        )
    ]
    original = (
        "From: Zoë <zoë@sender.test>\r\nSubject: Grüße\r\nMessage-ID: <u1@sender.test>\r\n"
        "\r\nHallo Jürgen\r\n"
    ).encode()
    msg = _message(
        recipients, mail_from="zoë@sender.test", subject="Grüße", smtputf8=True, ret="FULL"
    )
    data, _ = _build(FailureReportRequest(message=msg, recipients=failed), original)
    # An SMTPUTF8 message (RFC 6532): headers are UTF-8, so read it as text.
    report = email.message_from_string(data.decode("utf-8"), policy=policy.SMTPUTF8)
    assert report["To"].addresses[0].addr_spec == "zoë@sender.test"
    human = report.get_payload()[0]
    assert human.get_content_charset() == "utf-8"
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Grüße" in human.get_content()
    assert "Jürgen" in human.get_content()
    _, (rcpt,) = _status_blocks(report)
    # RFC 6533 utf-8-addr-xtext: the delivery-status part itself stays US-ASCII.
    assert rcpt["Final-Recipient"] == "utf-8; j\\x{FC}rgen@b\\x{FC}cher.test"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: J\\x{FC}rgen"
    assert rcpt["Remote-MTA"] is None  # not a valid DNS name as written
    returned = report.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert "Hallo Jürgen".encode() in data  # returned byte for byte


def test_delayed_report_fields() -> None:
    msg = _message([Recipient(address="slow@dest.test")])
    slow = RecipientReport(
        address="slow@dest.test",
        transport="default",
        state=RecipientState.DEFERRED,
        code=451,
        enhanced="4.7.1",
        text="451 4.7.1 try later",
        remote_host="mx.dest.test",
        attempts=4,
        last_attempt_at=T0 + timedelta(hours=4),
    )
    until = T0 + timedelta(hours=87)
    req = FailureReportRequest(
        message=msg, recipients=[slow], action="delayed", retry_until={"slow@dest.test": until}
    )
    _, report = _build(req)
    assert report["Subject"] == "Delayed Mail (still being retried)"
    _, (block,) = _status_blocks(report)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.7.1"
    assert _when(block, "Will-Retry-Until") == until
    assert "you do not need to send" in report.get_payload()[0].get_content()


def test_relayed_report() -> None:
    msg = _message([Recipient(address="ok@dest.test", notify=["SUCCESS"])])
    ok = RecipientReport(
        address="ok@dest.test",
        transport="default",
        state=RecipientState.DELIVERED,
        code=250,
        enhanced="2.0.0",
        text="250 2.0.0 queued",
        remote_host="mx.dest.test",
        attempts=1,
        last_attempt_at=T0,
    )
    _, report = _build(FailureReportRequest(message=msg, recipients=[ok], action="relayed"))
    assert report["Subject"] == "Successful Mail Delivery Report"
    _, (block,) = _status_blocks(report)
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert block["Remote-MTA"] == "dns; mx.dest.test"


def test_same_input_same_bytes_and_bad_input_rejected() -> None:
    failed = [_failed("gone@dest.test", code=550, enhanced="5.1.1", text="550 5.1.1 unknown")]
    req = FailureReportRequest(
        message=_message([Recipient(address="gone@dest.test")]), recipients=failed
    )
    assert _build(req)[0] == _build(req)[0]
    with pytest.raises(ValueError, match="unknown DSN action"):
        _build(req.model_copy(update={"action": "bounced"}))
    with pytest.raises(ValueError, match="at least one recipient"):
        _build(req.model_copy(update={"recipients": []}))


def test_boundary_never_occurs_in_the_returned_message() -> None:
    failed = [_failed("gone@dest.test", code=550, enhanced="5.1.1", text="550 5.1.1 unknown")]
    msg = _message([Recipient(address="gone@dest.test")], ret="FULL")
    first, _ = _build(FailureReportRequest(message=msg, recipients=failed))
    boundary = email.message_from_bytes(first, policy=policy.default).get_boundary()
    hostile = ORIGINAL + f"--{boundary}\r\n".encode()
    _, report = _build(FailureReportRequest(message=msg, recipients=failed), hostile)
    assert report.get_boundary() != boundary
    assert len(report.get_payload()) == 3


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        (None, {"FAILURE", "DELAY"}),
        (["NEVER"], set()),
        (["SUCCESS"], {"SUCCESS"}),
        (["failure", "delay"], {"FAILURE", "DELAY"}),
    ],
)
def test_notify_set(notify: list[str] | None, expected: set[str]) -> None:
    assert notify_set(Recipient(address="a@b.test", notify=notify)) == expected


def test_sanitize_header() -> None:
    assert sanitize_header("a\r\nb\tc\x00d") == "a b c d"
    assert len(sanitize_header("y" * 1000, 50)) == 50

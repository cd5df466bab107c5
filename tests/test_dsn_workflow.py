"""Delivery status notifications end to end: DeliverMessage on the time-skipping server,
real SMTP peers on loopback, and a sink standing in for the sender's own domain."""

from __future__ import annotations

import dataclasses
import email
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage, Message
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.report import ReportActivities
from activities.resolve import ResolveActivities
from postflow.cli import build_parser
from postflow.config import Config, load_config
from postflow.constants import message_workflow_id
from postflow.dsn import report_queue_id
from postflow.models import (
    DeliverInput,
    DeliveryReport,
    FailureReportRequest,
    Recipient,
    RecipientReport,
    RecipientState,
    ResolveRequest,
)
from postflow.routing import plan_groups
from postflow.spool import FsSpool, new_queue_id
from tests.conftest import make_config, running_worker
from tests.dnsserver import DnsServer
from tests.helpers import MESSAGE, activity_times, submit
from tests.histories import keep_history
from tests.peers import SmtpPeer, fixed

SENDER = "alice@sender.test"
GONE = "gone@dest.test"
STUCK = "stuck@dest.test"
REJECT = "550 5.1.1 <gone@dest.test>: user unknown"
DEFER = "451 4.3.2 System not accepting messages"


def _config(tmp_path: Path, dest: SmtpPeer, sink: SmtpPeer, **default: Any) -> Config:
    """Recipients' domains go to `dest`; the sender's domain (where reports go) to `sink`."""
    return make_config(
        tmp_path,
        transports={
            "default": {"destination": dest.destination, **default},
            "senders": {"destination": sink.destination, "retry_delays": "60", "retry_count": 2},
        },
        routes=[{"domains": ["sender.test"], "transport": "senders"}],
    )


def _parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)


def _recipient_blocks(report: EmailMessage) -> list[Message]:
    status = report.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    return status.get_payload()[1:]


def _offsets(times: list[datetime], start: datetime) -> list[timedelta]:
    return [t - start for t in times]


def _near(got: timedelta, want: timedelta, slack: timedelta = timedelta(seconds=30)) -> bool:
    """`got` is `want` plus the real time SMTP took; dates in reports drop the sub-second."""
    return timedelta(seconds=-1) <= got - want <= slack


async def _report_results(client: Client, queue_id: str, count: int) -> list[DeliveryReport]:
    return [
        await client.get_workflow_handle(
            message_workflow_id(report_queue_id(queue_id, n)), result_type=DeliveryReport
        ).result()
        for n in range(1, count + 1)
    ]


async def _exists(client: Client, queue_id: str) -> bool:
    try:
        await client.get_workflow_handle(message_workflow_id(queue_id)).describe()
    except RPCError as err:
        assert err.status == RPCStatusCode.NOT_FOUND
        return False
    return True


async def test_permanent_failure_reported_at_once_and_give_up_at_87_hours(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    scripts = {GONE: fixed(REJECT), STUCK: fixed(DEFER)}
    async with SmtpPeer(scripts=scripts) as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(
                ts_env.client, config, queue, [GONE, STUCK], ret="FULL", envid="E+2B1"
            )
            result = await handle.result()
            await keep_history(handle, "dsn_failed_now_and_at_87h")
            sends = await activity_times(handle)
            reported = await activity_times(handle, "send_failure_report")
            dsn_results = await _report_results(ts_env.client, result.queue_id, 2)
            report_history = await activity_times(
                ts_env.client.get_workflow_handle(
                    message_workflow_id(report_queue_id(result.queue_id, 1))
                ),
                "send_failure_report",
            )

    # One report when the attempt that failed `gone` ended, one when `stuck` was given up.
    assert len(reported) == 2
    assert _near(reported[0] - sends[0], timedelta(0))
    assert _near(reported[1] - sends[0], timedelta(hours=87), timedelta(minutes=2))
    assert len(sends) == 31
    assert len(sink.received) == 2
    for got in sink.received:
        assert got.mail_from in ("", "<>")  # the null reverse-path
        assert got.rcpt_tos == [SENDER]
    first, second = (_parse(r.data) for r in sink.received)

    assert first["Subject"] == "Undelivered Mail Returned to Sender"
    assert first["From"].addresses[0].addr_spec == "MAILER-DAEMON@postflow.test"
    assert first["In-Reply-To"] == "<t1@sender.test>"
    per_message = first.get_payload()[1].get_payload()[0]
    assert per_message["Reporting-MTA"] == "dns; postflow.test"
    assert per_message["Original-Envelope-Id"] == "E+1"
    (gone,) = _recipient_blocks(first)
    assert gone["Final-Recipient"] == f"rfc822; {GONE}"
    assert (gone["Action"], gone["Status"]) == ("failed", "5.1.1")
    assert gone["Diagnostic-Code"] == f"smtp; {REJECT}"
    assert gone["Remote-MTA"] == "dns; [127.0.0.1]"
    # RET=FULL and small: the original comes back byte for byte.
    assert first.get_payload()[2].get_content_type() == "message/rfc822"
    assert MESSAGE in sink.received[0].data

    (stuck,) = _recipient_blocks(second)
    assert stuck["Final-Recipient"] == f"rfc822; {STUCK}"
    assert (stuck["Action"], stuck["Status"]) == ("failed", "4.3.2")
    assert stuck["Diagnostic-Code"] == f"smtp; {DEFER}"
    last_try = parsedate_to_datetime(str(stuck["Last-Attempt-Date"]))
    assert _near(last_try - sends[0].replace(tzinfo=last_try.tzinfo), timedelta(hours=87))
    assert "31 attempts over 87 h" in second.get_payload()[0].get_content()

    by = {r.address: r for r in result.recipients}
    assert f"failed report {result.queue_id}-DSN1" in (by[GONE].note or "")
    assert f"failed report {result.queue_id}-DSN2" in (by[STUCK].note or "")
    # The reports were delivered by their own workflows, and never reported on themselves.
    assert all(r.recipients[0].state == RecipientState.DELIVERED for r in dsn_results)
    assert report_history == []


async def test_null_sender_failure_is_discarded_without_report(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={GONE: fixed(REJECT)}) as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [GONE], mail_from="")
            result = await handle.result()
            reported = await activity_times(handle, "send_failure_report")
            assert not await _exists(ts_env.client, report_queue_id(result.queue_id, 1))
    assert reported == []
    assert sink.received == []
    assert result.recipients[0].state == RecipientState.FAILED
    assert "discarded: never report on a report" in (result.recipients[0].note or "")


async def test_notify_never_suppresses_only_that_recipient(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    other = "other@dest.test"
    scripts = {GONE: fixed(REJECT), other: fixed("550 5.1.1 no such user")}
    async with SmtpPeer(scripts=scripts) as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink)
        async with running_worker(ts_env.client, config) as queue:
            never = Recipient(address=GONE, notify=["NEVER"])
            alone = await submit(ts_env.client, config, queue, [never])
            alone_result = await alone.result()
            mixed = await submit(ts_env.client, config, queue, [never, Recipient(address=other)])
            await mixed.result()
            await _report_results(ts_env.client, mixed.id.removeprefix("msg-"), 1)
            assert not await _exists(ts_env.client, report_queue_id(alone_result.queue_id, 1))
    assert await activity_times(alone, "send_failure_report") == []
    assert "not reported: NOTIFY without FAILURE" in (alone_result.recipients[0].note or "")
    # Both failed in the same attempt; the report lists only the one that asked.
    assert len(sink.received) == 1
    (block,) = _recipient_blocks(_parse(sink.received[0].data))
    assert block["Final-Recipient"] == f"rfc822; {other}"


async def test_delay_warning_then_failure_report(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    quiet = "quiet@dest.test"  # NOTIFY=FAILURE only: no delay warning for this one
    async with SmtpPeer(default=fixed(DEFER)) as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(
            tmp_path, dest, sink, retry_delays="60", retry_count=10, delay_warning_after="4h"
        )
        async with running_worker(ts_env.client, config) as queue:
            rcpts = [Recipient(address=STUCK), Recipient(address=quiet, notify=["FAILURE"])]
            handle = await submit(ts_env.client, config, queue, rcpts)
            result = await handle.result()
            await keep_history(handle, "dsn_delay_warning")
            sends = await activity_times(handle)
            reported = await activity_times(handle, "send_failure_report")
            await _report_results(ts_env.client, result.queue_id, 2)

    assert len(sends) == 11
    assert len(reported) == 2
    # Exactly at delay_warning_after, not at the next attempt after it.
    assert _near(reported[0] - sends[0], timedelta(hours=4), timedelta(seconds=10))
    assert _near(reported[1] - sends[0], timedelta(hours=10), timedelta(minutes=1))
    warning, failure = (_parse(r.data) for r in sink.received)
    assert warning["Subject"] == "Delayed Mail (still being retried)"
    (delayed,) = _recipient_blocks(warning)
    assert delayed["Final-Recipient"] == f"rfc822; {STUCK}"
    assert (delayed["Action"], delayed["Status"]) == ("delayed", "4.3.2")
    until = parsedate_to_datetime(str(delayed["Will-Retry-Until"]))
    assert _near(until - sends[0].replace(tzinfo=until.tzinfo), timedelta(hours=10))
    assert failure["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = _recipient_blocks(failure)
    assert sorted(b["Final-Recipient"] for b in blocks) == [
        f"rfc822; {quiet}",
        f"rfc822; {STUCK}",
    ]
    assert {b["Action"] for b in blocks} == {"failed"}


async def test_report_that_fails_is_discarded_never_reported_on(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    bad_sender = fixed("550 5.1.1 <alice@sender.test>: no such sender")
    async with (
        SmtpPeer(scripts={GONE: fixed(REJECT)}) as dest,
        SmtpPeer(host="127.0.0.2", scripts={SENDER: bad_sender}) as sink,
    ):
        config = _config(tmp_path, dest, sink)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [GONE])
            result = await handle.result()
            (bounce,) = await _report_results(ts_env.client, result.queue_id, 1)
            bounce_handle = ts_env.client.get_workflow_handle(
                message_workflow_id(report_queue_id(result.queue_id, 1))
            )
            reported_on = await activity_times(bounce_handle, "send_failure_report")
            triple = report_queue_id(report_queue_id(result.queue_id, 1), 1)
            assert not await _exists(ts_env.client, triple)
    assert sink.received == []
    assert sink.rcpt_counts[SENDER] == 1
    assert bounce.mail_from == ""
    assert bounce.recipients[0].state == RecipientState.FAILED
    assert "discarded" in (bounce.recipients[0].note or "")
    assert reported_on == []


async def test_success_notify_gives_relayed_report_when_next_hop_lacks_dsn(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer() as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink)
        async with running_worker(ts_env.client, config) as queue:
            rcpts = [
                Recipient(address="ok@dest.test", notify=["SUCCESS", "FAILURE"]),
                Recipient(address="plain@dest.test"),
            ]
            handle = await submit(ts_env.client, config, queue, rcpts)
            result = await handle.result()
            await keep_history(handle, "dsn_relayed")
            await _report_results(ts_env.client, result.queue_id, 1)
    assert dest.delivered_to("ok@dest.test") == 1
    assert len(sink.received) == 1
    report = _parse(sink.received[0].data)
    assert report["Subject"] == "Successful Mail Delivery Report"
    (block,) = _recipient_blocks(report)
    assert block["Final-Recipient"] == "rfc822; ok@dest.test"
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")


async def test_retried_report_activity_queues_one_report(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer() as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink)
        spool = FsSpool(config.spool.path)
        queue_id = new_queue_id()
        spool.store(queue_id, MESSAGE)
        async with running_worker(ts_env.client, config) as queue:
            msg = DeliverInput(
                queue_id=queue_id,
                spool_key=queue_id,
                mail_from=SENDER,
                groups=plan_groups(config, [Recipient(address=GONE)]),
                size=len(MESSAGE),
                arrival=datetime.now(UTC),
            )
            gone = RecipientReport(
                address=GONE,
                transport="default",
                state=RecipientState.FAILED,
                code=550,
                enhanced="5.1.1",
                text=REJECT,
                attempts=1,
            )
            req = FailureReportRequest(message=msg, recipients=[gone], sequence=7)
            acts = ReportActivities(ts_env.client, config, spool)
            env = ActivityEnvironment()
            env.info = dataclasses.replace(env.info, task_queue=queue)
            first = await env.run(acts.send_failure_report, req)
            await ts_env.client.get_workflow_handle(message_workflow_id(first)).result()
            # A retry after the first try queued the report (its reply lost, say), even once
            # that report has been delivered and its workflow closed.
            second = await env.run(acts.send_failure_report, req)
            # The latest run of that id: a second one would deliver a second report.
            await ts_env.client.get_workflow_handle(message_workflow_id(second)).result()
    assert first == second == f"{queue_id}-DSN7"
    assert len(sink.received) == 1


@pytest.fixture
async def dns() -> Any:
    async with DnsServer({"example.test": "mx A 127.0.0.50\n"}) as server:
        yield server


@pytest.mark.parametrize(
    ("soft", "permanent", "enhanced"), [(False, True, "5.1.2"), (True, False, "4.1.2")]
)
async def test_soft_bounce_makes_dns_permanent_failures_temporary(
    dns: DnsServer, tmp_path: Path, soft: bool, permanent: bool, enhanced: str
) -> None:
    config = make_config(
        tmp_path,
        delivery={"soft_bounce": soft},
        transports={"default": {"destination": dns.destination()}},
    )
    result = await ActivityEnvironment().run(
        ResolveActivities(config).resolve_destination,
        ResolveRequest(transport="default", domain="nope.example.test"),
    )
    assert result.error is not None
    assert result.error.permanent is permanent
    assert result.error.enhanced == enhanced


async def test_max_age_ends_the_retries_early_with_a_report(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(default=fixed(DEFER)) as dest, SmtpPeer(host="127.0.0.2") as sink:
        config = _config(tmp_path, dest, sink, retry_delays="60", max_age="150m")
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [STUCK])
            result = await handle.result()
            sends = await activity_times(handle)
            reported = await activity_times(handle, "send_failure_report")
            await _report_results(ts_env.client, result.queue_id, 1)
    # 0, 60, 120, then the last wait is cut short so the final attempt is at max_age.
    offsets = _offsets(sends, sends[0])
    assert len(offsets) == 4
    for got, minutes in zip(offsets, [0, 60, 120, 150], strict=True):
        assert _near(got, timedelta(minutes=minutes))
    assert len(reported) == 1 and _near(reported[0] - sends[0], timedelta(minutes=150))
    assert "max_age 2 h 30 min reached" in (result.recipients[0].note or "")
    (block,) = _recipient_blocks(_parse(sink.received[0].data))
    assert (block["Action"], block["Status"]) == ("failed", "4.3.2")


def test_config_check_shows_the_limit_that_comes_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = tmp_path / "postflow.toml"
    toml.write_text(
        '[transports.default]\nmax_age = "5d"\n'
        '[transports.short]\nmax_age = "2d"\ndelay_warning_after = "4h"\n'
    )
    args = build_parser().parse_args(["--config", str(toml), "config", "check"])
    assert args.run(args, load_config(toml)) == 0
    out = capsys.readouterr().out
    assert "default: lookup-mx; 31 attempts, gives up 87 h 0 min after the first" in out
    assert "max_age 120 h 0 min (the retries end first)" in out
    assert "max_age 48 h 0 min comes first: gives up 48 h 0 min after arrival" in out
    assert "delay warning after 4 h 0 min" in out

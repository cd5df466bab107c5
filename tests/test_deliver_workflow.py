"""DeliverMessage on the time-skipping server against real SMTP peers on loopback."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from postflow.models import DeliveryReport, RecipientState
from tests.conftest import make_config, running_worker
from tests.helpers import MESSAGE, activity_times, submit
from tests.histories import keep_history
from tests.peers import SmtpPeer, defer_times, fixed


def _close(offsets: list[timedelta], minutes: list[int]) -> bool:
    slack = timedelta(seconds=2) * len(minutes)
    return len(offsets) == len(minutes) and all(
        timedelta(0) <= got - timedelta(minutes=want) <= slack
        for got, want in zip(offsets, minutes, strict=True)
    )


def _by_address(report: DeliveryReport) -> dict[str, object]:
    return {r.address: r for r in report.recipients}


async def test_deferred_three_times_then_delivered_on_schedule(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={"bob@dest.test": defer_times(3)}) as peer:
        config = make_config(
            tmp_path,
            transports={"default": {"destination": peer.destination, "retry_delays": "60,120,180"}},
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["bob@dest.test"])
            report = await handle.result()
            times = await activity_times(handle)
            await keep_history(handle, "deferred_then_delivered")
    bob = _by_address(report)["bob@dest.test"]
    assert bob.state == RecipientState.DELIVERED
    assert bob.attempts == 4
    # Each wait starts when the previous attempt ends: allow for the real SMTP time.
    assert _close([t - times[0] for t in times], [0, 60, 180, 360])
    assert len(peer.received) == 1
    assert peer.received[0].data == MESSAGE
    assert peer.rcpt_counts["bob@dest.test"] == 4


async def test_5xx_fails_at_once_without_waiting(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    script = {"gone@dest.test": fixed("550 5.1.1 <gone@dest.test>: user unknown")}
    async with SmtpPeer(scripts=script) as peer:
        config = make_config(
            tmp_path,
            transports={"default": {"destination": peer.destination, "on_give_up": "discard"}},
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["gone@dest.test"])
            report = await handle.result()
            times = await activity_times(handle)
            await keep_history(handle, "permanent_failure")
    gone = _by_address(report)["gone@dest.test"]
    assert gone.state == RecipientState.FAILED
    assert (gone.code, gone.enhanced, gone.stage) == (550, "5.1.1", "rcpt")
    assert gone.remote_ip == "127.0.0.1"
    assert "user unknown" in gone.text
    assert gone.attempts == 1
    assert len(times) == 1
    assert peer.received == []


async def test_gives_up_at_the_87_hour_mark(ts_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with SmtpPeer(default=fixed("451 4.3.2 System not accepting messages")) as peer:
        config = make_config(
            tmp_path,
            transports={
                "default": {
                    "destination": peer.destination,
                    "retry_delays": "60,120,180",
                    "retry_count": 30,
                    "on_give_up": "discard",
                }
            },
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["stuck@dest.test"])
            report = await handle.result()
            times = await activity_times(handle)
            await keep_history(handle, "give_up_after_87h")
    stuck = report.recipients[0]
    assert stuck.state == RecipientState.FAILED
    assert stuck.attempts == 31
    assert (stuck.code, stuck.enhanced) == (451, "4.3.2")
    assert "gave up after 31 attempts" in (stuck.note or "")
    assert "transport discards" in (stuck.note or "")
    assert len(times) == 31
    assert _close([times[-1] - times[0]], [87 * 60])
    assert not (tmp_path / "spool" / f"{report.queue_id}.eml").exists()


async def test_two_domains_one_delivers_one_defers(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with (
        SmtpPeer(host="127.0.0.2") as good,
        SmtpPeer(host="127.0.0.3", default=defer_times(1)) as slow,
    ):
        config = make_config(
            tmp_path,
            transports={
                "default": {"destination": good.destination},
                "slow": {"destination": slow.destination, "retry_delays": "30"},
            },
            routes=[{"domains": ["slow.test"], "transport": "slow"}],
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["ann@fast.test", "sam@slow.test"])
            report = await handle.result()
            await keep_history(handle, "two_domains")
    by = _by_address(report)
    assert by["ann@fast.test"].state == RecipientState.DELIVERED
    assert by["ann@fast.test"].attempts == 1
    assert by["sam@slow.test"].state == RecipientState.DELIVERED
    assert by["sam@slow.test"].attempts == 2
    assert good.delivered_to("ann@fast.test") == 1
    assert slow.delivered_to("sam@slow.test") == 1

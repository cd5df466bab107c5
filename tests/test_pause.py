"""Operator signals on DeliverMessage (pause, resume, retry_now, bounce, delete), on the
time-skipping server against real SMTP peers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from postflow import search
from postflow.config import Config
from postflow.models import DeliveryReport, RecipientState
from postflow.queue_ops import QueueError, signal_message
from postflow.signals import ControlSignal
from tests.conftest import make_config, running_worker
from tests.helpers import activity_times, submit
from tests.histories import keep_history
from tests.peers import SmtpPeer, defer_times, fixed

BOB = "bob@dest.test"


async def _status(handle: WorkflowHandle) -> DeliveryReport:
    return await handle.query("status", result_type=DeliveryReport)


async def _until(handle: WorkflowHandle, check: Callable[[DeliveryReport], bool]) -> DeliveryReport:
    """Polls the status query (real time: nothing here asks the server to skip)."""
    async with asyncio.timeout(10):
        while True:
            report = await _status(handle)
            if check(report):
                return report
            await asyncio.sleep(0.05)


def _attempted(n: int) -> Callable[[DeliveryReport], bool]:
    return lambda r: r.recipients[0].attempts == n and r.next_attempt_at is not None


async def _state(handle: WorkflowHandle) -> str | None:
    described = await handle.describe()
    return described.typed_search_attributes.get(search.DELIVERY_STATE)


async def _signal_times(handle: WorkflowHandle, name: str) -> list[datetime]:
    times = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            if event.workflow_execution_signaled_event_attributes.signal_name == name:
                times.append(event.event_time.ToDatetime())
    return times


def _deferring(peer: SmtpPeer, tmp_path: Path, **transport: object) -> Config:
    return make_config(
        tmp_path,
        transports={
            "default": {"destination": peer.destination, "retry_delays": "60", **transport}
        },
    )


async def test_pause_holds_through_hours_and_resume_after_due_goes_at_once(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={BOB: defer_times(1)}) as peer:
        config = _deferring(peer, tmp_path)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            await handle.signal("pause", ControlSignal(reason="maintenance"))
            held = await _until(handle, lambda r: r.paused)
            assert held.paused_by == ["message"]
            # Five hours: the 60-minute retry falls due during the pause and is held.
            await ts_env.sleep(timedelta(hours=5))
            during = await _status(handle)
            assert during.recipients[0].attempts == 1
            assert during.recipients[0].state == RecipientState.DEFERRED
            assert peer.rcpt_counts[BOB] == 1
            assert await _state(handle) == "paused"
            await handle.signal("resume", ControlSignal())
            report = await handle.result()
            times = await activity_times(handle)
            resumed = (await _signal_times(handle, "resume"))[0]
            await keep_history(handle, "pause_resume_after_due")
    bob = report.recipients[0]
    assert bob.state == RecipientState.DELIVERED
    assert bob.attempts == 2
    assert not report.paused
    assert times[1] - times[0] >= timedelta(hours=5)
    # At once, within the default resume jitter (30 s), not another hour later.
    assert timedelta(0) <= times[1] - resumed <= timedelta(seconds=32)
    assert peer.delivered_to(BOB) == 1


async def test_resume_before_due_keeps_the_remaining_wait(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={BOB: defer_times(1)}) as peer:
        config = _deferring(peer, tmp_path)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            await handle.signal("pause", ControlSignal())
            await _until(handle, lambda r: r.paused)
            # A flush while paused is not kept for later (postqueue -f and held mail).
            await handle.signal("retry_now", ControlSignal())
            await ts_env.sleep(timedelta(minutes=20))
            await handle.signal("resume", ControlSignal())
            await _until(handle, lambda r: not r.paused)
            assert await _state(handle) == "deferred"
            report = await handle.result()
            times = await activity_times(handle)
    assert report.recipients[0].attempts == 2
    # The original due time (60 min after attempt 1), not 20 or 80 minutes.
    assert timedelta(minutes=59) <= times[1] - times[0] <= timedelta(minutes=61)


class _GatedPeer:
    """An SMTP server whose DATA reply waits until the test opens the gate."""

    def __init__(self) -> None:
        self.in_data = asyncio.Event()
        self.gate = asyncio.Event()
        self.received: list[bytes] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data.set()
        await self.gate.wait()
        self.received.append(envelope.original_content or b"")
        return "250 2.0.0 Ok"

    async def __aenter__(self) -> _GatedPeer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SMTP(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_pause_during_an_smtp_session_lets_it_finish(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with _GatedPeer() as peer:
        config = make_config(
            tmp_path, transports={"default": {"destination": f"server:127.0.0.1:{peer.port}"}}
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await asyncio.wait_for(peer.in_data.wait(), 10)
            await handle.signal("pause", ControlSignal())
            held = await _until(handle, lambda r: r.paused)
            assert held.recipients[0].state == RecipientState.PENDING
            peer.gate.set()
            report = await handle.result()
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert report.recipients[0].attempts == 1
    assert len(peer.received) == 1


async def test_retry_now_skips_the_remaining_wait(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={BOB: defer_times(1)}) as peer:
        config = _deferring(peer, tmp_path)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            await signal_message(ts_env.client, handle.id.removeprefix("msg-"), "retry")
            report = await handle.result()
            times = await activity_times(handle)
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert report.recipients[0].attempts == 2
    assert times[1] - times[0] < timedelta(minutes=1)


async def _activity_names(handle: WorkflowHandle) -> list[str]:
    names = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names.append(event.activity_task_scheduled_event_attributes.activity_type.name)
    return names


@pytest.mark.parametrize(
    ("verb", "state", "final", "note", "reported"),
    [
        ("bounce", RecipientState.FAILED, "bounced", "bounced by operator", True),
        ("delete", RecipientState.DISCARDED, "discarded", "deleted by operator", False),
    ],
)
async def test_bounce_and_delete_end_a_deferred_message(
    ts_env: WorkflowEnvironment,
    tmp_path: Path,
    verb: str,
    state: RecipientState,
    final: str,
    note: str,
    reported: bool,
) -> None:
    async with SmtpPeer(scripts={BOB: fixed("451 4.3.2 Not now")}) as peer:
        config = _deferring(peer, tmp_path)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            # While paused too: bounce and delete do not wait for a resume.
            await handle.signal("pause", ControlSignal())
            await _until(handle, lambda r: r.paused)
            await signal_message(ts_env.client, handle.id.removeprefix("msg-"), verb)
            report = await handle.result()
            names = await _activity_names(handle)
            assert await _state(handle) == final
    bob = report.recipients[0]
    assert bob.state == state
    assert note in (bob.note or "")
    assert bob.attempts == 1
    assert names.count("send_message") == 1
    # Bounce gives failed recipients the transport's give-up action (a DSN); delete is silent.
    assert ("send_failure_report" in names) is reported
    assert not (tmp_path / "spool" / f"{report.queue_id}.eml").exists()


async def test_signals_after_completion_are_harmless(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer() as peer:
        config = make_config(tmp_path, transports={"default": {"destination": peer.destination}})
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            before = await handle.result()
            queue_id = before.queue_id
            for verb in ("pause", "resume", "retry", "bounce", "delete"):
                with pytest.raises(QueueError, match=r"no longer queued \(completed, delivered\)"):
                    await signal_message(ts_env.client, queue_id, verb)
            after = await handle.result()
            events = [e async for e in handle.fetch_history_events()]
    assert after == before
    assert after.recipients[0].state == RecipientState.DELIVERED
    # The cost budget: pause support adds nothing to a message delivered at once.
    tasks = [e for e in events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED]
    assert len(tasks) <= 3
    assert len(events) <= 20
    with pytest.raises(QueueError, match="no such message"):
        await signal_message(ts_env.client, "NOSUCHQUEUEID", "pause")


async def test_signals_in_any_order_and_scopes_release_only_their_own(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(scripts={BOB: defer_times(1)}) as peer:
        config = _deferring(peer, tmp_path)
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            await handle.signal("resume", ControlSignal())  # before any pause: nothing
            await handle.signal("pause", ControlSignal(scope="transport:default", epoch=5))
            await handle.signal("pause", ControlSignal(scope="transport:default", epoch=5))
            await handle.signal("pause", ControlSignal())
            await handle.signal("pause", ControlSignal(scope="domain:other.test", epoch=6))
            held = await _until(handle, lambda r: len(r.paused_by) == 2)
            assert held.paused_by == ["message", "transport:default"]
            await handle.signal("resume", ControlSignal(scope="transport:default", epoch=7))
            # A late copy of the old pause (epoch 5) must not hold it again.
            await handle.signal("pause", ControlSignal(scope="transport:default", epoch=5))
            after = await _until(handle, lambda r: r.paused_by == ["message"])
            await ts_env.sleep(timedelta(hours=2))
            assert (await _status(handle)).recipients[0].attempts == 1
            assert after.paused
            await handle.signal("resume", ControlSignal(jitter_seconds=0))
            report = await handle.result()
            times = await activity_times(handle)
            resumed = (await _signal_times(handle, "resume"))[-1]
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert report.recipients[0].attempts == 2
    assert timedelta(0) <= times[1] - resumed <= timedelta(seconds=2)


async def test_paused_time_does_not_count_toward_max_age(
    ts_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with SmtpPeer(default=fixed("451 4.3.2 Not now")) as peer:
        config = _deferring(peer, tmp_path, max_age="150m", on_give_up="discard")
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, [BOB])
            await _until(handle, _attempted(1))
            await handle.signal("pause", ControlSignal())
            await _until(handle, lambda r: r.paused)
            await ts_env.sleep(timedelta(hours=10))
            await handle.signal("resume", ControlSignal(jitter_seconds=0))
            report = await handle.result()
    bob = report.recipients[0]
    assert bob.state == RecipientState.FAILED
    # Attempts at 0, then (paused 10 h) 10, 11, 12 and 13 h: 3 h queued outside the pause
    # passes max_age. Counting the pause would have given up right after attempt 2.
    assert bob.attempts == 5
    assert any("max_age" in n for n in report.notes)

"""End to end on the time-skipping server: MX failover, DNS trouble retried, null MX.

DNS answers come from a real server on loopback (`lookup-mx:query=`), mail goes to real
aiosmtpd peers; what was tried is read back from the workflow's history.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from postflow.models import RecipientState, ResolveResult, SendResult
from tests.conftest import make_config, running_worker
from tests.dnsserver import DnsServer, Fault
from tests.helpers import MESSAGE, activity_times, submit
from tests.histories import keep_history
from tests.peers import SmtpPeer

ZONE = """
two     MX 20 mx2
two     MX 10 mx1
mx1     A 127.0.0.2
mx2     A 127.0.0.3
flaky   MX 10 mx2
null    MX 0 .
null    A 127.0.0.3
"""


@pytest.fixture
async def dns_srv() -> AsyncIterator[DnsServer]:
    async with DnsServer({"dest.test": ZONE}) as server:
        yield server


async def _results(handle: WorkflowHandle, client_env: WorkflowEnvironment) -> dict[str, list]:
    """Results of send_message (activity events) and resolve_destination (local activity
    markers), in history order, decoded as the workflow saw them."""
    converter = client_env.client.data_converter
    scheduled: dict[int, str] = {}
    found: dict[str, list] = {"send": [], "resolve": []}
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            attrs = event.activity_task_scheduled_event_attributes
            scheduled[event.event_id] = attrs.activity_type.name
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            done = event.activity_task_completed_event_attributes
            if scheduled.get(done.scheduled_event_id) == "send_message":
                found["send"] += await converter.decode(done.result.payloads, [SendResult])
        elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
            details = event.marker_recorded_event_attributes.details
            if "data" in details and "result" in details:
                # A local activity marker: the activity type is in `data`, the result apart.
                kind = (await converter.decode(details["data"].payloads, [dict]))[0]
                if kind.get("activity_type") == "resolve_destination":
                    result = await converter.decode(details["result"].payloads, [ResolveResult])
                    found["resolve"] += result
    return found


async def _refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_first_mx_refuses_second_mx_gets_the_message(
    ts_env: WorkflowEnvironment, tmp_path: Path, dns_srv: DnsServer
) -> None:
    async with SmtpPeer(host="127.0.0.3") as mx2:
        assert await _refused("127.0.0.2", mx2.port)  # the first MX: nothing listens there
        config = make_config(
            tmp_path,
            transports={"default": {"destination": dns_srv.destination(port=mx2.port)}},
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["bob@two.dest.test"])
            report = await handle.result()
            found = await _results(handle, ts_env)
            await keep_history(handle, "mx_failover")
    bob = report.recipients[0]
    assert bob.state == RecipientState.DELIVERED
    assert (bob.attempts, bob.remote_host, bob.remote_ip) == (1, "mx2.dest.test", "127.0.0.3")
    assert len(mx2.received) == 1 and mx2.received[0].data == MESSAGE
    (resolved,) = found["resolve"]
    assert [(h.preference, h.name) for h in resolved.hosts] == [
        (10, "mx1.dest.test"),
        (20, "mx2.dest.test"),
    ]
    (sent,) = found["send"]
    assert [(t.host, t.ip, t.port) for t in sent.tries] == [
        ("mx1.dest.test", "127.0.0.2", mx2.port),
        ("mx2.dest.test", "127.0.0.3", mx2.port),
    ]
    assert sent.tries[0].error and "connect" in sent.tries[0].error
    assert sent.tries[1].error is None


async def _busy_greeting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"421 4.3.2 mx1 busy, try another host\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    writer.close()


async def test_4xx_greeting_moves_on_to_the_next_mx(
    ts_env: WorkflowEnvironment, tmp_path: Path, dns_srv: DnsServer
) -> None:
    async with SmtpPeer(host="127.0.0.3") as mx2:
        busy = await asyncio.start_server(_busy_greeting, "127.0.0.2", mx2.port)
        config = make_config(
            tmp_path,
            transports={"default": {"destination": dns_srv.destination(port=mx2.port)}},
        )
        try:
            async with running_worker(ts_env.client, config) as queue:
                handle = await submit(ts_env.client, config, queue, ["bob@two.dest.test"])
                report = await handle.result()
                found = await _results(handle, ts_env)
        finally:
            busy.close()
            await busy.wait_closed()
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert mx2.delivered_to("bob@two.dest.test") == 1
    (sent,) = found["send"]
    assert [t.ip for t in sent.tries] == ["127.0.0.2", "127.0.0.3"]
    # The greeting was read (its text is the error), and the next MX was tried.
    assert sent.tries[0].error and "mx1 busy" in sent.tries[0].error


async def test_servfail_defers_and_the_retry_resolves_again(
    ts_env: WorkflowEnvironment, tmp_path: Path, dns_srv: DnsServer
) -> None:
    dns_srv.fail(Fault.SERVFAIL, "flaky.dest.test", "MX", times=1)
    async with SmtpPeer(host="127.0.0.3") as mx2:
        config = make_config(
            tmp_path,
            transports={
                "default": {
                    "destination": dns_srv.destination(port=mx2.port),
                    "retry_delays": "30",
                }
            },
        )
        async with running_worker(ts_env.client, config) as queue:
            handle = await submit(ts_env.client, config, queue, ["ann@flaky.dest.test"])
            report = await handle.result()
            found = await _results(handle, ts_env)
    ann = report.recipients[0]
    assert (ann.state, ann.attempts) == (RecipientState.DELIVERED, 2)
    first, second = found["resolve"]
    assert first.error is not None
    assert (first.error.permanent, first.error.enhanced) == (False, "4.4.3")
    assert "SERVFAIL" in first.error.text
    assert [h.name for h in second.hosts] == ["mx2.dest.test"]
    assert len(found["send"]) == 1
    assert len(dns_srv.asked("flaky.dest.test", "MX")) == 2
    assert mx2.delivered_to("ann@flaky.dest.test") == 1


async def test_null_mx_fails_at_once_and_sends_nothing(
    ts_env: WorkflowEnvironment, tmp_path: Path, dns_srv: DnsServer
) -> None:
    config = make_config(
        tmp_path,
        transports={"default": {"destination": dns_srv.destination(), "on_give_up": "discard"}},
    )
    async with running_worker(ts_env.client, config) as queue:
        handle = await submit(ts_env.client, config, queue, ["joe@null.dest.test"])
        report = await handle.result()
        sends = await activity_times(handle)
    joe = report.recipients[0]
    assert (joe.state, joe.enhanced, joe.stage, joe.attempts) == (
        RecipientState.FAILED,
        "5.1.10",
        "dns",
        1,
    )
    assert "null MX" in joe.text
    assert sends == []
    assert dns_srv.asked("null.dest.test", "A") == []

"""The prioritized queue on a dev server: reserved slots let urgent mail pass a full bulk queue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from postflow import search
from postflow.config import Config
from postflow.models import RecipientState
from starter.submit import Submitter
from tests.conftest import make_config
from tests.helpers import MESSAGE
from tests.histories import keep_history
from worker import build_workers

BULK_SENDER = "list@news.test"
CORP_SENDER = "ceo@corp.test"


class SlowPeer:
    """An aiosmtpd server on loopback that holds bulk mail in DATA until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.delivered: dict[str, float] = {}  # Message-ID -> when DATA was accepted
        self.port = 0
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if envelope.mail_from == BULK_SENDER:
            self.holding += 1
            try:
                # A slow receiving MTA: the session, and so the activity slot, stays busy.
                await asyncio.wait_for(self.release.wait(), 60)
            finally:
                self.holding -= 1
        data = envelope.original_content or b""
        start = data.find(b"Message-ID: ") + len(b"Message-ID: ")
        self.delivered[data[start : data.find(b"\r\n", start)].decode()] = time.monotonic()
        return "250 2.0.0 Ok"

    async def __aenter__(self) -> SlowPeer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, decode_data=False), "127.0.0.1", 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _config(tmp_path: Path, peer: SlowPeer, rules: list[dict[str, object]]) -> Config:
    return make_config(
        tmp_path,
        transports={"default": {"destination": f"server:127.0.0.1:{peer.port}", "tls": "none"}},
        worker={"max_concurrent_activities": 2, "priority_slots": 2},
        priority=rules,
    )


@asynccontextmanager
async def _workers(client: Client, config: Config) -> AsyncIterator[tuple[str, str]]:
    """Both queues as `postflow worker` serves them, under fresh names on the shared server."""
    bulk = f"test-{uuid.uuid4().hex[:10]}"
    priority = f"{bulk}-priority"
    async with AsyncExitStack() as stack:
        for worker in build_workers(client, config, [bulk, priority], priority_task_queue=priority):
            await stack.enter_async_context(worker)
        yield bulk, priority


def _message(n: str) -> bytes:
    return MESSAGE.replace(b"<t1@sender.test>", f"<{n}@sender.test>".encode())


async def _held_back(handles: list[WorkflowHandle]) -> int:
    """Bulk messages whose SMTP attempt is scheduled but waits for a free slot."""
    waiting = 0
    for handle in handles:
        desc = await handle.describe()
        states = [a.state for a in desc.raw_description.pending_activities]
        waiting += PendingActivityState.PENDING_ACTIVITY_STATE_SCHEDULED in states
    return waiting


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float = 20) -> None:
    """Polls: the server's view (pending activities) has no event to wait on."""
    for _ in range(int(seconds * 10)):
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not reached in {seconds} s")


def _queue_and_flag(desc: WorkflowExecutionDescription) -> tuple[str, bool | None]:
    return desc.task_queue, desc.typed_search_attributes.get(search.PRIORITY)


async def test_priority_mail_is_delivered_while_every_bulk_slot_is_held(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    async with SlowPeer() as peer:
        config = _config(tmp_path, peer, [{"sender_domains": ["corp.test"]}])
        async with _workers(client, config) as (bulk_queue, priority_queue):
            submitter = Submitter(
                client, config, task_queue=bulk_queue, priority_task_queue=priority_queue
            )
            bulk = [
                await submitter.enqueue(BULK_SENDER, ["reader@dest.test"], _message(f"b{i}"))
                for i in range(4)
            ]

            async def slots_full() -> bool:
                return peer.holding == 2 and await _held_back(bulk) == 2

            # Two sessions hold both bulk slots; two more attempts wait for a slot.
            await _until(slots_full)
            started = time.monotonic()
            urgent = await submitter.enqueue(CORP_SENDER, ["cfo@dest.test"], _message("urgent"))
            report = await asyncio.wait_for(urgent.result(), 10)
            took = peer.delivered["<urgent@sender.test>"] - started
            await keep_history(urgent, "priority_delivered")
            assert report.recipients[0].state == RecipientState.DELIVERED
            # It passed the bulk queue: the bulk mail is still held and still waiting.
            assert peer.holding == 2
            assert await _held_back(bulk) == 2
            assert not any(f"<b{i}@sender.test>" in peer.delivered for i in range(4))
            assert took < 3, f"priority message took {took:.2f} s"

            desc = await urgent.describe()
            assert _queue_and_flag(desc) == (priority_queue, True)
            assert desc.raw_description.workflow_execution_info.priority.priority_key == 1
            assert desc.raw_description.workflow_execution_info.priority.fairness_key == "corp.test"
            for handle in bulk:
                desc = await handle.describe()
                assert _queue_and_flag(desc) == (bulk_queue, False)
                assert desc.raw_description.workflow_execution_info.priority.priority_key == 0

            peer.release.set()
            reports = await asyncio.wait_for(asyncio.gather(*(h.result() for h in bulk)), 30)
    assert all(r.recipients[0].state == RecipientState.DELIVERED for r in reports)
    assert len(peer.delivered) == 5


async def test_the_decision_follows_the_rules_and_an_explicit_choice(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    async with SlowPeer() as peer:
        peer.release.set()
        rules = [{"header": "X-Priority", "match": "^1", "max_size": 10_000}]
        config = _config(tmp_path, peer, rules)
        async with _workers(client, config) as (bulk_queue, priority_queue):
            submitter = Submitter(
                client, config, task_queue=bulk_queue, priority_task_queue=priority_queue
            )
            flagged = _message("h1").replace(b"\r\n\r\n", b"\r\nX-Priority: 1\r\n\r\n", 1)
            cases = [
                (flagged, None, (priority_queue, True)),
                (flagged + (b"x" * 78 + b"\r\n") * 200, None, (bulk_queue, False)),  # too big
                (_message("h3"), None, (bulk_queue, False)),
                (_message("h4"), True, (priority_queue, True)),  # e.g. a prioritized one's DSN
                (flagged, False, (bulk_queue, False)),
            ]
            for data, choice, expected in cases:
                handle = await submitter.enqueue(
                    CORP_SENDER, ["cfo@dest.test"], data, priority=choice
                )
                report = await asyncio.wait_for(handle.result(), 10)
                assert report.recipients[0].state == RecipientState.DELIVERED, report
                assert _queue_and_flag(await handle.describe()) == expected

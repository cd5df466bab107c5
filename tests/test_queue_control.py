"""Scope pauses through QueueControl and the queue tools, on a dev server (real visibility).

Each test gets its own namespace, registered by `postflow setup`'s code, so a scope paused
here never holds another test's mail.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.control import ControlActivities
from postflow.config import Config
from postflow.constants import CONTROL_TASK_QUEUE
from postflow.models import DeliveryReport, RecipientState
from postflow.queue_cli import format_show, format_table
from postflow.queue_ops import (
    QueueRow,
    control_scope,
    control_state,
    list_queue,
    setup_cluster,
    show_message,
    signal_message,
)
from tests.conftest import make_config
from tests.helpers import submit
from tests.histories import keep_history
from tests.peers import SmtpPeer, defer_times
from worker import build_workers
from workflows.control import QueueControl

ROOT = Path(__file__).resolve().parent.parent


async def _namespace_client(env: WorkflowEnvironment) -> Client:
    target = env.client.service_client.config.target_host
    client = await Client.connect(
        target, namespace=f"pf-{uuid.uuid4().hex[:10]}", data_converter=pydantic_data_converter
    )
    first = await setup_cluster(client)
    again = await setup_cluster(client)
    assert first[0].endswith("registered (retention 3 days)")
    assert first[1].startswith("search attributes added: ")
    assert again == [f"namespace {client.namespace}: exists", "search attributes: all present"]
    return client


@asynccontextmanager
async def _control_worker(client: Client) -> AsyncIterator[None]:
    """QueueControl's worker, as `postflow worker` runs it, with a shorter settle time."""
    async with Worker(
        client,
        task_queue=CONTROL_TASK_QUEUE,
        workflows=[QueueControl],
        # The TTL of the scope cache is 1 s; visibility shows a start within 0.1 s here.
        activities=[ControlActivities(client, settle_seconds=1.3).fan_out],
    ):
        yield


@asynccontextmanager
async def _workers(client: Client, config: Config, queue: str) -> AsyncIterator[None]:
    """Message workers on `queue` and QueueControl's worker."""
    (messages,) = build_workers(client, config, task_queues=[queue])
    async with _control_worker(client), messages:
        yield


def _config(tmp_path: Path, client: Client, good: SmtpPeer, slow: SmtpPeer) -> Config:
    return make_config(
        tmp_path,
        temporal={
            "address": client.service_client.config.target_host,
            "namespace": client.namespace,
        },
        transports={
            "default": {"destination": good.destination},
            "slow": {"destination": slow.destination, "retry_delays": "60"},
        },
        routes=[{"domains": ["slow.test"], "transport": "slow"}],
    )


async def _rows_until(
    client: Client, check: Callable[[list[QueueRow]], bool], **filters: object
) -> list[QueueRow]:
    async with asyncio.timeout(15):
        while True:
            rows = await list_queue(client, **filters)  # type: ignore[arg-type]
            if check(rows):
                return rows
            await asyncio.sleep(0.1)


async def _status(handle: WorkflowHandle) -> DeliveryReport:
    return await handle.query("status", result_type=DeliveryReport)


async def test_transport_pause_holds_queued_and_new_mail_until_resumed(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = await _namespace_client(dev_env)
    async with SmtpPeer("127.0.0.2") as good, SmtpPeer("127.0.0.3") as slow:
        config = _config(tmp_path, client, good, slow)
        queue = f"test-{uuid.uuid4().hex[:10]}"
        # Queued while no delivery worker runs: started, never attempted.
        early = [await submit(client, config, queue, [f"q{i}@slow.test"]) for i in range(2)]
        async with _control_worker(client):
            paused = await control_scope(client, "pause", "transport:slow", reason="maint")
            assert (await control_state(client)).scopes.keys() == {"transport:slow"}
        assert paused is not None and paused.error is None
        assert paused.signalled == 2
        async with _workers(client, config, queue):
            # Arrives after the fan-out: the check before its first attempt holds it.
            late = await submit(client, config, queue, ["late@slow.test"])
            other = await submit(client, config, queue, ["ann@fast.test"])
            assert (await other.result()).recipients[0].state == RecipientState.DELIVERED
            held = [*early, late]
            rows = await _rows_until(
                client, lambda rows: len(rows) == 3, state="paused", transport="slow"
            )
            assert {r.queue_id for r in rows} == {h.id.removeprefix("msg-") for h in held}
            for handle in held:
                report = await _status(handle)
                assert report.paused_by == ["transport:slow"]
                assert report.recipients[0].attempts == 0
            # Also held by id: resuming the transport must leave this one paused.
            await signal_message(client, early[0].id.removeprefix("msg-"), "pause")
            assert slow.rcpt_counts.total() == 0

            resumed = await control_scope(client, "resume", "transport:slow")
            assert resumed is not None and resumed.signalled == 3
            for handle in held[1:]:
                report = await handle.result()
                assert report.recipients[0].state == RecipientState.DELIVERED
                assert report.recipients[0].attempts == 1
            still = await _status(early[0])
            assert still.paused_by == ["message"]
            assert still.recipients[0].attempts == 0
            await signal_message(client, early[0].id.removeprefix("msg-"), "resume")
            assert (await early[0].result()).recipients[0].state == RecipientState.DELIVERED
            assert (await control_state(client)).scopes == {}
    assert sorted(r for m in slow.received for r in m.rcpt_tos) == [
        "late@slow.test",
        "q0@slow.test",
        "q1@slow.test",
    ]


async def test_queue_show_search_and_flush(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    client = await _namespace_client(dev_env)
    async with SmtpPeer("127.0.0.2") as good, SmtpPeer("127.0.0.3", default=defer_times(1)) as slow:
        config = _config(tmp_path, client, good, slow)
        queue = f"test-{uuid.uuid4().hex[:10]}"
        async with _workers(client, config, queue):
            deferred = await submit(
                client, config, queue, ["sam@slow.test"], mail_from="carol@sender.test"
            )
            done = await submit(client, config, queue, ["ann@fast.test"])
            await done.result()
            sam_id = deferred.id.removeprefix("msg-")
            rows = await _rows_until(client, lambda rows: len(rows) == 1, state="deferred")
            sam = rows[0]
            assert sam.queue_id == sam_id
            assert (sam.sender, sam.recipients, sam.transports) == (
                "carol@sender.test",
                ["sam@slow.test"],
                ["slow"],
            )
            assert sam.attempts == 1
            assert sam.last_error == "451 4.7.1 Try again later (127.0.0.3)"
            assert sam.next_attempt_at is not None

            # Search attributes filter: sender, domain, transport, state (closed ones too).
            by_sender = await list_queue(client, mail_from="carol@sender.test")
            assert [r.queue_id for r in by_sender] == [sam_id]
            assert [r.queue_id for r in await list_queue(client, domain="slow.test")] == [sam_id]
            assert await list_queue(client, transport="default") == []
            delivered = await list_queue(client, state="delivered")
            assert [r.queue_id for r in delivered] == [done.id.removeprefix("msg-")]

            table = format_table(await list_queue(client))
            line = next(x for x in table.splitlines() if x.startswith(sam_id))
            for cell in ("carol@sender.test", "sam@slow.test", "slow", "deferred", "451 4.7.1"):
                assert cell in line
            assert table.endswith("-- 1 message(s)")

            view = await show_message(client, sam_id, "http://127.0.0.1:8233")
            text = format_show(view)
            assert f"/namespaces/{client.namespace}/workflows/msg-{sam_id}/" in text
            assert "last reply  451 4.7.1 Try again later (at rcpt)" in text
            assert "host tried  127.0.0.3 [127.0.0.3]" in text

            # The same through the `postflow` command, as an operator runs it.
            toml = tmp_path / "postflow.toml"
            toml.write_text(
                f'[temporal]\naddress = "{client.service_client.config.target_host}"\n'
                f'namespace = "{client.namespace}"\n'
                '[transports.default]\n[transports.slow]\ndestination = "server:127.0.0.3"\n'
            )
            listed = await _cli(toml, "queue", "--json", "--state", "deferred")
            assert [m["queue_id"] for m in json.loads(listed)["messages"]] == [sam_id]
            shown = await _cli(toml, "show", sam_id)
            assert "sam@slow.test  deferred  attempts 1  transport slow" in shown

            # postqueue -f for one transport: the deferred message goes now, not in an hour.
            flushed = await control_scope(client, "retry", "transport:slow")
            assert flushed is not None and flushed.signalled == 1
            report = await deferred.result()
    assert report.recipients[0].state == RecipientState.DELIVERED
    assert report.recipients[0].attempts == 2


async def _cli(config: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "postflow.cli",
        "--config",
        str(config),
        *args,
        cwd=ROOT,
        env={**os.environ, "POSTFLOW_LOG_LEVEL": "WARNING"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_queue_control_continues_as_new_and_keeps_its_scopes(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    from postflow.constants import CONTROL_WORKFLOW_ID
    from postflow.signals import ControlState

    client = await _namespace_client(dev_env)
    async with SmtpPeer("127.0.0.2") as good, SmtpPeer("127.0.0.3") as slow:
        config = _config(tmp_path, client, good, slow)
        async with _workers(client, config, f"test-{uuid.uuid4().hex[:10]}"):
            # A tiny history limit, so a few operations cross it.
            await client.start_workflow(
                QueueControl.run,
                ControlState(max_history=30),
                id=CONTROL_WORKFLOW_ID,
                task_queue=CONTROL_TASK_QUEUE,
            )
            first = (await client.get_workflow_handle(CONTROL_WORKFLOW_ID).describe()).run_id
            await control_scope(client, "pause", "domain:a.test")
            for _ in range(6):
                await control_scope(client, "retry", "all")
            described = await client.get_workflow_handle(CONTROL_WORKFLOW_ID).describe()
            state = await control_state(client)
            # The first run, which continued as new: QueueControl's own replay case.
            await keep_history(
                client.get_workflow_handle(CONTROL_WORKFLOW_ID, run_id=first), "queue_control"
            )
    assert described.run_id != first
    assert state is not None
    assert set(state.scopes) == {"domain:a.test"}
    assert state.max_history == 30
    assert len(state.finished) == 7


class _DevServer:
    """`postflow up`'s dev server (SQLite with WAL) as a process a test can restart."""

    def __init__(self, db: Path) -> None:
        from postflow.config import parse_config

        ports = [_free_port() for _ in range(2)]
        self.config = parse_config(
            {
                "temporal": {
                    "address": f"127.0.0.1:{ports[0]}",
                    "ui_port": ports[1],
                    "db_filename": str(db),
                }
            }
        )
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        from postflow.up import dev_server_command

        self._proc = await asyncio.create_subprocess_exec(
            *dev_server_command(self.config),
            "--headless",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            await self._proc.wait()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def client(self) -> Client:
        async with asyncio.timeout(60):
            while True:
                try:
                    return await Client.connect(
                        self.config.temporal.address, data_converter=pydantic_data_converter
                    )
                except RuntimeError:
                    await asyncio.sleep(0.3)

    async def __aenter__(self) -> _DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
async def test_scope_pause_survives_restarts(tmp_path: Path) -> None:
    """A paused transport holds mail across a restart of the worker and the dev server."""
    async with SmtpPeer("127.0.0.2") as good, SmtpPeer("127.0.0.3") as slow:
        async with _DevServer(tmp_path / "temporal.db") as server:
            client = await server.client()
            await setup_cluster(client)
            config = _config(tmp_path, client, good, slow)
            queue = f"test-{uuid.uuid4().hex[:10]}"
            async with _workers(client, config, queue):
                await control_scope(client, "pause", "transport:slow")
                before = await submit(client, config, queue, ["before@slow.test"])
                await _rows_until(client, lambda rows: len(rows) == 1, state="paused")
            await server.restart()
            client = await server.client()
            async with _workers(client, config, queue):
                after = await submit(client, config, queue, ["after@slow.test"])
                await _rows_until(client, lambda rows: len(rows) == 2, state="paused")
                assert slow.rcpt_counts.total() == 0
                assert (await control_state(client)).scopes.keys() == {"transport:slow"}
                await control_scope(client, "resume", "transport:slow")
                for handle in (before, after):
                    handle = client.get_workflow_handle(handle.id, result_type=DeliveryReport)
                    report = await handle.result()
                    assert report.recipients[0].state == RecipientState.DELIVERED
    assert slow.rcpt_counts.total() == 2

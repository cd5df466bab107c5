"""Postflow in this process on the time-skipping server: SMTP ingest → workflow → SMTP peer.

The ingest listens on loopback and queues on a worker's private task queue; the time-skipping
server lets hours of retry delays pass in a moment while everything else runs for real.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from postflow.config import Config
from postflow.constants import message_workflow_id
from postflow.models import DeliveryReport
from starter.ingest import start_ingest
from starter.submit import Submitter
from tests.conftest import make_config, running_worker
from tests.faults.client import Outcome, send_one
from tests.faults.stack import free_port

__all__ = ["Relay", "relay"]


@dataclass
class Relay:
    env: WorkflowEnvironment
    config: Config
    port: int

    def handle(self, queue_id: str) -> WorkflowHandle[Any, DeliveryReport]:
        return self.env.client.get_workflow_handle(
            message_workflow_id(queue_id), result_type=DeliveryReport
        )

    async def send(
        self, rcpt: str, data: bytes, *, message_id: str = "", mail_from: str = "s@src.test"
    ) -> Outcome:
        return await send_one("127.0.0.1", self.port, message_id, rcpt, data, mail_from=mail_from)

    async def result(self, queue_id: str) -> DeliveryReport:
        """The message's final report; retry delays are skipped while we wait."""
        async with self.env.time_skipping_unlocked():
            return await self.handle(queue_id).result()

    @property
    def spool(self) -> Path:
        return Path(self.config.spool.path)


@asynccontextmanager
async def relay(
    env: WorkflowEnvironment,
    workdir: Path,
    destination: str,
    *,
    smtp: dict[str, Any] | None = None,
    transport: dict[str, Any] | None = None,
) -> AsyncIterator[Relay]:
    port = free_port()
    config = make_config(
        workdir,
        ingest={"listen": f"127.0.0.1:{port}"},
        smtp={"helo_name": "postflow.test", "connect_timeout": "2s", **(smtp or {})},
        transports={"default": {"destination": destination, "tls": "none", **(transport or {})}},
    )
    async with running_worker(env.client, config) as queue:
        submitter = Submitter(env.client, config, task_queue=queue, priority_task_queue=queue)
        server = await start_ingest(submitter, config)
        try:
            yield Relay(env, config, port)
        finally:
            closing = server.close()  # asyncio.Server, or the ingest's own (async) close
            if inspect.isawaitable(closing):
                await closing

"""The throughput baseline: a workflow with one activity that sends the message with
aiosmtplib, nothing else. `python bench/baseline.py ADDRESS SINK_PORT` runs its worker."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import aiosmtplib
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

TASK_QUEUE = "baseline"


@activity.defn
async def baseline_send(args: list[str]) -> str:
    path, port, mail_from, rcpt = args
    data = await asyncio.to_thread(Path(path).read_bytes)
    await aiosmtplib.send(
        data, sender=mail_from, recipients=[rcpt], hostname="127.0.0.1", port=int(port),
        start_tls=False,
    )  # fmt: skip
    return "ok"


@workflow.defn
class BaselineSend:
    @workflow.run
    async def run(self, args: list[str]) -> str:
        return await workflow.execute_activity(
            baseline_send, args, start_to_close_timeout=timedelta(minutes=5)
        )


async def main(address: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client, task_queue=TASK_QUEUE, workflows=[BaselineSend], activities=[baseline_send],
        max_concurrent_activities=200,
    )  # fmt: skip
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

"""Pause and resume at scale: `postflow pause --all` / `resume --all` on N queued messages.

Starts its own dev server (SQLite + WAL, as `postflow up`) and a `postflow worker`, queues
N messages (default 10000) for a server that refuses connections (each is attempted once
and waits 60 minutes), then times `postflow pause --all` until it returns (every message
signalled) and until visibility shows every message `paused`, and the same for
`postflow resume --all` (back to `deferred`). Writes bench/results/pause.json.

    python bench/pause.py [--messages 10000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, free_port, machine, start_dev_server, start_postflow, write_result
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from postflow.config import load_config
from postflow.constants import message_workflow_id
from starter.submit import Submitter

MESSAGE = b"From: bench@sender.test\r\nTo: x@dest.test\r\nSubject: pause bench\r\n\r\nHello.\r\n"


async def count(client: Client, state: str) -> int:
    query = f'WorkflowType = "DeliverMessage" AND DeliveryState = "{state}"'
    return (await client.count_workflows(query)).count


async def wait_count(client: Client, state: str, n: int, limit: float) -> float:
    """Seconds until visibility shows `n` messages in `state`."""
    began = time.monotonic()
    while await count(client, state) < n:
        if time.monotonic() - began > limit:
            raise TimeoutError(f"{state}: {await count(client, state)} of {n} after {limit} s")
        await asyncio.sleep(0.2)
    return time.monotonic() - began


async def queue_messages(submitter: Submitter, n: int, concurrency: int) -> list[str]:
    todo = iter(range(n))
    ids: list[str] = []

    async def one() -> None:
        for i in todo:
            ids.append(await submitter.submit("bench@sender.test", [f"r{i}@dest.test"], MESSAGE))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return ids


def run_cli(config: Path, *args: str) -> tuple[float, str]:
    env = {**os.environ, "POSTFLOW_CONFIG": str(config), "POSTFLOW_LOG_LEVEL": "WARNING"}
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "postflow.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - began, done.stdout


async def events_per_message(client: Client, ids: list[str], sample: int = 20) -> int:
    most = 0
    for queue_id in random.Random(1).sample(ids, min(sample, len(ids))):
        handle = client.get_workflow_handle(message_workflow_id(queue_id))
        history = [e async for e in handle.fetch_history_events()]
        most = max(most, len(history))
        assert not any(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED for e in history)
    return most


async def operation(
    client: Client, config: Path, verb: str, state: str, n: int, procs: list
) -> dict:
    cpu0 = [p.cpu_seconds() for p in procs]
    seconds, out = run_cli(config, verb, "--all")
    signalled = int(m[1]) if (m := re.search(r"(\d+) queued message", out)) else -1
    settled = seconds + await wait_count(client, state, n, max(600, n))
    return {
        "command_seconds": round(seconds, 2),
        "signalled": signalled,
        "all_shown_seconds": round(settled, 2),
        "messages_per_second": round(n / settled, 1),
        "cpu_seconds": {
            p.name: round(p.cpu_seconds() - c, 2) for p, c in zip(procs, cpu0, strict=True)
        },
        "output": out.strip(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=50, help="parallel submissions")
    parser.add_argument("--output", default="pause")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="postflow-bench-"))
    port, ui, refused = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    config = work / "postflow.toml"
    config.write_text(
        f'[temporal]\naddress = "{address}"\n'
        f'[spool]\npath = "{work / "spool"}"\n'
        f'[smtp]\nhelo_name = "bench.test"\nconnect_timeout = "5s"\n'
        # Nothing listens there: every attempt is refused and waits an hour.
        f'[transports.default]\ndestination = "server:127.0.0.1:{refused}"\n'
        'retry_delays = "60"\non_give_up = "discard"\n'
    )
    server = start_dev_server(work, port, ui)
    worker = start_postflow("worker", config)
    result: dict = {"machine": machine(), "messages": args.messages}
    try:
        client = await Client.connect(address, data_converter=pydantic_data_converter)
        submitter = Submitter(client, load_config(config))
        began = time.monotonic()
        ids = await queue_messages(submitter, args.messages, args.concurrency)
        result["queue_seconds"] = round(time.monotonic() - began, 2)
        result["all_deferred_seconds"] = round(
            time.monotonic() - began + await wait_count(client, "deferred", args.messages, 3600),
            2,
        )
        print(f"{args.messages} messages queued and deferred", flush=True)
        procs = [worker, server]
        result["pause_all"] = await operation(
            client, config, "pause", "paused", args.messages, procs
        )
        print("pause --all:", result["pause_all"], flush=True)
        result["resume_all"] = await operation(
            client, config, "resume", "deferred", args.messages, procs
        )
        print("resume --all:", result["resume_all"], flush=True)
        result["history_events_per_message_after"] = await events_per_message(client, ids)
    finally:
        worker.stop()
        server.stop()
    path = write_result(args.output, result)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())

"""`postflow health worker|ingest`: the probes for container health checks; never changes state.

`ingest` passes when the configured listener answers SMTP with a 220 greeting. `worker`
passes when Temporal lists a poller from this host (or this worker's identity) on the
delivery task queue: the worker is connected and asking for work. A worker whose slots
are all busy stops polling for a while, so use `worker` for readiness, not liveness.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from postflow.config import Config

__all__ = ["add_health_command", "check_ingest", "check_worker"]


async def check_ingest(config: Config, seconds: float = 5) -> str:
    """The greeting, or raises OSError; a wildcard listen address is probed on loopback."""
    from postflow.destination import parse_host_port

    listen = parse_host_port(config.ingest.listen, 25)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(host, listen.port)
        try:
            greeting = (await reader.readline()).decode("ascii", "replace").strip()
            writer.write(b"QUIT\r\n")
            await writer.drain()
        finally:
            writer.close()
    if not greeting.startswith("220"):
        raise OSError(f"unexpected greeting {greeting!r}")
    return greeting


async def check_worker(config: Config, seconds: float = 10) -> str:
    """The identity of this host's poller on the delivery queue, or raises LookupError."""
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    from postflow.constants import TASK_QUEUE
    from postflow.temporal import connect

    async with asyncio.timeout(seconds):
        client = await connect(config)
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=TASK_QUEUE),
                task_queue_type=1,  # workflow tasks
            )
        )
    # Without `[worker] identity` the SDK names a worker `<pid>@<hostname>`.
    mine = {f"{config.worker.identity}/{TASK_QUEUE}"} if config.worker.identity else set()
    host = socket.gethostname()
    for poller in response.pollers:
        if poller.identity in mine or poller.identity.endswith(f"@{host}"):
            return poller.identity
    raise LookupError(f"no worker from {config.worker.identity or host} polls {TASK_QUEUE!r}")


def _run(args: argparse.Namespace, config: Config) -> int:
    probe = check_ingest if args.process == "ingest" else check_worker
    try:
        found = asyncio.run(probe(config))
    except Exception as exc:  # any failure at all means unhealthy
        print(f"postflow health {args.process}: unhealthy: {exc}", file=sys.stderr)
        return 1
    print(f"{args.process}: ok ({found})")
    return 0


def add_health_command(sub: Any) -> None:
    health = sub.add_parser("health", help="probe a worker or the ingest (container health check)")
    health.add_argument("process", choices=["worker", "ingest"])
    health.set_defaults(run=_run)

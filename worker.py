"""The worker process: wires activities to real objects and serves Postflow's task queues."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.control import ControlActivities, ScopeCache
from activities.report import ReportActivities
from activities.resolve import ResolveActivities
from activities.smtp import SmtpActivities
from activities.spool import SpoolActivities
from postflow.config import Config, load_config
from postflow.constants import CONTROL_TASK_QUEUE, PRIORITY_TASK_QUEUE, TASK_QUEUE
from postflow.spool import open_spool
from postflow.temporal import connect
from workflows.control import QueueControl
from workflows.deliver import DeliverMessage

__all__ = [
    "ALL_WORKFLOWS",
    "WORKFLOWS",
    "build_activities",
    "build_control_worker",
    "build_workers",
    "main",
    "run_worker",
]

log = logging.getLogger("postflow.worker")

WORKFLOWS: list[type] = [DeliverMessage]
# Every workflow type any Postflow worker runs: the replay test checks them all.
ALL_WORKFLOWS: list[type] = [*WORKFLOWS, QueueControl]


def build_activities(config: Config, client: Client) -> list[Any]:
    spool = open_spool(config.spool)
    resolve = ResolveActivities(config, scopes=ScopeCache(client))
    smtp = SmtpActivities(config, spool)
    spool_acts = SpoolActivities(spool)
    report = ReportActivities(client, config, spool)
    return [
        resolve.resolve_destination,
        smtp.send_message,
        spool_acts.remove_body,
        report.send_failure_report,
    ]


def build_workers(
    client: Client,
    config: Config,
    task_queues: Sequence[str] = (TASK_QUEUE, PRIORITY_TASK_QUEUE),
    *,
    priority_task_queue: str = PRIORITY_TASK_QUEUE,
) -> list[Worker]:
    """One Worker per task queue: the priority queue keeps slots bulk work cannot take.

    Each Worker has its own pollers and slot counts, and a message's activities run on its
    workflow's queue, so `[worker] priority_slots` are held for prioritized mail alone.
    """
    activities = build_activities(config, client)
    settings = config.worker
    workers = []
    for queue in task_queues:
        priority = queue == priority_task_queue
        workers.append(
            Worker(
                client,
                task_queue=queue,
                workflows=WORKFLOWS,
                activities=activities,
                identity=f"{settings.identity}/{queue}" if settings.identity else None,
                max_concurrent_activities=(
                    settings.priority_slots if priority else settings.max_concurrent_activities
                ),
                max_concurrent_workflow_tasks=(
                    settings.priority_slots if priority else settings.max_concurrent_workflow_tasks
                ),
                max_concurrent_local_activities=(
                    settings.priority_slots if priority else settings.max_concurrent_activities
                ),
                max_cached_workflows=settings.max_cached_workflows,
                graceful_shutdown_timeout=config.smtp.final_timeout,
                **_runner(config),
            )
        )
    return workers


def _runner(config: Config) -> dict[str, Any]:
    if config.worker.workflow_sandbox:
        return {}
    return {"workflow_runner": UnsandboxedWorkflowRunner()}


def build_control_worker(
    client: Client, config: Config, task_queue: str = CONTROL_TASK_QUEUE
) -> Worker:
    """QueueControl and its fan-out activity, on their own queue so bulk mail never delays them."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[QueueControl],
        activities=[ControlActivities(client).fan_out],
        identity=f"{config.worker.identity}/{task_queue}" if config.worker.identity else None,
    )


async def run_worker(config: Config, stop: asyncio.Event | None = None) -> None:
    client = await connect(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [*build_workers(client, config), build_control_worker(client, config)]
    log.info("worker serving %s on %s", [w.task_queue for w in workers], config.temporal.address)

    async def _serve(worker: Worker) -> None:
        try:
            await worker.run()
        finally:
            # A queue nobody serves (the priority queue, say) must not go unnoticed while
            # the others keep running: stop the whole process so its supervisor restarts it.
            if not stop.is_set():
                log.error("worker for %s stopped unexpectedly", worker.task_queue)
                stop.set()

    tasks = [asyncio.create_task(_serve(w)) for w in workers]
    await stop.wait()
    log.info("stopping: letting in-flight SMTP sessions finish")
    await asyncio.gather(*(w.shutdown() for w in workers))
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for error in results:
        if isinstance(error, BaseException):
            raise error


def main(config_path: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_worker(load_config(config_path)))


if __name__ == "__main__":
    main()

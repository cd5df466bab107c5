"""The orphan sweep: removes spool bodies that no workflow will ever read; never a young one.

A body is stored before its workflow starts (`Submitter`), so a crash between the two, or a
start that failed when the body could not be removed, leaves a body nobody owns. The sweep
asks Temporal about `msg-<key>` for every body older than the grace period: no such
workflow means an orphan; a workflow that completed normally has already delivered (its own
cleanup failed). Bodies of running workflows, and of workflows that failed or were
terminated (an operator may still reset them), are kept. Uses only the spool's `keys()` and
`delete()`, so it works for every spool backend.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from postflow.constants import message_workflow_id

__all__ = ["DEFAULT_GRACE", "SweepReport", "sweep_orphans"]

log = logging.getLogger("postflow.sweep")

# Longer than any submit takes between storing a body and starting its workflow (the
# client's own RPC retries give up after about 10 s), with a wide margin.
DEFAULT_GRACE = timedelta(minutes=10)
_CONCURRENCY = 20


@dataclass
class SweepReport:
    """What one sweep saw and did; keys are spool keys (= queue ids)."""

    examined: int = 0
    young: int = 0
    live: int = 0
    orphans: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    kept_closed: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def removed(self) -> list[str]:
        return [*self.orphans, *self.finished]

    def describe(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"{self.examined} bodies: {self.live} queued, {self.young} within the grace period, "
            f"{verb} {len(self.orphans)} orphan(s) and {len(self.finished)} of completed "
            f"workflows; {len(self.kept_closed)} kept for closed workflows, "
            f"{len(self.errors)} error(s)"
        ]
        lines += [f"kept {key}: workflow {status}" for key, status in self.kept_closed]
        lines += [f"error {key}: {why}" for key, why in self.errors]
        return "\n".join(lines)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _keys(spool: Any) -> list[tuple[str, float]]:
    """The spool's (key, mtime) pairs, whether `keys()` is sync or async."""
    found = await _maybe_await(spool.keys())
    if isinstance(found, AsyncIterable):
        return [item async for item in found]
    return list(found if isinstance(found, Iterable) else [])


async def _status(client: Client, key: str) -> WorkflowExecutionStatus | None:
    """The latest run's status of the message's workflow; None when there is none."""
    try:
        description = await client.get_workflow_handle(message_workflow_id(key)).describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise
    return description.status


async def sweep_orphans(
    client: Client,
    spool: Any,
    grace: timedelta = DEFAULT_GRACE,
    *,
    dry_run: bool = False,
    now: float | None = None,
) -> SweepReport:
    """Removes orphaned bodies older than `grace`; an unknown answer always keeps the body."""
    report = SweepReport(dry_run=dry_run)
    cutoff = (time.time() if now is None else now) - grace.total_seconds()
    limit = asyncio.Semaphore(_CONCURRENCY)

    async def _one(key: str, mtime: float) -> None:
        report.examined += 1
        if mtime > cutoff:
            report.young += 1
            return
        async with limit:
            try:
                status = await _status(client, key)
            except RPCError as err:
                report.errors.append((key, f"{err.status.name}: {err.message}"))
                return
            if status == WorkflowExecutionStatus.RUNNING:
                report.live += 1
                return
            if status is not None and status != WorkflowExecutionStatus.COMPLETED:
                report.kept_closed.append((key, status.name.lower()))
                return
            if not dry_run:
                try:
                    await _maybe_await(spool.delete(key))
                except OSError as exc:
                    report.errors.append((key, f"delete failed: {exc}"))
                    return
                why = "no workflow" if status is None else "workflow completed"
                log.info("sweep removed %s: %s", key, why)
            (report.orphans if status is None else report.finished).append(key)

    await asyncio.gather(*(_one(key, mtime) for key, mtime in await _keys(spool)))
    report.orphans.sort()
    report.finished.sort()
    return report


def parse_grace(text: str) -> timedelta:
    """`10m`, `1h`, `30s`, or a number of seconds (`0` in tests)."""
    from postflow.config import parse_duration

    value = parse_duration(int(text) if text.strip().isdigit() else text)
    if not isinstance(value, timedelta):
        raise ValueError(f"{text!r}: not a duration")
    return value


def run_sweep(config: Any, grace: str | None, *, dry_run: bool = False) -> int:
    """`postflow sweep`: one pass over the spool; exit 1 when some body could not be judged."""
    from postflow.spool import FsSpool
    from postflow.temporal import connect

    try:
        period = parse_grace(grace) if grace is not None else DEFAULT_GRACE
    except ValueError as exc:
        print(f"postflow sweep: --grace {grace!r}: {exc}")
        return 2

    async def _run() -> SweepReport:
        client = await connect(config)
        return await sweep_orphans(client, FsSpool(config.spool.path), period, dry_run=dry_run)

    report = asyncio.run(_run())
    print(report.describe())
    return 1 if report.errors else 0

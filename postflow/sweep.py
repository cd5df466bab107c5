"""The orphan sweep: removes spool bodies that no workflow will ever read; never a young one.

A body is stored before its workflow starts (`Submitter`), so a crash between the two, or a
start that failed when the body could not be removed, leaves a body nobody owns. The sweep
asks Temporal about `msg-<key>` for every body older than the grace period: no such
workflow means an orphan; a workflow that completed normally has already delivered (its own
cleanup failed). Bodies of running workflows, and of workflows that failed or were
terminated (an operator may still reset them), are kept. Bodies are listed and removed
through the spool's `akeys()` and `adelete()`, so every backend is swept; a directory spool
also loses the temp files of stores cut short by a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from postflow.constants import message_workflow_id
from postflow.spool import FsSpool, Spool, open_spool

if TYPE_CHECKING:
    from postflow.config import Config

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
    temp_files: list[str] = field(default_factory=list)
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
        if self.temp_files:
            lines.append(f"{verb} {len(self.temp_files)} half-written temp file(s)")
        lines += [f"kept {key}: workflow {status}" for key, status in self.kept_closed]
        lines += [f"error {key}: {why}" for key, why in self.errors]
        return "\n".join(lines)


async def _keys(spool: Spool) -> list[tuple[str, float]]:
    return [item async for item in spool.akeys()]


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
    spool: Spool,
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
                    await spool.adelete(key)
                except OSError as exc:
                    report.errors.append((key, f"delete failed: {exc}"))
                    return
                why = "no workflow" if status is None else "workflow completed"
                log.info("sweep removed %s: %s", key, why)
            (report.orphans if status is None else report.finished).append(key)

    await asyncio.gather(*(_one(key, mtime) for key, mtime in await _keys(spool)))
    if isinstance(spool, FsSpool):
        report.temp_files = await asyncio.to_thread(_stale_temps, spool, cutoff, dry_run)
    report.orphans.sort()
    report.finished.sort()
    return report


def _stale_temps(spool: FsSpool, cutoff: float, dry_run: bool) -> list[str]:
    """Temp files a process killed in the middle of a store left behind: a store takes
    milliseconds, so one older than the grace period will never be renamed into place."""
    removed = []
    for entry in sorted((spool.root / "tmp").glob("*")):
        try:
            if entry.stat().st_mtime > cutoff:
                continue
            if not dry_run:
                entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry.name)
        log.info("sweep removed half-written %s", entry.name)
    return removed


def parse_grace(text: str) -> timedelta:
    """`10m`, `1h`, `30s`, or a number of seconds; `0` (right after a crash, with nothing
    being submitted) judges every body."""
    from postflow.config import parse_duration

    text = text.strip()
    if text.isascii() and text.isdigit():
        return timedelta(seconds=int(text))
    value = parse_duration(text)
    assert isinstance(value, timedelta)
    return value


def run_sweep(config: Config, grace: str | None, *, dry_run: bool = False) -> int:
    """`postflow sweep`: one pass over the spool; exit 1 when some body could not be judged."""
    from postflow.temporal import connect

    try:
        period = parse_grace(grace) if grace is not None else DEFAULT_GRACE
    except ValueError as exc:
        print(f"postflow sweep: --grace {grace!r}: {exc}")
        return 2

    async def _run() -> SweepReport:
        client = await connect(config)
        spool = open_spool(config.spool)
        try:
            return await sweep_orphans(client, spool, period, dry_run=dry_run)
        finally:
            spool.close()

    report = asyncio.run(_run())
    print(report.describe())
    return 1 if report.errors else 0

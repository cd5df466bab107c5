"""Operator control I/O: fans a signal out to message workflows, and reads paused scopes.

`ControlActivities.fan_out` lists the running message workflows of a scope from visibility
and signals them page by page (never a server batch operation: the server runs only one
per namespace). `ScopeCache` answers "which paused scopes cover this transport and domain"
for the resolve step, asking QueueControl at most once per `SCOPE_TTL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import timedelta

from temporalio import activity
from temporalio.client import Client, WorkflowExecution
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from postflow.constants import CONTROL_WORKFLOW_ID
from postflow.signals import (
    ControlSignal,
    ControlState,
    FanOutRequest,
    FanOutResult,
    scope_applies,
    visibility_query,
)

__all__ = [
    "MAX_RESUME_SPREAD_SECONDS",
    "SCOPE_TTL_SECONDS",
    "SETTLE_SECONDS",
    "ControlActivities",
    "ScopeCache",
    "resume_spread",
]

log = logging.getLogger("postflow.control")

# How old a worker's copy of the paused scopes may be when a delivery attempt checks it.
SCOPE_TTL_SECONDS = 1.0
# A fan-out lists messages only this long after the scope changed: every check made after
# the listing then sees the change, and every message started before it (visibility shows
# a start within ~0.1 s) is in the listing. Together no message slips past a pause or
# stays held after a resume.
SETTLE_SECONDS = SCOPE_TTL_SECONDS + 1.5
# Resumed messages whose attempt is overdue start spread over this many seconds at most;
# about 100 a second below that, so one message resumes at once.
MAX_RESUME_SPREAD_SECONDS = 30.0
_QUERY_TIMEOUT = timedelta(seconds=3)


def resume_spread(count: int) -> float:
    return min(MAX_RESUME_SPREAD_SECONDS, count / 100.0)


class ScopeCache:
    """QueueControl's paused scopes as this worker last saw them (scope -> epoch)."""

    def __init__(
        self,
        client: Client,
        ttl: float = SCOPE_TTL_SECONDS,
        workflow_id: str = CONTROL_WORKFLOW_ID,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._workflow_id = workflow_id
        self._scopes: dict[str, int] = {}
        self._fetched: float | None = None
        self._warned: float | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> dict[str, int]:
        if self._fresh():
            return self._scopes
        async with self._lock:
            if self._fresh():
                return self._scopes
            # The age counts from before the query, so a slow answer is never taken as newer.
            sent = time.monotonic()
            handle = self._client.get_workflow_handle(self._workflow_id)
            try:
                state = await handle.query(
                    "state", result_type=ControlState, rpc_timeout=_QUERY_TIMEOUT
                )
                self._scopes = dict(state.scopes)
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    self._scopes = {}  # never paused anything on this namespace
                else:
                    # Fail open with what we knew: the fan-out has signalled every message
                    # that was running, so only mail arriving during the outage can slip.
                    self._warn(exc)
            except Exception as exc:
                self._warn(exc)
            self._fetched = sent
            return self._scopes

    async def covering(self, transport: str, domain: str) -> dict[str, int]:
        """The paused scopes that hold mail for this transport and recipient domain."""
        scopes = await self.current()
        return {s: e for s, e in scopes.items() if scope_applies(s, transport, domain)}

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._warned is None or now - self._warned > 60:
            self._warned = now
            log.warning(
                "paused scopes unavailable (is a worker serving postflow-control running?), "
                "using the last known %s: %s",
                sorted(self._scopes) or "(none)",
                exc,
            )

    def _fresh(self) -> bool:
        return self._fetched is not None and time.monotonic() - self._fetched < self._ttl


class ControlActivities:
    def __init__(
        self,
        client: Client,
        *,
        settle_seconds: float = SETTLE_SECONDS,
        page_size: int = 500,
        concurrency: int = 50,
    ) -> None:
        self._client = client
        self._settle_seconds = settle_seconds
        self._page_size = page_size
        self._concurrency = concurrency

    @activity.defn(name="fan_out_signal")
    async def fan_out(self, req: FanOutRequest) -> FanOutResult:
        """Signals every running message in the scope; resumes from its last page on retry."""
        began = time.monotonic()
        token, signalled, gone = _progress(activity.info().heartbeat_details)
        query = visibility_query(req.scope)
        if token is None and req.settle:
            await _sleep_heartbeating(self._settle_seconds)
        signal = ControlSignal(scope=req.scope, reason=req.reason, epoch=req.epoch)
        if req.signal == "resume":
            count = (await self._client.count_workflows(query)).count
            signal.jitter_seconds = resume_spread(count)
        iterator = self._client.list_workflows(
            query, page_size=self._page_size, next_page_token=token
        )
        limit = asyncio.Semaphore(self._concurrency)
        while True:
            try:
                await iterator.fetch_next_page()
            except RPCError as exc:
                if exc.status == RPCStatusCode.INVALID_ARGUMENT:
                    # Nothing a retry can mend (e.g. search attributes not registered).
                    raise ApplicationError(str(exc), non_retryable=True) from exc
                raise
            page = list(iterator.current_page or [])
            results = await asyncio.gather(
                *(self._signal(limit, wf, req.signal, signal) for wf in page)
            )
            signalled += sum(results)
            gone += len(results) - sum(results)
            next_token = iterator.next_page_token
            activity.heartbeat(_encode(next_token), signalled, gone)
            if next_token is None:
                break
        return FanOutResult(
            op_id=req.op_id,
            op=req.signal,
            scope=req.scope,
            signalled=signalled,
            gone=gone,
            seconds=round(time.monotonic() - began, 3),
        )

    async def _signal(
        self, limit: asyncio.Semaphore, wf: WorkflowExecution, name: str, signal: ControlSignal
    ) -> bool:
        async with limit:
            handle = self._client.get_workflow_handle(wf.id, run_id=wf.run_id)
            try:
                await handle.signal(name, signal)
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return False  # finished since the listing: nothing left to hold
                raise
            return True


async def _sleep_heartbeating(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        activity.heartbeat()
        await asyncio.sleep(min(left, 1.0))


def _encode(token: bytes | None) -> str | None:
    return base64.b64encode(token).decode() if token else None


def _progress(details: object) -> tuple[bytes | None, int, int]:
    """(next page token, signalled, gone) from the last heartbeat of an earlier attempt."""
    if not isinstance(details, list | tuple) or len(details) != 3:
        return None, 0, 0
    token, signalled, gone = details
    if not token:
        return None, 0, 0
    return base64.b64decode(token), int(signalled), int(gone)

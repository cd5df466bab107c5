"""`QueueControl`: the one long-running workflow that holds the paused scopes.

Signals `pause`/`resume`/`retry` change the scopes at once (the `state` query, read by every
delivery attempt through `ScopeCache`, shows them) and queue a fan-out of the matching
signal to the running message workflows, done one at a time by an activity. Being a
workflow, the scopes survive restarts of every process; it continues-as-new with its state
well before its history grows large.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.control import ControlActivities
    from postflow.signals import (
        ControlState,
        FanOutRequest,
        FanOutResult,
        ScopeError,
        ScopeRequest,
        parse_scope,
    )

__all__ = ["QueueControl"]

_KEEP_FINISHED = 20
# Signalling a message twice is harmless, so the fan-out retries until done: a pause
# the operator was told about must reach every message.
_FAN_OUT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=2), maximum_interval=timedelta(minutes=1)
)
_SIGNAL_FOR = {"pause": "pause", "resume": "resume", "retry": "retry_now"}


@workflow.defn
class QueueControl:
    @workflow.init
    def __init__(self, state: ControlState) -> None:
        self._state = state

    @workflow.signal
    def pause(self, req: ScopeRequest) -> None:
        self._accept("pause", req)

    @workflow.signal
    def resume(self, req: ScopeRequest) -> None:
        self._accept("resume", req)

    @workflow.signal
    def retry(self, req: ScopeRequest) -> None:
        self._accept("retry", req)

    @workflow.query
    def state(self) -> ControlState:
        return self._state

    @workflow.run
    async def run(self, state: ControlState) -> None:
        self._show()
        while True:
            await workflow.wait_condition(lambda: bool(self._state.pending) or self._history_full())
            if self._state.pending:
                await self._fan_out(self._state.pending[0])
                self._state.pending.pop(0)
                self._show()
            if self._history_full():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(self._state)

    def _accept(self, op: str, req: ScopeRequest) -> None:
        """Changes the scopes now; the fan-out to running messages follows in order."""
        try:
            scope = parse_scope(req.scope)
        except ScopeError as exc:
            workflow.logger.warning("ignored %s: %s", op, exc)
            return
        now = workflow.now()
        # Milliseconds of workflow time, never repeating: a QueueControl started afresh
        # still stamps later changes above whatever a message has seen.
        epoch = max(self._state.epoch + 1, int(now.timestamp() * 1000))
        self._state.epoch = epoch
        if op == "pause":
            self._state.scopes[scope] = epoch
            self._state.paused_at.setdefault(scope, now)
        elif op == "resume":
            self._state.scopes.pop(scope, None)
            self._state.paused_at.pop(scope, None)
        self._state.pending.append(
            req.model_copy(update={"op": op, "scope": scope, "epoch": epoch})
        )
        self._show()

    async def _fan_out(self, req: ScopeRequest) -> None:
        fan_out = FanOutRequest(
            signal=_SIGNAL_FOR[req.op],
            scope=req.scope,
            op_id=req.op_id,
            epoch=req.epoch,
            reason=req.reason,
            settle=req.op != "retry",
        )
        try:
            result = await workflow.execute_activity_method(
                ControlActivities.fan_out,
                fan_out,
                start_to_close_timeout=timedelta(hours=2),
                heartbeat_timeout=timedelta(minutes=1),
                retry_policy=_FAN_OUT_RETRY,
                summary=f"{req.op} {req.scope}",
            )
        except ActivityError as err:
            result = FanOutResult(error=str(err.cause or err))
        result.op_id, result.op, result.scope = req.op_id, req.op, req.scope
        result.finished_at = workflow.now()
        self._state.finished = [*self._state.finished, result][-_KEEP_FINISHED:]

    def _history_full(self) -> bool:
        info = workflow.info()
        return (
            info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= self._state.max_history
        )

    def _show(self) -> None:
        """The Web UI's "current details": what is paused and what is still being signalled."""
        lines = [f"paused: {scope}" for scope in sorted(self._state.scopes)] or ["nothing paused"]
        lines += [f"signalling: {r.op} {r.scope}" for r in self._state.pending]
        workflow.set_current_details("\n".join(lines))

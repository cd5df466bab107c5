"""`DeliverMessage`: schedules the delivery of one queued message; never does I/O itself.

Like Postfix's qmgr it decides when to try and when to give up; activities resolve, send
and report. One delivery loop runs per (transport, domain) group, concurrently.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.report import ReportActivities
    from activities.resolve import ResolveActivities
    from activities.smtp import SmtpActivities
    from activities.spool import SpoolActivities
    from postflow import search
    from postflow.dsn import notify_set
    from postflow.models import (
        DeliverInput,
        DeliveryError,
        DeliveryGroup,
        DeliveryReport,
        FailureReportRequest,
        RecipientOutcome,
        RecipientReport,
        RecipientState,
        ResolveRequest,
        ResolveResult,
        SendRequest,
    )
    from postflow.schedule import format_minutes
    from postflow.signals import ControlSignal, scope_matches

__all__ = ["DeliverMessage"]

# Temporal retries the send activity only when a worker is lost or the activity breaks;
# SMTP answers are returned as data and follow the transport's own schedule.
_SEND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=5),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=2),
    maximum_attempts=4,
)
_LOCAL_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3)
# Resumed groups whose retry fell due during the pause start within this spread, so a
# server back from maintenance is not hit by the whole backlog in the same second.
_RESUME_JITTER_SECONDS = 30.0


@dataclass
class _Group:
    spec: DeliveryGroup
    index: int
    attempts: int = 0
    next_attempt_at: datetime | None = None
    reports: dict[str, RecipientReport] = field(default_factory=dict)
    # Whether the last next hop announced DSN: it then reports NOTIFY=SUCCESS itself.
    dsn_announced: bool = False
    # The retry_now count when this group's wait began: a higher count means "go now".
    retry_seen: int = 0

    def pending(self) -> list[str]:
        return [
            a
            for a, r in self.reports.items()
            if r.state in (RecipientState.PENDING, RecipientState.DEFERRED)
        ]


@workflow.defn
class DeliverMessage:
    @workflow.init
    def __init__(self, msg: DeliverInput) -> None:
        self._msg = msg
        self._groups = [
            _Group(
                spec=g,
                index=i,
                reports={
                    r.address: RecipientReport(address=r.address, transport=g.transport)
                    for r in g.recipients
                },
            )
            for i, g in enumerate(msg.groups)
        ]
        self._paused_scopes: set[str] = set()
        # Epochs of the newest scope pause and resume seen, so stale signals are ignored.
        self._pause_epochs: dict[str, int] = {}
        self._resume_epochs: dict[str, int] = {}
        self._resume_jitter: float | None = None
        self._paused_since: datetime | None = None
        self._paused_total = timedelta()
        self._retry_generation = 0
        self._stop: str | None = None  # "bounce" or "delete"
        self._notes: list[str] = []
        self._done = False
        self._reports_sent = 0  # numbers each report, which names its queue id

    # ---- operator controls (signals and the status query) -------------------------------

    @workflow.signal
    def pause(self, sig: ControlSignal) -> None:
        if self._done or (sig.epoch and sig.epoch <= self._resume_epochs.get(sig.scope, 0)):
            return  # finished, or a late pause that a newer resume already undid
        if not any(scope_matches(sig.scope, g.spec) for g in self._groups):
            return  # a scope that covers none of this message's recipients
        self._hold_scope(sig.scope, sig.epoch)

    @workflow.signal
    def resume(self, sig: ControlSignal) -> None:
        if sig.epoch:
            if sig.epoch < self._pause_epochs.get(sig.scope, 0):
                return  # older than the pause in force
            self._resume_epochs[sig.scope] = max(sig.epoch, self._resume_epochs.get(sig.scope, 0))
        if sig.scope not in self._paused_scopes:
            return
        self._paused_scopes.discard(sig.scope)
        self._resume_jitter = sig.jitter_seconds
        if not self._paused_scopes and self._paused_since is not None:
            self._paused_total += workflow.now() - self._paused_since
            self._paused_since = None

    @workflow.signal
    def retry_now(self, sig: ControlSignal) -> None:
        self._retry_generation += 1

    @workflow.signal
    def bounce(self, sig: ControlSignal) -> None:
        if not self._done:
            self._stop = self._stop or "bounce"

    @workflow.signal
    def delete(self, sig: ControlSignal) -> None:
        if not self._done:
            self._stop = "delete"

    def _hold_scope(self, scope: str, epoch: int) -> None:
        if not self._paused_scopes:
            self._paused_since = workflow.now()
        self._paused_scopes.add(scope)
        self._pause_epochs[scope] = max(epoch, self._pause_epochs.get(scope, 0))

    @workflow.query
    def status(self) -> DeliveryReport:
        return self._report()

    # ---- the message ----------------------------------------------------------------------

    @workflow.run
    async def run(self, msg: DeliverInput) -> DeliveryReport:
        await asyncio.gather(
            *(self._deliver_group(g) for g in self._groups), self._warn_when_delayed()
        )
        self._done = True
        await workflow.execute_local_activity_method(
            SpoolActivities.remove_body,
            msg.spool_key,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=_LOCAL_RETRY,
        )
        workflow.upsert_search_attributes(
            [
                search.DELIVERY_STATE.value_set(self._final_state()),
                search.ATTEMPTS.value_set(max(g.attempts for g in self._groups)),
            ]
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._report()

    async def _deliver_group(self, group: _Group) -> None:
        spec = group.spec
        while group.pending():
            await self._wait_for_turn(group)
            if self._stop:
                await self._settle_stopped(group)
                return
            resolved = await self._resolve(group)
            if self._held(group, resolved):
                continue
            group.attempts += 1
            group.next_attempt_at = None
            if group.attempts > 1:
                workflow.upsert_search_attributes(
                    [
                        search.DELIVERY_STATE.value_set("sending"),
                        search.ATTEMPTS.value_set(group.attempts),
                    ]
                )
            outcomes = await self._attempt(group, resolved)
            failed_now = self._apply(group, outcomes)
            if failed_now:
                await self._report_failures(group, failed_now, gave_up=False)
            await self._report_success(group, outcomes)
            if not group.pending():
                return
            delay = spec.schedule.delay_after(group.attempts)
            why = ""
            if delay is not None and self._past_max_age(spec):
                age = timedelta(seconds=spec.max_age_seconds or 0)
                why = f"max_age {format_minutes(age)} reached"
                self._notes.append(f"{spec.domain}: {why} after {group.attempts} attempts")
                delay = None
            if delay is None:
                await self._give_up(group, why)
                return
            delay = self._within_max_age(spec, delay)
            group.next_attempt_at = workflow.now() + delay
            workflow.upsert_search_attributes(
                [
                    search.DELIVERY_STATE.value_set("deferred"),
                    search.ATTEMPTS.value_set(group.attempts),
                    search.NEXT_ATTEMPT_AT.value_set(group.next_attempt_at),
                ]
            )

    async def _resolve(self, group: _Group) -> ResolveResult:
        """Where to deliver, and (in the same local activity) the paused scopes covering it."""
        spec = group.spec
        return await workflow.execute_local_activity_method(
            ResolveActivities.resolve_destination,
            ResolveRequest(transport=spec.transport, domain=spec.domain),
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=_LOCAL_RETRY,
            summary=f"resolve {spec.domain} via {spec.transport}",
        )

    def _held(self, group: _Group, resolved: ResolveResult) -> bool:
        """Applies the scope check made just before connecting: True when the group waits.

        A message started while QueueControl was still signalling is held here; a check
        older than a resume this message has already received is ignored by its epoch.
        """
        for scope, epoch in resolved.paused_scopes.items():
            if epoch > self._resume_epochs.get(scope, 0):
                self._hold_scope(scope, epoch)
        return self._stop is not None or self._group_paused(group)

    async def _attempt(self, group: _Group, resolved: ResolveResult) -> list[RecipientOutcome]:
        spec, pending = group.spec, group.pending()
        if resolved.error is not None:
            return [_from_error(a, resolved.error, "dns") for a in pending]
        first = resolved.hosts[0].name if resolved.hosts else spec.domain
        rcpts = [r for r in spec.recipients if r.address in pending]
        try:
            result = await workflow.execute_activity_method(
                SmtpActivities.send_message,
                SendRequest(
                    queue_id=self._msg.queue_id,
                    spool_key=self._msg.spool_key,
                    transport=spec.transport,
                    domain=spec.domain,
                    mail_from=self._msg.mail_from,
                    recipients=rcpts,
                    hosts=resolved.hosts,
                    attempt=group.attempts,
                    size=self._msg.size,
                    ret=self._msg.ret,
                    envid=self._msg.envid,
                    smtputf8=self._msg.smtputf8,
                    body_8bit=self._msg.body_8bit,
                ),
                start_to_close_timeout=timedelta(minutes=30),
                heartbeat_timeout=timedelta(seconds=20),
                retry_policy=_SEND_RETRY,
                summary=f"attempt {group.attempts} to {first}",
            )
        except ActivityError as err:
            # The activity broke or its worker was lost repeatedly: a temporary problem on
            # our side, which must not cost the message; it waits like any deferral.
            cause = err.cause or err
            error = DeliveryError(permanent=False, enhanced="4.3.0", text=f"internal: {cause}")
            return [_from_error(a, error, "internal") for a in pending]
        group.dsn_announced = result.dsn_announced
        return result.recipients

    def _apply(self, group: _Group, outcomes: list[RecipientOutcome]) -> list[str]:
        """Records this attempt's outcomes; returns the recipients that failed permanently."""
        now = workflow.now()
        failed: list[str] = []
        for out in outcomes:
            report = group.reports.get(out.address)
            if report is None or report.state not in (
                RecipientState.PENDING,
                RecipientState.DEFERRED,
            ):
                continue
            report.state = out.state
            report.code, report.enhanced, report.text = out.code, out.enhanced, out.text
            report.remote_host, report.remote_ip, report.stage = (
                out.remote_host,
                out.remote_ip,
                out.stage,
            )
            report.attempts = group.attempts
            report.last_attempt_at = now
            if out.state == RecipientState.FAILED:
                failed.append(out.address)
        return failed

    async def _give_up(self, group: _Group, why: str = "") -> None:
        gave_up = group.pending()
        for address in gave_up:
            report = group.reports[address]
            report.state = RecipientState.FAILED
            report.note = f"gave up after {group.attempts} attempts" + (f" ({why})" if why else "")
        await self._report_failures(group, gave_up, gave_up=True)

    async def _settle_stopped(self, group: _Group) -> None:
        """Deleted recipients are discarded silently; bounced ones get the give-up action."""
        stopped = group.pending()
        for address in stopped:
            report = group.reports[address]
            if self._stop == "delete":
                report.state = RecipientState.DISCARDED
                report.note = "deleted by operator"
            else:
                report.state = RecipientState.FAILED
                report.note = "bounced by operator"
        if self._stop == "bounce" and stopped:
            await self._report_failures(group, stopped, gave_up=True)

    async def _report_failures(self, group: _Group, addresses: list[str], gave_up: bool) -> None:
        """The transport's give-up action for recipients that just failed for good."""
        spec = group.spec
        if spec.on_give_up == "discard" or not self._msg.mail_from or self._msg.is_report:
            why = (
                "transport discards"
                if spec.on_give_up == "discard"
                else "discarded: never report on a report or a null-sender message"
            )
            for address in addresses:
                group.reports[address].note = _join(group.reports[address].note, why)
            return
        wanted = [a for a in addresses if "FAILURE" in self._notify(spec, a)]
        for address in addresses:
            if address not in wanted:
                report = group.reports[address]
                report.note = _join(report.note, "not reported: NOTIFY without FAILURE")
        if wanted:
            await self._send_report([group.reports[a] for a in wanted], "failed", gave_up)

    async def _report_success(self, group: _Group, outcomes: list[RecipientOutcome]) -> None:
        """NOTIFY=SUCCESS (RFC 3461 §6.2): a next hop that announced DSN was handed the
        request and reports delivery itself; for one that did not, we report `relayed`."""
        if not self._msg.mail_from or self._msg.is_report:
            return
        asked = [
            o.address
            for o in outcomes
            if o.state == RecipientState.DELIVERED
            and o.address in group.reports
            and "SUCCESS" in self._notify(group.spec, o.address)
        ]
        if not asked:
            return
        if group.dsn_announced:
            for address in asked:
                report = group.reports[address]
                report.note = _join(report.note, "NOTIFY=SUCCESS passed on to the next hop")
            return
        await self._send_report([group.reports[a] for a in asked], "relayed")

    async def _warn_when_delayed(self) -> None:
        """One `delayed` report per message once a transport's delay_warning_after passed."""
        limits = [s for g in self._groups if (s := g.spec.delay_warning_seconds)]
        if not limits or not self._msg.mail_from or self._msg.is_report:
            return
        first = timedelta(seconds=min(limits))
        remaining = self._queued_since() + first - workflow.now()
        if remaining > timedelta(0):
            try:
                await workflow.wait_condition(
                    lambda: not any(g.pending() for g in self._groups),
                    timeout=remaining,
                    timeout_summary=f"delay warning after {format_minutes(first)}",
                )
                return
            except TimeoutError:
                pass
        age = workflow.now() - self._queued_since()
        reports: list[RecipientReport] = []
        until: dict[str, datetime] = {}
        for group in self._groups:
            limit = group.spec.delay_warning_seconds
            if not limit or age < timedelta(seconds=limit):
                continue
            for address in group.pending():
                if "DELAY" in self._notify(group.spec, address):
                    reports.append(group.reports[address])
                    until[address] = self._retry_until(group.spec)
        if reports:
            await self._send_report(reports, "delayed", retry_until=until)

    async def _send_report(
        self,
        reports: list[RecipientReport],
        action: str,
        gave_up: bool = False,
        retry_until: dict[str, datetime] | None = None,
    ) -> None:
        """Queues one delivery status notification; only addresses and replies pass here,
        the activity reads the original from the spool itself."""
        self._reports_sent += 1
        request = FailureReportRequest(
            message=self._msg,
            recipients=reports,
            gave_up=gave_up,
            action=action,
            sequence=self._reports_sent,
            created_at=workflow.now(),
            queued_since=self._queued_since(),
            retry_until=retry_until or {},
        )
        try:
            queue_id = await workflow.execute_activity_method(
                ReportActivities.send_failure_report,
                request,
                start_to_close_timeout=timedelta(minutes=2),
                retry_policy=RetryPolicy(maximum_interval=timedelta(minutes=5)),
                summary=f"{action} report on {len(reports)} recipient(s) to {self._msg.mail_from}",
            )
        except ActivityError as err:
            # Only a non-retryable error ends up here; the delivery itself goes on.
            self._notes.append(f"{action} report not sent: {err.cause or err}")
            return
        if queue_id is None:
            return
        for report in reports:
            report.note = _join(report.note, f"{action} report {queue_id}")
        self._notes.append(f"{action} report {queue_id} on {len(reports)} recipient(s)")

    def _notify(self, spec: DeliveryGroup, address: str) -> frozenset[str]:
        return notify_set(next((r for r in spec.recipients if r.address == address), None))

    # ---- waiting ------------------------------------------------------------------------

    def _group_paused(self, group: _Group) -> bool:
        return any(scope_matches(s, group.spec) for s in self._paused_scopes)

    async def _wait_for_turn(self, group: _Group) -> None:
        """Returns when the group may attempt: due, not paused, or told to stop or retry."""
        group.retry_seen = self._retry_generation
        was_paused = False
        while not self._stop:
            if self._group_paused(group):
                was_paused = True
                self._show_state("paused")
                await workflow.wait_condition(
                    lambda: self._stop is not None or not self._group_paused(group)
                )
                if self._stop is None and not any(self._group_paused(g) for g in self._groups):
                    self._show_state("deferred" if group.attempts else "queued")
                # Like `postqueue -f` and held mail: a flush during the pause is not kept.
                group.retry_seen = self._retry_generation
                continue
            if group.retry_seen != self._retry_generation:
                return
            due = group.next_attempt_at
            remaining = due - workflow.now() if due is not None else timedelta(0)
            if remaining <= timedelta(0):
                # Held past its due time: go soon, but not all at once with the others.
                if was_paused and await self._resume_jitter_wait(group):
                    continue  # paused again or stopped meanwhile
                return
            last = group.reports[group.pending()[0]]
            why = f"{last.code} {last.enhanced}" if last.code else (last.enhanced or "")
            try:
                await workflow.wait_condition(
                    lambda: (
                        self._stop is not None
                        or self._group_paused(group)
                        or group.retry_seen != self._retry_generation
                    ),
                    timeout=remaining,
                    timeout_summary=(
                        f"retry {group.attempts + 1} in {_minutes(remaining)} after {why}"
                    ).strip(),
                )
            except TimeoutError:
                if not self._group_paused(group):
                    return

    async def _resume_jitter_wait(self, group: _Group) -> bool:
        """Waits a random part of the resume's spread; True if paused or stopped meanwhile."""
        spread = _RESUME_JITTER_SECONDS if self._resume_jitter is None else self._resume_jitter
        if spread <= 0:
            return False
        try:
            await workflow.wait_condition(
                lambda: self._stop is not None or self._group_paused(group),
                timeout=workflow.random().uniform(0, spread),
                timeout_summary="resume jitter",
            )
        except TimeoutError:
            return False
        return True

    def _show_state(self, state: str) -> None:
        """Upserts DeliveryState only when it changes: every upsert is a history event."""
        if workflow.info().typed_search_attributes.get(search.DELIVERY_STATE) != state:
            workflow.upsert_search_attributes([search.DELIVERY_STATE.value_set(state)])

    def _queued_since(self) -> datetime:
        # The workflow's own clock is the one its timers use; `arrival` comes from the
        # submitter's clock (and the time-skipping test server's runs ahead of it).
        return max(self._msg.arrival, workflow.info().workflow_start_time)

    def _queue_age(self) -> timedelta:
        paused = self._paused_total
        if self._paused_since is not None:
            paused += workflow.now() - self._paused_since
        return workflow.now() - self._queued_since() - paused

    def _past_max_age(self, spec: DeliveryGroup) -> bool:
        if spec.max_age_seconds is None:
            return False
        return self._queue_age() >= timedelta(seconds=spec.max_age_seconds)

    def _within_max_age(self, spec: DeliveryGroup, delay: timedelta) -> timedelta:
        """A wait that would outlast max_age ends at it: one last attempt, then give up."""
        if spec.max_age_seconds is None:
            return delay
        left = timedelta(seconds=spec.max_age_seconds) - self._queue_age()
        return max(timedelta(0), min(delay, left))

    def _retry_until(self, spec: DeliveryGroup) -> datetime:
        """When the group's last attempt is due if every wait is taken in full."""
        span = spec.schedule.give_up_after
        if spec.max_age_seconds is not None:
            span = min(span, timedelta(seconds=spec.max_age_seconds))
        return self._queued_since() + span

    # ---- reporting ----------------------------------------------------------------------

    def _final_state(self) -> str:
        states = {r.state for g in self._groups for r in g.reports.values()}
        if states == {RecipientState.DELIVERED}:
            return "delivered"
        if self._stop == "delete" or states == {RecipientState.DISCARDED}:
            return "discarded"
        if self._stop == "bounce":
            return "bounced"
        if RecipientState.DELIVERED in states:
            return "partial"
        return "failed"

    def _report(self) -> DeliveryReport:
        due = [g.next_attempt_at for g in self._groups if g.next_attempt_at and g.pending()]
        return DeliveryReport(
            queue_id=self._msg.queue_id,
            mail_from=self._msg.mail_from,
            recipients=[r for g in self._groups for r in g.reports.values()],
            done=self._done,
            next_attempt_at=min(due) if due else None,
            paused=bool(self._paused_scopes),
            paused_by=sorted(self._paused_scopes),
            notes=list(self._notes),
        )


def _from_error(address: str, error: DeliveryError, stage: str) -> RecipientOutcome:
    return RecipientOutcome(
        address=address,
        state=RecipientState.FAILED if error.permanent else RecipientState.DEFERRED,
        code=error.code,
        enhanced=error.enhanced,
        text=error.text,
        remote_host=error.remote_host,
        remote_ip=error.remote_ip,
        stage=stage,
    )


def _minutes(span: timedelta) -> str:
    minutes = span.total_seconds() / 60
    return f"{minutes:.0f} min" if minutes >= 1 else f"{span.total_seconds():.0f} s"


def _join(note: str | None, extra: str) -> str:
    return f"{note}; {extra}" if note else extra

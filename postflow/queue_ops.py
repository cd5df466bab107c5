"""The queue tools' operations on Temporal: list, show, signal, scope control, setup.

Reads come from visibility (search attributes) and each message's `status` query; changes
are signals, to one message by queue id, or to QueueControl for a scope. No printing here:
`postflow.queue_cli` formats what these return.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest, RegisterNamespaceRequest
from temporalio.client import Client, WorkflowExecution
from temporalio.service import RPCError, RPCStatusCode

from postflow import search
from postflow.constants import (
    CONTROL_TASK_QUEUE,
    CONTROL_WORKFLOW_ID,
    SEARCH_ATTRIBUTES,
    message_workflow_id,
    queue_id_from_workflow_id,
)
from postflow.models import DeliveryReport, RecipientReport, RecipientState
from postflow.signals import (
    MESSAGE_SCOPE,
    ControlSignal,
    ControlState,
    FanOutResult,
    ScopeRequest,
    parse_scope,
)

__all__ = [
    "MESSAGE_SIGNALS",
    "STATES",
    "MessageView",
    "QueueError",
    "QueueRow",
    "control_scope",
    "control_state",
    "list_queue",
    "reply_line",
    "setup_cluster",
    "show_message",
    "signal_message",
    "ui_link",
]

STATES = (
    "queued",
    "sending",
    "deferred",
    "paused",
    "delivered",
    "failed",
    "bounced",
    "discarded",
    "partial",
)
_OPEN_STATES = {"queued", "sending", "deferred", "paused"}
# Operator verb -> the message workflow's signal.
MESSAGE_SIGNALS = {
    "pause": "pause",
    "resume": "resume",
    "retry": "retry_now",
    "bounce": "bounce",
    "delete": "delete",
}
_KINDS = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
    "Int": IndexedValueType.INDEXED_VALUE_TYPE_INT,
    "Datetime": IndexedValueType.INDEXED_VALUE_TYPE_DATETIME,
    "Bool": IndexedValueType.INDEXED_VALUE_TYPE_BOOL,
    "Text": IndexedValueType.INDEXED_VALUE_TYPE_TEXT,
    "Double": IndexedValueType.INDEXED_VALUE_TYPE_DOUBLE,
}
_STATUS_CONCURRENCY = 20


class QueueError(Exception):
    """An operation the operator asked for that cannot be done; the text says why."""


class QueueRow(BaseModel):
    """One message as `postflow queue` shows it."""

    queue_id: str
    arrival: datetime | None = None
    sender: str = ""
    recipients: list[str] = Field(default_factory=list)
    transports: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)
    state: str = ""
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    paused_by: list[str] = Field(default_factory=list)
    status: str = ""  # the workflow's: Running, Completed, ...
    priority: bool = False  # decided at ingest by the [[priority]] rules


class MessageView(BaseModel):
    """`postflow show`: the live status query in full, plus where to see its history."""

    row: QueueRow
    report: DeliveryReport | None = None
    workflow_id: str
    run_id: str | None = None
    web_ui: str


def _quote(value: str) -> str:
    if '"' in value or "\\" in value or "\n" in value:
        raise QueueError(f"{value!r}: quotes, backslashes and newlines are not allowed here")
    return f'"{value}"'


def _list_query(
    state: str | None, transport: str | None, domain: str | None, mail_from: str | None
) -> str:
    parts = ['WorkflowType = "DeliverMessage"']
    if state is None or state in _OPEN_STATES:
        parts.append('ExecutionStatus = "Running"')
    if state is not None:
        if state not in STATES:
            raise QueueError(f"--state {state!r}: not one of {', '.join(STATES)}")
        parts.append(f"DeliveryState = {_quote(state)}")
    if transport:
        parts.append(f"Transport = {_quote(transport)}")
    if domain:
        parts.append(f"RecipientDomains = {_quote(domain.lower())}")
    if mail_from:
        parts.append(f"MailFrom = {_quote(mail_from)}")
    return " AND ".join(parts)


def _row(wf: WorkflowExecution) -> QueueRow:
    attrs = wf.typed_search_attributes
    return QueueRow(
        queue_id=queue_id_from_workflow_id(wf.id),
        arrival=wf.start_time,
        sender=attrs.get(search.MAIL_FROM) or "",
        transports=list(attrs.get(search.TRANSPORT) or []),
        domains=list(attrs.get(search.RECIPIENT_DOMAINS) or []),
        state=attrs.get(search.DELIVERY_STATE) or "",
        attempts=attrs.get(search.ATTEMPTS) or 0,
        next_attempt_at=attrs.get(search.NEXT_ATTEMPT_AT),
        status=wf.status.name.title() if wf.status else "",
        priority=bool(attrs.get(search.PRIORITY)),
    )


def reply_line(r: RecipientReport) -> str:
    """`451 4.7.1 text`, whether or not the recorded text already starts with the codes."""
    prefix = " ".join(str(p) for p in (r.code, r.enhanced) if p)
    text = r.text.strip()
    if prefix and text.startswith(prefix):
        return text
    if r.code and text.startswith(str(r.code)):
        return text
    return f"{prefix} {text}".strip()


def _last_error(report: DeliveryReport) -> str | None:
    for r in report.recipients:
        if r.state in (RecipientState.DEFERRED, RecipientState.FAILED) and (r.code or r.text):
            reply = reply_line(r)
            return f"{reply} ({r.remote_host})" if r.remote_host else reply
    return None


def _apply_report(row: QueueRow, report: DeliveryReport) -> None:
    row.recipients = [r.address for r in report.recipients]
    row.last_error = _last_error(report)
    row.paused_by = list(report.paused_by)
    row.next_attempt_at = report.next_attempt_at or row.next_attempt_at
    row.attempts = max([row.attempts, *(r.attempts for r in report.recipients)])


async def _status(client: Client, workflow_id: str, run_id: str | None) -> DeliveryReport | None:
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        return await handle.query(
            "status", result_type=DeliveryReport, rpc_timeout=timedelta(seconds=10)
        )
    except Exception:
        return None  # a message finishing or a worker away: show what visibility has


async def list_queue(
    client: Client,
    *,
    state: str | None = None,
    transport: str | None = None,
    domain: str | None = None,
    mail_from: str | None = None,
    limit: int = 100,
    details: bool = True,
) -> list[QueueRow]:
    """Messages from visibility, newest first; `details` adds each one's status query."""
    query = _list_query(state, transport, domain, mail_from)
    executions = [wf async for wf in client.list_workflows(query, limit=limit)]
    rows = [_row(wf) for wf in executions]
    if details:
        gate = asyncio.Semaphore(_STATUS_CONCURRENCY)

        async def _fill(row: QueueRow, wf: WorkflowExecution) -> None:
            async with gate:
                report = await _status(client, wf.id, wf.run_id)
            if report is not None:
                _apply_report(row, report)

        await asyncio.gather(*(_fill(r, wf) for r, wf in zip(rows, executions, strict=True)))
    return rows


def ui_link(ui_base: str, namespace: str, workflow_id: str, run_id: str | None = None) -> str:
    link = f"{ui_base.rstrip('/')}/namespaces/{namespace}/workflows/{workflow_id}"
    return f"{link}/{run_id}/history" if run_id else link


async def show_message(client: Client, queue_id: str, ui_base: str) -> MessageView:
    workflow_id = message_workflow_id(queue_id)
    handle = client.get_workflow_handle(workflow_id)
    try:
        described = await handle.describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise QueueError(f"{queue_id}: no such message") from None
        raise
    row = _row(described)
    report = await _status(client, workflow_id, described.run_id)
    if report is not None:
        _apply_report(row, report)
    return MessageView(
        row=row,
        report=report,
        workflow_id=workflow_id,
        run_id=described.run_id,
        web_ui=ui_link(ui_base, client.namespace, workflow_id, described.run_id),
    )


async def signal_message(
    client: Client, queue_id: str, verb: str, reason: str | None = None
) -> None:
    """Sends `verb` to one message; QueueError if it does not exist or has finished."""
    handle = client.get_workflow_handle(message_workflow_id(queue_id))
    # By id, a resume releases at once: there is no crowd to spread.
    signal = ControlSignal(
        scope=MESSAGE_SCOPE, reason=reason, jitter_seconds=0.0 if verb == "resume" else None
    )
    try:
        await handle.signal(MESSAGE_SIGNALS[verb], signal)
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        try:
            described = await handle.describe()
        except RPCError:
            raise QueueError(f"{queue_id}: no such message") from None
        status = described.status.name.lower() if described.status else "finished"
        state = described.typed_search_attributes.get(search.DELIVERY_STATE)
        raise QueueError(
            f"{queue_id}: no longer queued ({status}" + (f", {state})" if state else ")")
        ) from None


async def control_state(client: Client) -> ControlState | None:
    """QueueControl's paused scopes, or None if nothing was ever paused by scope."""
    handle = client.get_workflow_handle(CONTROL_WORKFLOW_ID)
    try:
        return await handle.query("state", result_type=ControlState)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return None
        raise


async def control_scope(
    client: Client,
    op: str,
    scope: str,
    *,
    reason: str | None = None,
    wait: bool = True,
    poll_seconds: float = 0.25,
    on_slow: Callable[[], None] | None = None,
) -> FanOutResult | None:
    """Pause, resume or flush (`retry`) a scope through QueueControl.

    The scope changes as soon as QueueControl takes the signal (started here if needed);
    with `wait`, returns once every running message of the scope has been signalled.
    """
    request = ScopeRequest(op=op, scope=parse_scope(scope), op_id=uuid.uuid4().hex, reason=reason)
    handle = await client.start_workflow(
        "QueueControl",
        ControlState(),
        id=CONTROL_WORKFLOW_ID,
        task_queue=CONTROL_TASK_QUEUE,
        start_signal=op,
        start_signal_args=[request],
        static_summary="Postflow queue control: paused scopes",
    )
    if not wait:
        return None
    began = time.monotonic()
    warned = False
    while True:
        state = await handle.query("state", result_type=ControlState)
        for done in state.finished:
            if done.op_id == request.op_id:
                return done
        if not warned and on_slow is not None and time.monotonic() - began > 15:
            on_slow()
            warned = True
        await asyncio.sleep(poll_seconds)


async def setup_cluster(client: Client, retention_days: int = 3) -> list[str]:
    """Registers the namespace and Postflow's search attributes where missing; says what it did.

    Harmless to run again: what exists is left alone. A search attribute registered with
    another type is an error, since Postflow's queries would fail on it.
    """
    namespace = client.namespace
    done: list[str] = []
    try:
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=namespace)
        )
        done.append(f"namespace {namespace}: exists")
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        await client.workflow_service.register_namespace(
            RegisterNamespaceRequest(
                namespace=namespace,
                workflow_execution_retention_period=Duration(seconds=retention_days * 86400),
            )
        )
        done.append(f"namespace {namespace}: registered (retention {retention_days} days)")
    # A new namespace reaches every frontend after its cache refreshes (up to ~10 s).
    deadline = time.monotonic() + 30
    while True:
        try:
            listed = await client.operator_service.list_search_attributes(
                ListSearchAttributesRequest(namespace=namespace)
            )
            break
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(1)
    have = dict(listed.custom_attributes)
    missing: dict[str, int] = {}
    for name, kind in SEARCH_ATTRIBUTES.items():
        wanted = _KINDS[kind]
        if name not in have:
            missing[name] = wanted
        elif have[name] != wanted:
            got = IndexedValueType.Name(have[name]).removeprefix("INDEXED_VALUE_TYPE_")
            raise QueueError(
                f"search attribute {name}: registered as {got}, Postflow needs {kind}; "
                "remove it or use another namespace"
            )
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
        )
        done.append(f"search attributes added: {', '.join(sorted(missing))}")
    else:
        done.append("search attributes: all present")
    return done

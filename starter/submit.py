"""`Submitter.submit()`: the one way a message enters Postflow (ingest and Python callers).

Stores the body, then starts the message's workflow; returns the queue id only when both
are done. If either fails, the stored body is removed and `SubmitError` raised, so the
caller's own retry is the only copy; only when the start may have happened anyway is the
body left for `postflow sweep` to judge.
"""

from __future__ import annotations

import errno
import logging
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    Priority,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
)
from temporalio.service import RPCError, RPCStatusCode

from postflow import search
from postflow.config import Config
from postflow.constants import (
    PRIORITY_TASK_QUEUE,
    TASK_QUEUE,
    message_workflow_id,
    queue_id_from_workflow_id,
)
from postflow.models import DeliverInput, Recipient
from postflow.priority import PriorityRules, fairness_key
from postflow.replies import clean_text
from postflow.routing import plan_groups
from postflow.spool import Spool, new_queue_id, open_spool
from workflows.deliver import DeliverMessage

__all__ = ["SubmitError", "Submitter", "header_summary"]

log = logging.getLogger("postflow.submit")

INPUT_VERSION = 1

# Answers that mean the server refused the start: no workflow exists, the body can go.
_NOT_STARTED = frozenset(
    {
        RPCStatusCode.INVALID_ARGUMENT,
        RPCStatusCode.NOT_FOUND,
        RPCStatusCode.PERMISSION_DENIED,
        RPCStatusCode.UNAUTHENTICATED,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.UNIMPLEMENTED,
        RPCStatusCode.OUT_OF_RANGE,
    }
)


class SubmitError(Exception):
    """The message was not queued; nothing of it was kept (but see `enqueue`)."""

    def __init__(self, message: str, *, temporary: bool = True, no_space: bool = False) -> None:
        super().__init__(message)
        self.temporary = temporary
        # The spool's filesystem is full: SMTP has its own answer for that (452 4.3.1).
        self.no_space = no_space


def header_summary(data: bytes) -> dict[str, str | None]:
    """Message-ID and Subject for display; only the header block is parsed."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[: end + 2]
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)

    def _get(name: str) -> str | None:
        value = headers.get(name)
        return clean_text(str(value))[:200] if value is not None else None

    return {"message_id": _get("Message-ID"), "subject": _get("Subject")}


class Submitter:
    def __init__(
        self,
        client: Client,
        config: Config,
        spool: Spool | None = None,
        *,
        task_queue: str = TASK_QUEUE,
        priority_task_queue: str = PRIORITY_TASK_QUEUE,
    ) -> None:
        self._client = client
        self._config = config
        self._spool = spool or open_spool(config.spool)
        self._queues = (task_queue, priority_task_queue)
        self._priority = PriorityRules(config.priority)

    async def submit(
        self, mail_from: str, recipients: list[Recipient] | list[str], data: bytes, **options: Any
    ) -> str:
        """Queues one message; returns its queue id once body and workflow are durable."""
        handle = await self.enqueue(mail_from, recipients, data, **options)
        return queue_id_from_workflow_id(handle.id)

    async def enqueue(
        self,
        mail_from: str,
        recipients: list[Recipient] | list[str],
        data: bytes,
        *,
        ret: str | None = None,
        envid: str | None = None,
        smtputf8: bool = False,
        is_report: bool = False,
        priority: bool | None = None,
        queue_id: str | None = None,
    ) -> WorkflowHandle[Any, Any]:
        """Like `submit`, but returns the message's workflow handle."""
        rcpts = [r if isinstance(r, Recipient) else Recipient(address=r) for r in recipients]
        if not rcpts:
            raise SubmitError("no recipients", temporary=False)
        queue_id = queue_id or new_queue_id()
        try:
            await self._spool.astore(queue_id, data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise SubmitError(f"spool: {exc}", no_space=full) from exc
        try:
            return await self._start(
                queue_id, mail_from, rcpts, data, ret, envid, smtputf8, is_report, priority
            )
        except Exception as exc:
            if isinstance(exc, RPCError) and exc.status not in _NOT_STARTED:
                # The start may have reached the server before the connection broke (seen
                # when Temporal was killed mid-burst): the workflow may exist and need the
                # body. Kept; `postflow sweep` removes it if no workflow turns up.
                log.warning("%s: start outcome unknown (%s); body kept", queue_id, exc)
            else:
                await self._spool.adelete(queue_id)
            raise SubmitError(f"could not queue: {exc}") from exc

    async def _start(
        self,
        queue_id: str,
        mail_from: str,
        rcpts: list[Recipient],
        data: bytes,
        ret: str | None,
        envid: str | None,
        smtputf8: bool,
        is_report: bool,
        priority: bool | None,
    ) -> WorkflowHandle[Any, Any]:
        info = header_summary(data)
        groups = plan_groups(self._config, rcpts)
        if priority is None:
            # Decided once, here: the workflow input, its queue and `Priority` record it.
            rule = self._priority.match(
                mail_from, {g.domain for g in groups}, {g.transport for g in groups}, data
            )
            priority = rule is not None
        prioritized = priority
        msg = DeliverInput(
            version=INPUT_VERSION,
            queue_id=queue_id,
            spool_key=queue_id,
            mail_from=mail_from,
            groups=groups,
            size=len(data),
            arrival=datetime.now(UTC),
            message_id=info["message_id"],
            subject=info["subject"],
            ret=ret,
            envid=envid,
            smtputf8=smtputf8,
            # isascii runs in C: a Python loop over 50 MB blocked the ingest for 2 s.
            body_8bit=not data.isascii(),
            priority=prioritized,
            is_report=is_report,
        )
        shown = ", ".join(r.address for r in rcpts[:3]) + (" ..." if len(rcpts) > 3 else "")
        attributes = [
            SearchAttributePair(search.MAIL_FROM, mail_from or "<>"),
            SearchAttributePair(search.RECIPIENT_DOMAINS, sorted({g.domain for g in groups})),
            SearchAttributePair(search.TRANSPORT, sorted({g.transport for g in groups})),
            SearchAttributePair(search.DELIVERY_STATE, "queued"),
            SearchAttributePair(search.ATTEMPTS, 0),
            SearchAttributePair(search.PRIORITY, prioritized),
        ]
        if info["message_id"]:
            attributes.append(SearchAttributePair(search.MESSAGE_ID, info["message_id"]))
        return await self._client.start_workflow(
            DeliverMessage.run,
            msg,
            id=message_workflow_id(queue_id),
            task_queue=self._queues[1] if prioritized else self._queues[0],
            # A start repeated after a lost reply must not make a second delivery.
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            search_attributes=TypedSearchAttributes(attributes),
            static_summary=f"{mail_from or '<>'} → {shown}"
            + (f": {info['subject']}" if info["subject"] else ""),
            # priority_key reorders a backlog within one queue; the fairness key (honoured
            # when the server runs with matching.enableFairness) shares a queue between
            # sender domains, so one campaign cannot starve another sender's mail.
            priority=Priority(
                priority_key=1 if prioritized else None, fairness_key=fairness_key(mail_from)
            ),
        )

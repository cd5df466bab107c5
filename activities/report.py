"""The report activity: builds a delivery status notification and queues it as a new message.

Reads the original from the spool itself, so report content never passes through workflow
history. The report is an ordinary Postflow message (null sender, `is_report`), delivered by
its own `DeliverMessage` workflow and never reported on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from postflow.config import Config
from postflow.constants import message_workflow_id
from postflow.dsn import build_report, report_queue_id
from postflow.models import FailureReportRequest, Recipient
from postflow.spool import Spool, SpoolError

if TYPE_CHECKING:
    from starter.submit import Submitter

__all__ = ["ReportActivities"]


class ReportActivities:
    def __init__(self, client: Client, config: Config, spool: Spool) -> None:
        self._client = client
        self._config = config
        self._spool = spool

    def _submitter(self, task_queue: str) -> Submitter:
        # Imported here: starter.submit imports the workflow, which imports this module.
        from starter.submit import Submitter

        return Submitter(
            self._client,
            self._config,
            self._spool,
            task_queue=task_queue,
            priority_task_queue=task_queue,
        )

    async def _already_queued(self, queue_id: str) -> bool:
        """A previous try of this activity queued the report (the workflow may be done)."""
        try:
            await self._client.get_workflow_handle(message_workflow_id(queue_id)).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return True

    @activity.defn(name="send_failure_report")
    async def send_failure_report(self, req: FailureReportRequest) -> str | None:
        """Queues the report; returns its queue id, or None when no report may be sent."""
        msg = req.message
        if not msg.mail_from or msg.is_report or not req.recipients:
            # Never bounce a bounce (RFC 5321 §6.1); the workflow checks this too.
            return None
        queue_id = report_queue_id(msg.queue_id, req.sequence)
        if await self._already_queued(queue_id):
            activity.logger.info("report %s for %s was already queued", queue_id, msg.queue_id)
            return queue_id
        try:
            original: bytes | None = await self._spool.aread(msg.spool_key)
        except SpoolError as exc:
            # The sender is still told; the report says the original could not be attached.
            activity.logger.warning("report for %s without the original: %s", msg.queue_id, exc)
            original = None
        data = build_report(
            req,
            original,
            reporting_mta=self._config.smtp.helo_name,
            report_id=queue_id,
            return_size_limit=self._config.dsn.return_size_limit,
            now=req.created_at or datetime.now(UTC),
        )
        from starter.submit import SubmitError

        # The original's queue family: the worker serving it took this activity.
        submitter = self._submitter(activity.info().task_queue)
        try:
            await submitter.enqueue(
                "",
                [Recipient(address=msg.mail_from)],
                data,
                smtputf8=not msg.mail_from.isascii(),
                is_report=True,
                priority=msg.priority,
                queue_id=queue_id,
            )
        except SubmitError as exc:
            raise ApplicationError(
                f"report {queue_id} not queued: {exc}", non_retryable=not exc.temporary
            ) from exc
        activity.logger.info(
            "%s report %s queued for %s (%d recipients)",
            req.action,
            queue_id,
            msg.queue_id,
            len(req.recipients),
        )
        return queue_id

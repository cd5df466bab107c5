"""Delivery status notifications (RFC 3464): builds the report and queues it as a new message.

Placeholder until the DSN work lands: it records that no report was sent.
"""

from __future__ import annotations

from temporalio import activity

from postflow.models import FailureReportRequest

__all__ = ["ReportActivities"]


class ReportActivities:
    @activity.defn(name="send_failure_report")
    async def send_failure_report(self, req: FailureReportRequest) -> str | None:
        activity.logger.info(
            "no DSN built yet for %s (%d recipients)", req.message.queue_id, len(req.recipients)
        )
        return None

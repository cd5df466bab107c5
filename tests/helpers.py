"""Small helpers shared by the integration tests."""

from __future__ import annotations

from datetime import datetime

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from postflow.config import Config
from postflow.models import Recipient
from starter.submit import Submitter

MESSAGE = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: Test message\r\n"
    b"Message-ID: <t1@sender.test>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


async def submit(
    client: Client,
    config: Config,
    queue: str,
    recipients: list[str] | list[Recipient],
    data: bytes = MESSAGE,
    mail_from: str = "alice@sender.test",
    **kwargs: object,
) -> WorkflowHandle:
    submitter = Submitter(client, config, task_queue=queue, priority_task_queue=queue)
    # The handle from start_workflow lets the time-skipping server skip while we wait.
    return await submitter.enqueue(mail_from, recipients, data, **kwargs)  # type: ignore[arg-type]


async def activity_times(handle: WorkflowHandle, name: str = "send_message") -> list[datetime]:
    """When each attempt of `name` was scheduled, from the workflow's history."""
    times = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            if event.activity_task_scheduled_event_attributes.activity_type.name == name:
                times.append(event.event_time.ToDatetime())
    return times

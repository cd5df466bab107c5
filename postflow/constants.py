"""Names shared by every process: task queues, workflow ids, search attributes. No logic."""

from __future__ import annotations

__all__ = [
    "CONTROL_TASK_QUEUE",
    "CONTROL_WORKFLOW_ID",
    "PRIORITY_TASK_QUEUE",
    "SEARCH_ATTRIBUTES",
    "TASK_QUEUE",
    "message_workflow_id",
    "queue_id_from_workflow_id",
]

TASK_QUEUE = "postflow"
PRIORITY_TASK_QUEUE = "postflow-priority"
CONTROL_TASK_QUEUE = "postflow-control"
CONTROL_WORKFLOW_ID = "postflow-queue-control"

_MESSAGE_PREFIX = "msg-"

# Registered with `postflow up` (dev server) and `postflow setup` (any cluster).
SEARCH_ATTRIBUTES: dict[str, str] = {
    "MailFrom": "Keyword",
    "RecipientDomains": "KeywordList",
    "Transport": "KeywordList",
    "DeliveryState": "Keyword",
    "Attempts": "Int",
    "NextAttemptAt": "Datetime",
    "MessageId": "Keyword",
    "Priority": "Bool",
}


def message_workflow_id(queue_id: str) -> str:
    """`msg-<queue id>`: one id per message makes a repeated start idempotent."""
    return f"{_MESSAGE_PREFIX}{queue_id}"


def queue_id_from_workflow_id(workflow_id: str) -> str:
    return workflow_id.removeprefix(_MESSAGE_PREFIX)

"""The pydantic models that cross a Temporal boundary (workflow, activity, signal, query).

Never a message body or a secret: bodies travel as spool keys, passwords as setting names.
Every field added later must get a default so that histories of messages in flight decode.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from postflow.schedule import RetrySchedule

__all__ = [
    "AttemptRecord",
    "DeliverInput",
    "DeliveryError",
    "DeliveryGroup",
    "DeliveryReport",
    "FailureReportRequest",
    "HostTry",
    "MxHost",
    "Recipient",
    "RecipientOutcome",
    "RecipientReport",
    "RecipientState",
    "ResolveRequest",
    "ResolveResult",
    "SendRequest",
    "SendResult",
    "TlsInfo",
]


class RecipientState(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    FAILED = "failed"
    DISCARDED = "discarded"


class Recipient(BaseModel):
    """One RCPT TO with its RFC 3461 parameters as received."""

    address: str
    notify: list[str] | None = None
    orcpt: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


class DeliveryGroup(BaseModel):
    """Recipients sharing one transport and one destination domain: one delivery loop."""

    transport: str
    domain: str
    recipients: list[Recipient]
    schedule: RetrySchedule
    on_give_up: str = "dsn"
    max_age_seconds: int | None = None
    delay_warning_seconds: int | None = None


class DeliverInput(BaseModel):
    """What ingest knows about one accepted message, minus its body."""

    version: int = 1
    queue_id: str
    spool_key: str
    mail_from: str
    groups: list[DeliveryGroup]
    size: int
    arrival: datetime
    message_id: str | None = None
    subject: str | None = None
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    priority: bool = False
    # Set on delivery status notifications so that a report is never reported on.
    is_report: bool = False

    @property
    def recipients(self) -> list[Recipient]:
        return [r for g in self.groups for r in g.recipients]


class ResolveRequest(BaseModel):
    transport: str
    domain: str


class MxHost(BaseModel):
    """A host to try, in order: MX preference, name, addresses in the order to try them."""

    name: str
    preference: int = 0
    addresses: list[str] = []
    port: int = 25


class DeliveryError(BaseModel):
    """A failure that applies to every recipient of a group (DNS, no host reachable, ...)."""

    permanent: bool
    code: int | None = None
    enhanced: str
    text: str
    remote_host: str | None = None
    remote_ip: str | None = None

    def softened(self) -> DeliveryError:
        """`[delivery] soft_bounce`: the same failure, but temporary (class 4), so retried."""
        if not self.permanent:
            return self
        enhanced = "4" + self.enhanced[1:] if self.enhanced[:1] == "5" else self.enhanced
        return self.model_copy(
            update={"permanent": False, "enhanced": enhanced, "text": f"{self.text} (soft_bounce)"}
        )


class ResolveResult(BaseModel):
    hosts: list[MxHost] = []
    error: DeliveryError | None = None
    notes: list[str] = []
    # QueueControl's paused scopes that cover this (transport, domain), scope -> epoch,
    # checked before every attempt; when any is set, hosts are not looked up.
    paused_scopes: dict[str, int] = Field(default_factory=dict)


class TlsInfo(BaseModel):
    protocol: str | None = None
    cipher: str | None = None
    verified: bool = False
    peer_subject: str | None = None
    peer_sha256: str | None = None
    # The transport's tls setting, and why the handshake or verification failed, if it did.
    policy: str | None = None
    error: str | None = None


class HostTry(BaseModel):
    """One connection attempt to one address, in the order they were made."""

    host: str
    ip: str | None = None
    port: int = 25
    error: str | None = None
    tls: TlsInfo | None = None
    plaintext_fallback: bool = False
    # Where and how the session ended when it failed; what the server offered and we used.
    stage: str | None = None
    code: int | None = None
    enhanced: str | None = None
    extensions: list[str] = Field(default_factory=list)
    helo_fallback: bool = False
    auth_mechanism: str | None = None
    pipelined: bool = False


class SendRequest(BaseModel):
    queue_id: str
    spool_key: str
    transport: str
    domain: str
    mail_from: str
    recipients: list[Recipient]
    hosts: list[MxHost]
    attempt: int
    size: int = 0
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False


class RecipientOutcome(BaseModel):
    """One recipient's answer in one attempt."""

    address: str
    state: RecipientState
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    remote_host: str | None = None
    remote_ip: str | None = None
    stage: str | None = None  # connect, greeting, ehlo, tls, auth, mail, rcpt, data, dns


class SendResult(BaseModel):
    recipients: list[RecipientOutcome]
    tries: list[HostTry] = []
    dsn_announced: bool = False


class AttemptRecord(BaseModel):
    number: int
    at: datetime
    hosts: list[str] = []
    delivered: int = 0
    deferred: int = 0
    failed: int = 0
    error: str | None = None


class RecipientReport(BaseModel):
    """A recipient's state as the workflow knows it: the `status` query and the result."""

    address: str
    transport: str
    state: RecipientState = RecipientState.PENDING
    code: int | None = None
    enhanced: str | None = None
    text: str = ""
    remote_host: str | None = None
    remote_ip: str | None = None
    stage: str | None = None
    attempts: int = 0
    last_attempt_at: datetime | None = None
    note: str | None = None


class DeliveryReport(BaseModel):
    """The workflow's result; the `status` query returns it while the message is queued."""

    queue_id: str
    mail_from: str
    recipients: list[RecipientReport]
    done: bool = False
    next_attempt_at: datetime | None = None
    paused: bool = False
    paused_by: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class FailureReportRequest(BaseModel):
    """Ask the report activity for a delivery status notification about `recipients`."""

    message: DeliverInput
    recipients: list[RecipientReport]
    gave_up: bool = False
    action: str = "failed"  # failed | delayed | delivered | relayed
    # The report's number within its message: with the queue id it names the report's own
    # queue id, so a retried activity cannot queue the same report twice.
    sequence: int = 0
    # Workflow time when the report was asked for: its Date header, so retries build it alike.
    created_at: datetime | None = None
    # When the workflow started counting the message's time in the queue.
    queued_since: datetime | None = None
    # Delay reports: until when each recipient will be retried (Will-Retry-Until).
    retry_until: dict[str, datetime] = Field(default_factory=dict)

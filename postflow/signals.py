"""Operator control signals and pause scopes, shared by the CLI and the workflows. Pure."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, Field

from postflow.models import DeliveryGroup

__all__ = [
    "ALL_SCOPE",
    "MESSAGE_SCOPE",
    "ControlSignal",
    "ControlState",
    "FanOutRequest",
    "FanOutResult",
    "ScopeError",
    "ScopeRequest",
    "parse_scope",
    "scope_applies",
    "scope_matches",
    "visibility_query",
]

# Scopes: "message" (this message, by id), "all", "transport:NAME", "domain:DOMAIN".
MESSAGE_SCOPE = "message"
ALL_SCOPE = "all"


class ControlSignal(BaseModel):
    scope: str = MESSAGE_SCOPE
    reason: str | None = None
    # QueueControl's stamp (ms, increasing) for scope pauses and resumes, so that a late or
    # repeated signal, or a stale scope check, never undoes a newer change; 0 for by-id.
    epoch: int = 0
    # Resume only: spread the held attempts over this many seconds (None: the default).
    jitter_seconds: float | None = None


def scope_applies(scope: str, transport: str, domain: str) -> bool:
    if scope in (MESSAGE_SCOPE, ALL_SCOPE):
        return True
    kind, _, value = scope.partition(":")
    if kind == "transport":
        return transport == value
    if kind == "domain":
        return domain == value.lower()
    return False


def scope_matches(scope: str, group: DeliveryGroup) -> bool:
    return scope_applies(scope, group.transport, group.domain)


class ScopeError(ValueError):
    """A scope string that is not `all`, `transport:NAME` or `domain:DOMAIN`."""


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_scope(scope: str) -> str:
    """Validates a scope QueueControl can hold; returns it normalised (domains lowercased)."""
    if scope == ALL_SCOPE:
        return scope
    kind, _, value = scope.partition(":")
    if kind in ("transport", "domain") and _NAME.match(value):
        return f"{kind}:{value.lower() if kind == 'domain' else value}"
    raise ScopeError(f"{scope!r}: not a scope (all, transport:NAME or domain:DOMAIN)")


def visibility_query(scope: str, workflow_type: str = "DeliverMessage") -> str:
    """The visibility query for the running message workflows a scope covers."""
    query = f'WorkflowType = "{workflow_type}" AND ExecutionStatus = "Running"'
    kind, _, value = parse_scope(scope).partition(":")
    if kind == "transport":
        query += f' AND Transport = "{value}"'
    elif kind == "domain":
        query += f' AND RecipientDomains = "{value}"'
    return query


class ScopeRequest(BaseModel):
    """A signal to QueueControl: pause, resume or flush (`retry`) every message in a scope."""

    op: str  # pause | resume | retry
    scope: str
    op_id: str = ""
    reason: str | None = None
    epoch: int = 0  # stamped by QueueControl when it accepts the request


class FanOutRequest(BaseModel):
    """Signal every running message workflow in `scope`, page by page."""

    signal: str  # pause | resume | retry_now
    scope: str
    op_id: str = ""
    epoch: int = 0
    reason: str | None = None
    # Wait before listing until every scope check made after the listing sees the change.
    settle: bool = False


class FanOutResult(BaseModel):
    op_id: str = ""
    op: str = ""
    scope: str = ""
    signalled: int = 0
    gone: int = 0  # finished between the listing and the signal
    seconds: float = 0.0
    finished_at: datetime | None = None
    error: str | None = None


class ControlState(BaseModel):
    """QueueControl's state: its `state` query and its continue-as-new input."""

    scopes: dict[str, int] = Field(default_factory=dict)  # scope -> epoch of its pause
    paused_at: dict[str, datetime] = Field(default_factory=dict)
    pending: list[ScopeRequest] = Field(default_factory=list)
    finished: list[FanOutResult] = Field(default_factory=list)  # the most recent few
    epoch: int = 0
    # Continue-as-new past this many history events (the server suggests it near 4,000).
    max_history: int = 2000

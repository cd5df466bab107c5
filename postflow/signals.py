"""Operator control signals and pause scopes, shared by the CLI and the workflows. Pure."""

from __future__ import annotations

from pydantic import BaseModel

from postflow.models import DeliveryGroup

__all__ = ["ControlSignal", "scope_matches"]

# Scopes: "message" (this message, by id), "all", "transport:NAME", "domain:DOMAIN".
MESSAGE_SCOPE = "message"
ALL_SCOPE = "all"


class ControlSignal(BaseModel):
    scope: str = MESSAGE_SCOPE
    reason: str | None = None


def scope_matches(scope: str, group: DeliveryGroup) -> bool:
    if scope in (MESSAGE_SCOPE, ALL_SCOPE):
        return True
    kind, _, value = scope.partition(":")
    if kind == "transport":
        return group.transport == value
    if kind == "domain":
        return group.domain == value.lower()
    return False

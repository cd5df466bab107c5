"""Chooses a transport per recipient and groups recipients into delivery loops. Pure."""

from __future__ import annotations

from postflow.config import Config
from postflow.models import DeliveryGroup, Recipient

__all__ = ["plan_groups", "transport_for"]


def transport_for(config: Config, domain: str) -> str:
    """First route whose domain matches exactly, or with a leading dot any subdomain."""
    domain = domain.lower().rstrip(".")
    for route in config.routes:
        for pattern in route.domains:
            if pattern.startswith("."):
                if domain.endswith(pattern):
                    return route.transport
            elif domain == pattern:
                return route.transport
    return "default"


def plan_groups(config: Config, recipients: list[Recipient]) -> list[DeliveryGroup]:
    """One group per (transport, domain) in the order recipients first appear.

    The retry schedule is copied into the group, so a message keeps the schedule it was
    queued with even if the configuration changes while it waits.
    """
    groups: dict[tuple[str, str], DeliveryGroup] = {}
    for rcpt in recipients:
        name = transport_for(config, rcpt.domain)
        key = (name, rcpt.domain)
        if key not in groups:
            transport = config.transport(name)
            groups[key] = DeliveryGroup(
                transport=name,
                domain=rcpt.domain,
                recipients=[],
                schedule=transport.schedule,
                on_give_up=transport.on_give_up,
                max_age_seconds=(
                    int(transport.max_age.total_seconds()) if transport.max_age else None
                ),
                delay_warning_seconds=(
                    int(transport.delay_warning_after.total_seconds())
                    if transport.delay_warning_after
                    else None
                ),
            )
        if all(r.address != rcpt.address for r in groups[key].recipients):
            groups[key].recipients.append(rcpt)
    return list(groups.values())

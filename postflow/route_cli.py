"""`postflow route ADDRESS`: shows where mail for an address would go, through the worker's code.

Read-only: it resolves exactly as a delivery attempt would (same activity code, same
transport settings) and sends nothing. Exit status 0 deliverable, 2 permanent, 1 temporary.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from activities.resolve import ResolveActivities
from postflow.config import Config
from postflow.models import ResolveRequest, ResolveResult
from postflow.routing import transport_for

__all__ = ["EXIT_OK", "EXIT_PERMANENT", "EXIT_TEMPORARY", "format_route", "run_route"]

EXIT_OK = 0
EXIT_TEMPORARY = 1
EXIT_PERMANENT = 2


def run_route(config: Config, address: str, out: TextIO = sys.stdout) -> int:
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        print(f"postflow route: {address!r} is not a mail address (local@domain)", file=sys.stderr)
        return EXIT_PERMANENT
    transport = transport_for(config, domain)
    # The activity's own entry point: soft_bounce and all, exactly what an attempt would see.
    request = ResolveRequest(transport=transport, domain=domain)
    result = asyncio.run(ResolveActivities(config).resolve_destination(request))
    out.write(format_route(config, address.strip(), transport, result))
    if result.error is None:
        return EXIT_OK
    return EXIT_PERMANENT if result.error.permanent else EXIT_TEMPORARY


def format_route(config: Config, address: str, transport: str, result: ResolveResult) -> str:
    settings = config.transport(transport)
    lines = [
        f"address      {address}",
        f"transport    {transport}",
        f"destination  {settings.destination}",
    ]
    if result.hosts:
        lines.append("hosts        in the order they are tried (equal preferences shuffled):")
        for host in result.hosts:
            addresses = ", ".join(f"[{a}]" if ":" in a else a for a in host.addresses)
            lines.append(f"  {host.preference:>5}  {host.name}  port {host.port}  {addresses}")
    lines.extend(f"note         {note}" for note in result.notes)
    error = result.error
    if error is None:
        lines.append("result       deliverable")
    else:
        kind = "permanent" if error.permanent else "temporary"
        code = f"{error.code} " if error.code else ""
        lines.append(f"result       {kind} failure {code}{error.enhanced}: {error.text}")
    return "\n".join(lines) + "\n"

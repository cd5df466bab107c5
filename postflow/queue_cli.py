"""The operator's queue commands: `queue`, `show`, `pause`, `resume`, `retry`, `bounce`,
`delete`, `setup` (Postfix's mailq, postqueue -f, postsuper -h/-H/-d). Parsing and printing
only; `postflow.queue_ops` talks to Temporal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from postflow.config import Config

if TYPE_CHECKING:
    from temporalio.client import Client

    from postflow.queue_ops import MessageView, QueueRow

__all__ = ["add_queue_commands", "format_show", "format_table"]

T = TypeVar("T")


# ---- printing ---------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _short(value: datetime | None) -> str:
    return value.astimezone().strftime("%m-%d %H:%M:%S") if value else "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _recipients(row: QueueRow) -> str:
    shown = row.recipients or [f"*@{d}" for d in row.domains]
    if not shown:
        return "-"
    return shown[0] + (f" (+{len(shown) - 1})" if len(shown) > 1 else "")


def format_table(rows: list[QueueRow], paused_scopes: list[str] | None = None) -> str:
    """A mailq-like table: one line per message, the last error cut to fit."""
    header = (
        "Queue ID",
        "Arrival",
        "Sender",
        "Recipients",
        "Transport",
        "State",
        "Att",
        "Next attempt",
        "Last error",
    )
    # Queue ids are never cut: operators copy them into the next command.
    id_width = max([8, *(len(r.queue_id) for r in rows)])
    widths = (id_width, 14, 24, 28, 10, 12, 3, 14, 60)
    lines = []
    if paused_scopes:
        lines.append(f"paused scopes: {', '.join(paused_scopes)}")
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for row in rows:
        state = row.state + ("*" if row.state == "paused" and "message" in row.paused_by else "")
        state += " P" if row.priority else ""
        cells = (
            row.queue_id,
            _short(row.arrival),
            row.sender or "<>",
            _recipients(row),
            ",".join(row.transports) or "-",
            state or "-",
            str(row.attempts),
            _short(row.next_attempt_at),
            row.last_error or "",
        )
        lines.append(
            "  ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
        )
    paused = sum(r.state == "paused" for r in rows)
    lines.append(f"-- {len(rows)} message(s)" + (f", {paused} paused" if paused else ""))
    return "\n".join(lines)


def format_show(view: MessageView) -> str:
    from postflow.queue_ops import reply_line

    row, report = view.row, view.report
    held = f" (by {', '.join(row.paused_by)})" if row.paused_by else ""
    lines = [
        f"queue id      {row.queue_id}",
        f"workflow      {view.workflow_id} ({row.status.lower()})",
        f"web ui        {view.web_ui}",
        f"arrival       {_when(row.arrival)}",
        f"sender        {row.sender or '<>'}",
        f"transport     {', '.join(row.transports) or '-'}",
        f"state         {row.state or '-'}{held}",
        f"priority      {'yes (postflow-priority)' if row.priority else 'no'}",
        f"attempts      {row.attempts}",
        f"next attempt  {_when(row.next_attempt_at)}",
    ]
    if report is None:
        lines.append("status        unavailable (no worker answered the status query)")
        return "\n".join(lines)
    lines.extend(f"note          {note}" for note in report.notes)
    lines.append("recipients")
    for r in report.recipients:
        lines.append(
            f"  {r.address}  {r.state.value}  attempts {r.attempts}  transport {r.transport}"
        )
        if r.code or r.text:
            stage = f" (at {r.stage})" if r.stage else ""
            lines.append(f"    last reply  {reply_line(r)}{stage}")
        if r.remote_host or r.remote_ip:
            lines.append(f"    host tried  {r.remote_host or '-'} [{r.remote_ip or '-'}]")
        if r.last_attempt_at:
            lines.append(f"    last try    {_when(r.last_attempt_at)}")
        if r.note:
            lines.append(f"    note        {r.note}")
    return "\n".join(lines)


# ---- running ----------------------------------------------------------------------------


def _run(config: Config, work: Callable[[Client], Awaitable[int]]) -> int:
    from temporalio.service import RPCError

    from postflow.queue_ops import QueueError
    from postflow.temporal import connect

    async def _main() -> int:
        try:
            client = await connect(config)
        except RuntimeError as exc:
            print(
                f"postflow: cannot reach Temporal at {config.temporal.address}: {exc}",
                file=sys.stderr,
            )
            return 1
        try:
            return await work(client)
        except QueueError as exc:
            print(f"postflow: {exc}", file=sys.stderr)
            return 1
        except RPCError as exc:
            print(f"postflow: Temporal said: {exc}", file=sys.stderr)
            return 1

    return asyncio.run(_main())


def _ui_base(config: Config) -> str:
    from postflow.destination import parse_host_port

    host = parse_host_port(config.temporal.address, 7233).host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.temporal.ui_port}"


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _queue(args: argparse.Namespace, config: Config) -> int:
    from postflow.queue_ops import control_state, list_queue

    async def work(client: Client) -> int:
        rows = await list_queue(
            client,
            state=args.state,
            transport=args.transport,
            domain=args.domain,
            mail_from=args.mail_from,
            limit=args.limit,
        )
        control = await control_state(client)
        scopes = sorted(control.scopes) if control else []
        if args.json:
            print(
                _dump(
                    {
                        "paused_scopes": scopes,
                        "messages": [r.model_dump(mode="json") for r in rows],
                    }
                )
            )
        else:
            print(format_table(rows, scopes))
        return 0

    return _run(config, work)


def _show(args: argparse.Namespace, config: Config) -> int:
    from postflow.queue_ops import show_message

    async def work(client: Client) -> int:
        view = await show_message(client, args.id, _ui_base(config))
        print(_dump(view.model_dump(mode="json")) if args.json else format_show(view))
        return 0

    return _run(config, work)


def _scope(args: argparse.Namespace, config: Config) -> str | None:
    """The scope the target flags name, or None for a queue id; exits on a bad name."""
    if getattr(args, "all", False):
        return "all"
    if getattr(args, "transport", None):
        if args.transport not in config.transports:
            known = ", ".join(sorted(config.transports))
            print(
                f"postflow: --transport {args.transport!r}: no such transport (known: {known})",
                file=sys.stderr,
            )
            sys.exit(2)
        return f"transport:{args.transport}"
    if getattr(args, "domain", None):
        return f"domain:{args.domain.lower().rstrip('.')}"
    return None


_DONE = {"pause": "paused", "resume": "resumed", "retry": "flushed", "bounce": "bounced"}


def _control(args: argparse.Namespace, config: Config) -> int:
    from postflow.queue_ops import control_scope, control_state, signal_message
    from postflow.signals import ScopeError

    verb = args.command
    scope = _scope(args, config)

    async def work(client: Client) -> int:
        if scope is None:
            await signal_message(client, args.id, verb, reason=args.reason)
            print(f"{args.id}: {_DONE.get(verb, verb + 'd')}")
            return 0
        try:
            result = await control_scope(
                client,
                verb,
                scope,
                reason=args.reason,
                wait=not args.no_wait,
                on_slow=lambda: print(
                    "still signalling (is a worker serving postflow-control running?)",
                    file=sys.stderr,
                ),
            )
        except ScopeError as exc:
            print(f"postflow: {exc}", file=sys.stderr)
            return 2
        if result is None:
            print(f"{scope}: {verb} accepted; running messages are being signalled")
        elif result.error:
            print(f"postflow: {scope}: {verb} recorded, signalling failed: {result.error}")
            return 1
        else:
            print(
                f"{scope}: {_DONE[verb]}; {result.signalled} queued message(s) signalled "
                f"in {result.seconds:.1f} s"
            )
        if verb == "pause":
            print("mail arriving for it is held too, until `postflow resume` with the same scope")
        if verb == "resume":
            state = await control_state(client)
            if state and state.scopes:
                print(f"still paused: {', '.join(sorted(state.scopes))}")
        return 0

    return _run(config, work)


def _setup(args: argparse.Namespace, config: Config) -> int:
    from postflow.queue_ops import setup_cluster

    async def work(client: Client) -> int:
        for line in await setup_cluster(client, retention_days=args.retention_days):
            print(line)
        return 0

    return _run(config, work)


# ---- arguments --------------------------------------------------------------------------


def _target(parser: argparse.ArgumentParser, *, scopes: bool) -> None:
    if not scopes:
        parser.add_argument("id", help="queue id")
    else:
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("id", nargs="?", help="queue id")
        group.add_argument("--transport", metavar="NAME", help="every message of a transport")
        group.add_argument("--domain", help="every message with recipients at DOMAIN")
        group.add_argument("--all", action="store_true", help="every message")
        parser.add_argument(
            "--no-wait", action="store_true", help="return before every message is signalled"
        )
    parser.add_argument("--reason", help="recorded with the signal, shown in the history")


def add_queue_commands(sub: Any) -> None:
    """Adds the queue commands to `postflow`'s subcommands; each sets `run`."""
    queue = sub.add_parser("queue", help="list queued messages, like mailq")
    queue.add_argument("--state", help="queued, sending, deferred, paused, delivered, failed, ...")
    queue.add_argument("--transport", metavar="NAME")
    queue.add_argument("--domain", help="recipient domain")
    queue.add_argument("--from", dest="mail_from", metavar="ADDRESS", help="envelope sender")
    queue.add_argument("--limit", type=int, default=100)
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.set_defaults(run=_queue)

    show = sub.add_parser("show", help="one message's live status and its Web UI link")
    show.add_argument("id", help="queue id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_show)

    for verb, text in (
        ("pause", "hold mail (postsuper -h); a scope also holds mail arriving later"),
        ("resume", "release held mail (postsuper -H): exactly what that scope paused"),
        ("retry", "attempt deferred mail now (postqueue -f)"),
    ):
        parser = sub.add_parser(verb, help=text)
        _target(parser, scopes=True)
        parser.set_defaults(run=_control)
    for verb, text in (
        ("bounce", "give up now: failed recipients get the transport's give-up action"),
        ("delete", "discard a message silently (postsuper -d)"),
    ):
        parser = sub.add_parser(verb, help=text)
        _target(parser, scopes=False)
        parser.set_defaults(run=_control)

    setup = sub.add_parser(
        "setup", help="register the namespace and search attributes on a Temporal cluster"
    )
    setup.add_argument("--retention-days", type=int, default=3, help="for a new namespace")
    setup.set_defaults(run=_setup)

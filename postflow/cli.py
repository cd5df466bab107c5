"""The `postflow` command: one subcommand per job, like Postfix's small programs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from postflow.config import Config, ConfigError, load_config

__all__ = ["main"]

Command = Callable[[argparse.Namespace, Config], int]


def _config_check(args: argparse.Namespace, config: Config) -> int:
    from postflow.destination import parse_destination
    from postflow.schedule import format_minutes

    print(f"{args.config or 'postflow.toml'}: ok")
    for name, transport in config.transports.items():
        destination = parse_destination(transport.destination)
        words = transport.schedule.describe()
        if transport.max_age is not None:
            # Whichever limit comes first decides when the transport gives up.
            age = format_minutes(transport.max_age)
            if transport.max_age < transport.schedule.give_up_after:
                words += f"; max_age {age} comes first: gives up {age} after arrival"
            else:
                words += f"; max_age {age} (the retries end first)"
        if transport.delay_warning_after is not None:
            words += f"; delay warning after {format_minutes(transport.delay_warning_after)}"
        print(f"{name}: {transport.destination}; {words}; on give up: {transport.on_give_up}")
        del destination
    for route in config.routes:
        print(f"route {', '.join(route.domains)} → {route.transport}")
    from postflow.priority import describe_rule

    if not config.priority:
        print("priority: no rules; every message is ordinary")
    for i, rule in enumerate(config.priority):
        print(f"priority.{i}: prioritized when {describe_rule(rule)}")
    return 0


def _send(args: argparse.Namespace, config: Config) -> int:
    from postflow.temporal import connect
    from starter.submit import SubmitError, Submitter

    data = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()

    async def _run() -> int:
        client = await connect(config)
        try:
            queue_id = await Submitter(client, config).submit(args.mail_from, args.to, data)
        except SubmitError as exc:
            print(f"postflow send: not queued: {exc}", file=sys.stderr)
            return 1
        print(f"queued as {queue_id}")
        return 0

    return asyncio.run(_run())


def _worker(args: argparse.Namespace, config: Config) -> int:
    from worker import run_worker

    asyncio.run(run_worker(config))
    return 0


def _ingest(args: argparse.Namespace, config: Config) -> int:
    from starter.ingest import run_ingest

    asyncio.run(run_ingest(config))
    return 0


def _passwd(args: argparse.Namespace, config: Config) -> int:
    import getpass

    from postflow.passwd import PasswordFile, PasswordFileError, valid_username

    path = args.file or config.ingest.users_file
    if not path:
        print("postflow passwd: set [ingest] users_file or give --file", file=sys.stderr)
        return 2
    if not valid_username(args.user):
        print(f"postflow passwd: {args.user!r}: no spaces, colons or controls", file=sys.stderr)
        return 2
    users = PasswordFile(path)
    try:
        if args.delete:
            found = users.remove(args.user)
            print(f"{path}: {args.user} {'removed' if found else 'not found'}")
            return 0 if found else 1
        if sys.stdin.isatty():
            password = getpass.getpass(f"Password for {args.user}: ")
            if getpass.getpass("Again: ") != password:
                print("postflow passwd: the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("postflow passwd: empty password", file=sys.stderr)
            return 1
        users.set(args.user, password)
    except (OSError, PasswordFileError) as exc:
        print(f"postflow passwd: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {args.user} set")
    return 0


def _sink(args: argparse.Namespace, config: Config) -> int:
    from postflow.config import SinkSettings
    from postflow.sink import run_sink

    settings = config.sink or SinkSettings()
    if args.listen:
        settings = settings.model_copy(update={"listen": args.listen})
    if args.path:
        settings = settings.model_copy(update={"path": args.path})
    asyncio.run(run_sink(settings))
    return 0


def _up(args: argparse.Namespace, config: Config) -> int:
    from postflow.up import run_up

    return run_up(config, args.config)


def _route(args: argparse.Namespace, config: Config) -> int:
    from postflow.route_cli import run_route

    return run_route(config, args.address)


def _sweep(args: argparse.Namespace, config: Config) -> int:
    from postflow.sweep import run_sweep

    return run_sweep(config, args.grace, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postflow", description=__doc__)
    parser.add_argument(
        "--config", help="configuration file (default: $POSTFLOW_CONFIG or postflow.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("up", help="start dev server + Web UI, worker, ingest and sink").set_defaults(
        run=_up
    )
    sub.add_parser("worker", help="run a worker").set_defaults(run=_worker)
    sub.add_parser("ingest", help="run the SMTP ingest").set_defaults(run=_ingest)
    passwd = sub.add_parser("passwd", help="set an SMTP AUTH user's password for the ingest")
    passwd.add_argument("user")
    passwd.add_argument("--file", help="users file (default: [ingest] users_file)")
    passwd.add_argument("--delete", action="store_true", help="remove the user")
    passwd.set_defaults(run=_passwd)
    sink = sub.add_parser("sink", help="run a capture SMTP server")
    sink.add_argument("--listen")
    sink.add_argument("--path")
    sink.set_defaults(run=_sink)

    send = sub.add_parser("send", help="queue a message file")
    send.add_argument("--from", dest="mail_from", required=True)
    send.add_argument("--to", action="append", required=True)
    send.add_argument("file", help="RFC 5322 message file, or - for standard input")
    send.set_defaults(run=_send)

    route = sub.add_parser("route", help="show the transport and hosts mail for ADDRESS would use")
    route.add_argument("address", help="a recipient address, e.g. bob@example.com")
    # Also accepted after the subcommand; SUPPRESS keeps the global --config when absent.
    route.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    route.set_defaults(run=_route)

    sweep = sub.add_parser("sweep", help="remove spool bodies that have no workflow")
    sweep.add_argument("--grace", help="leave bodies younger than this alone (default 10m)")
    sweep.add_argument("--dry-run", action="store_true", help="only list what would go")
    sweep.set_defaults(run=_sweep)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("check", help="validate and describe the configuration").set_defaults(
        run=_config_check
    )

    from postflow.queue_cli import add_queue_commands

    add_queue_commands(sub)
    from postflow.health import add_health_command

    add_health_command(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("POSTFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every command line at INFO, AUTH credentials included.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    code = args.run(args, config)
    sys.stdout.flush()
    sys.stderr.flush()
    # The Temporal SDK can abort at interpreter exit (sdk-python#300); everything is
    # flushed and shut down by now, so leave without running that teardown.
    os._exit(code)


if __name__ == "__main__":
    main()

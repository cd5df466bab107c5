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

    print(f"{args.config or 'postflow.toml'}: ok")
    for name, transport in config.transports.items():
        destination = parse_destination(transport.destination)
        words = transport.schedule.describe()
        if transport.max_age is not None:
            words += f"; max_age {transport.max_age}"
        print(f"{name}: {transport.destination}; {words}; on give up: {transport.on_give_up}")
        del destination
    for route in config.routes:
        print(f"route {', '.join(route.domains)} → {route.transport}")
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
    sink = sub.add_parser("sink", help="run a capture SMTP server")
    sink.add_argument("--listen")
    sink.add_argument("--path")
    sink.set_defaults(run=_sink)

    send = sub.add_parser("send", help="queue a message file")
    send.add_argument("--from", dest="mail_from", required=True)
    send.add_argument("--to", action="append", required=True)
    send.add_argument("file", help="RFC 5322 message file, or - for standard input")
    send.set_defaults(run=_send)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("check", help="validate and describe the configuration").set_defaults(
        run=_config_check
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("POSTFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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

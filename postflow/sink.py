"""`postflow sink`: a capture SMTP server, like Postfix's smtp-sink, that keeps what it gets.

Each message is written to `<path>/<n>-<queue>.eml` with the envelope in `X-Sink-*` lines
above it removed from nothing: the file holds exactly the bytes received, and a sidecar
`.json` holds the envelope.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from postflow.config import SinkSettings
from postflow.destination import parse_host_port

__all__ = ["SinkHandler", "run_sink", "start_sink"]

log = logging.getLogger("postflow.sink")


class SinkHandler:
    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count(int(time.time() * 1000))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        number = next(self._counter)
        body = envelope.original_content or b""
        (self.root / f"{number}.eml").write_bytes(body)
        (self.root / f"{number}.json").write_text(
            json.dumps(
                {
                    "mail_from": envelope.mail_from,
                    "rcpt_tos": envelope.rcpt_tos,
                    "peer": str(session.peer),
                    "received_at": time.time(),
                    "size": len(body),
                }
            )
        )
        log.info("sink got %s → %s (%d bytes)", envelope.mail_from, envelope.rcpt_tos, len(body))
        return f"250 2.0.0 Ok: kept as {number}"


async def start_sink(settings: SinkSettings) -> asyncio.Server:
    listen = parse_host_port(settings.listen, 25)
    handler = SinkHandler(settings.path)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, decode_data=False, ident="Postflow sink"),
        listen.host,
        listen.port,
    )


async def run_sink(settings: SinkSettings) -> None:
    server = await start_sink(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("sink listening on %s, keeping mail in %s", settings.listen, settings.path)
    await stop.wait()
    server.close()

"""The SMTP ingest (`postflow ingest`): accepts mail and hands it to `Submitter`.

Answers 250 only after the body is stored and the workflow started; 451 otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from postflow.config import Config, load_config
from postflow.destination import parse_host_port
from postflow.models import Recipient
from postflow.temporal import connect
from starter.submit import SubmitError, Submitter

__all__ = ["IngestHandler", "run_ingest", "start_ingest"]

log = logging.getLogger("postflow.ingest")


class IngestHandler:
    def __init__(self, submitter: Submitter, config: Config) -> None:
        self._submitter = submitter
        self._config = config

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self._config.ingest.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        try:
            queue_id = await self._submitter.submit(
                envelope.mail_from or "",
                [Recipient(address=a) for a in envelope.rcpt_tos],
                data,
                smtputf8=envelope.smtp_utf8,
            )
        except SubmitError as exc:
            log.warning("not queued (%s): %s", session.peer, exc)
            if exc.temporary:
                return "451 4.3.0 Not queued: try again later"
            return "554 5.0.0 Not queued"
        log.info(
            "queued %s from %s for %d recipients", queue_id, session.peer, len(envelope.rcpt_tos)
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"


def _smtp_factory(handler: IngestHandler, config: Config) -> Any:
    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname=config.ingest.hostname or config.smtp.helo_name,
            data_size_limit=config.ingest.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=config.ingest.idle_timeout.total_seconds(),
            ident="Postflow ESMTP",
        )

    return factory


async def start_ingest(submitter: Submitter, config: Config) -> asyncio.Server:
    listen = parse_host_port(config.ingest.listen, 25)
    handler = IngestHandler(submitter, config)
    loop = asyncio.get_running_loop()
    return await loop.create_server(_smtp_factory(handler, config), listen.host, listen.port)


async def run_ingest(config: Config) -> None:
    client = await connect(config)
    server = await start_ingest(Submitter(client, config), config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ingest listening on %s", config.ingest.listen)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(config_path: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_ingest(load_config(config_path)))

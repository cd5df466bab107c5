"""A raw SMTP client for the fault scenarios: sends bursts and can stop in the middle of DATA.

Records exactly what the ingest answered to each message (code, text, queue id), which is
what a sending MTA would believe: a 250 means "your message is safe now".
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass, field

__all__ = ["Burst", "Outcome", "SmtpSession", "make_message", "send_burst", "send_one"]

_QUEUED = re.compile(r"queued as (\S+)")


@dataclass
class Outcome:
    """What the client learnt about one message."""

    message_id: str
    rcpt: str
    code: int | None = None  # None: the connection broke before a final reply
    text: str = ""
    stage: str = ""
    queue_id: str | None = None
    answered_at: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.code == 250


def make_message(tag: str, n: int, size: int = 0) -> tuple[str, bytes]:
    """A message with a unique Message-ID; `size` pads the body to about that many bytes."""
    message_id = f"<{tag}-{n}-{secrets.token_hex(4)}@faults.test>"
    lines = [
        b"From: Fault Test <sender@faults.test>",
        f"To: r{n}@dest.test".encode(),
        f"Subject: {tag} message {n}".encode(),
        f"Message-ID: {message_id}".encode(),
        b"",
        f"Message {n} of the {tag} scenario.".encode(),
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    while len(body) < size:
        body += b"." + b"x" * 70 + b"\r\n"  # leading dots: dot-stuffing exercised too
    return message_id, body


class SmtpSession:
    """One SMTP connection, driven step by step."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _reply(self) -> tuple[int, str]:
        assert self.reader is not None
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise ConnectionResetError("connection closed by the server")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if len(text) < 4 or text[3] != "-":
                return int(text[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        assert self.writer is not None
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()
        return await self._reply()

    async def open(self) -> tuple[int, str]:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout
        )
        code, text = await self._reply()
        if code != 220:
            return code, text
        return await self.command("EHLO client.faults.test")

    async def envelope(self, mail_from: str, rcpts: list[str]) -> tuple[int, str]:
        code, text = await self.command(f"MAIL FROM:<{mail_from}>")
        if code != 250:
            return code, text
        for rcpt in rcpts:
            code, text = await self.command(f"RCPT TO:<{rcpt}>")
            if code != 250:
                return code, text
        return await self.command("DATA")

    async def send_body(self, data: bytes, *, finish: bool = True) -> None:
        """Writes the dot-stuffed body; with `finish`, the final dot as well."""
        assert self.writer is not None
        # Only CRLF ends a line in SMTP: a dot after a bare CR or LF is not stuffed.
        if finish and not data.endswith(b"\r\n"):
            data += b"\r\n"
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n")
        )
        self.writer.write(stuffed + (b".\r\n" if finish else b""))
        await self.writer.drain()

    async def final_reply(self) -> tuple[int, str]:
        return await self._reply()

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            await self.writer.drain()
            await asyncio.wait_for(self.reader.read(), 2)  # type: ignore[union-attr]
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        self.writer.close()


async def send_one(
    host: str,
    port: int,
    message_id: str,
    rcpt: str,
    data: bytes,
    *,
    mail_from: str = "sender@faults.test",
    reply_wait: float = 60.0,
) -> Outcome:
    """One message on its own connection; never raises, the outcome says what happened."""
    loop = asyncio.get_running_loop()
    outcome = Outcome(message_id=message_id, rcpt=rcpt)
    session = SmtpSession(host, port, reply_wait)
    try:
        outcome.stage = "connect"
        code, text = await session.open()
        if code == 250:
            outcome.stage = "envelope"
            code, text = await session.envelope(mail_from, [rcpt])
        if code == 354:
            outcome.stage = "data"
            await session.send_body(data)
            code, text = await session.final_reply()
        outcome.code, outcome.text = code, text
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        outcome.text = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.answered_at = loop.time()
        await session.close()
    match = _QUEUED.search(outcome.text)
    if outcome.accepted and match:
        outcome.queue_id = match[1]
    return outcome


@dataclass
class Burst:
    outcomes: list[Outcome] = field(default_factory=list)
    sent: int = 0


async def send_burst(
    host: str,
    port: int,
    tag: str,
    count: int,
    *,
    concurrency: int = 10,
    size: int = 0,
    burst: Burst | None = None,
    reply_wait: float = 60.0,
) -> Burst:
    """`count` messages, each on its own connection, `concurrency` at a time; `burst` fills
    as answers arrive, so another task can watch progress and strike mid-burst."""
    burst = burst or Burst()
    limit = asyncio.Semaphore(concurrency)

    async def _one(n: int) -> None:
        async with limit:
            message_id, data = make_message(tag, n, size)
            burst.sent += 1
            burst.outcomes.append(
                await send_one(
                    host, port, message_id, f"r{n}@dest.test", data, reply_wait=reply_wait
                )
            )

    await asyncio.gather(*(_one(n) for n in range(count)))
    return burst

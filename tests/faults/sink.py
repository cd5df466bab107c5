"""A loopback SMTP sink that records every message by Message-ID, and misbehaves on request.

Hand-written rather than aiosmtpd so that a fault can strike at any byte: cut the connection
in the middle of DATA, answer slowly, or reset a connection it has accepted. Faults are
scripted per recipient and attempt (`plan[rcpt] = ["drop-data"]`: first attempt cut, the
second served), so a test knows which recipients must come back for a later attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["FAULTS", "Delivery", "RecordingSink"]

# drop-data: cut the connection (RST) after part of the body; slow-rcpt: answer RCPT after
# `slow_seconds`; slow-final: take the message at the final dot but answer only after
# `slow_seconds` (the client may have given up: a duplicate that only the sender can avoid);
# reset-rcpt: accept the recipient, then reset the connection at DATA; slow-ok: answer
# slowly but within the client's timeouts; reset-connect: reset right after accepting TCP.
FAULTS = ("drop-data", "slow-rcpt", "slow-final", "reset-rcpt", "slow-ok", "reset-connect")

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass
class Delivery:
    """One message the sink took (its final dot arrived and it counts it as accepted)."""

    message_id: str
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    connection: int
    final_dot_at: float  # time.monotonic()
    replied: bool = False


@dataclass
class _Conn:
    number: int
    past_final_dot: bool = False


@dataclass
class RecordingSink:
    host: str = "127.0.0.1"
    port: int = 0
    slow_seconds: float = 3.0
    slow_ok_seconds: float = 0.5
    ok_delay: float = 0.0  # delay before every 250 to DATA, to widen the window for kills
    keep_data: bool = True
    plan: dict[str, list[str]] = field(default_factory=dict)
    # Raw reply bytes to RCPT per recipient and attempt (None: accept), CRLFs included.
    rcpt_replies: dict[str, list[bytes | None]] = field(default_factory=dict)
    connect_faults: list[str] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    rcpt_attempts: Counter[str] = field(default_factory=Counter)
    faults_done: Counter[str] = field(default_factory=Counter)
    _raw_attempts: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _open: dict[int, _Conn] = field(default_factory=dict)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _next: int = 0

    # ---- what was received ------------------------------------------------------------------

    def by_message_id(self) -> Counter[str]:
        return Counter(d.message_id for d in self.deliveries)

    def open_sessions_past_final_dot(self) -> int:
        """Sessions still open whose message arrived: a client killed now sends it again."""
        return sum(c.past_final_dot for c in self._open.values())

    @property
    def destination(self) -> str:
        return f"server:{self.host}:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> RecordingSink:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> RecordingSink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the SMTP dialogue -------------------------------------------------------------------

    def _raw_reply_for(self, rcpt: str) -> bytes | None:
        replies = self.rcpt_replies.get(rcpt)
        if not replies:
            return None
        attempt = self._raw_attempts[rcpt]
        self._raw_attempts[rcpt] += 1
        return replies[attempt] if attempt < len(replies) else None

    def _fault_for(self, rcpt: str) -> str | None:
        self.rcpt_attempts[rcpt] += 1
        faults = self.plan.get(rcpt) or []
        attempt = self.rcpt_attempts[rcpt]
        return faults[attempt - 1] if attempt <= len(faults) else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next += 1
        conn = _Conn(self._next)
        self._open[conn.number] = conn
        self._writers.add(writer)
        try:
            if self.connect_faults:
                fault = self.connect_faults.pop(0)
                self.faults_done[fault] += 1
                _reset(writer)
                return
            await self._dialogue(conn, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass  # the sink is stopping: the session simply ends
        finally:
            self._open.pop(conn.number, None)
            self._writers.discard(writer)
            if not writer.is_closing():
                writer.close()

    async def _dialogue(
        self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        async def reply(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        await reply("220 sink.test ESMTP fault sink")
        mail_from, rcpts, fault = "", [], None
        while True:
            line = await asyncio.wait_for(reader.readline(), 120)
            if not line:
                return
            verb = line[:4].upper()
            arg = line[5:].strip().decode("utf-8", "replace")
            if verb in (b"EHLO", b"HELO"):
                await reply("250-sink.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 0")
            elif verb == b"MAIL":
                mail_from, rcpts, fault = _path(arg), [], None
                await reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                rcpt = _path(arg)
                raw = self._raw_reply_for(rcpt)
                if raw is not None:
                    writer.write(raw)
                    await writer.drain()
                    continue
                fault = self._fault_for(rcpt) or fault
                if fault == "slow-rcpt":
                    self.faults_done[fault] += 1
                    await asyncio.sleep(self.slow_seconds)
                    fault = None
                rcpts.append(rcpt)
                await reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                if fault == "reset-rcpt":
                    self.faults_done[fault] += 1
                    _reset(writer)
                    return
                await reply("354 End data with <CR><LF>.<CR><LF>")
                data = await self._read_data(reader, writer, fault)
                if data is None:
                    return
                conn.past_final_dot = True
                delivery = Delivery(
                    message_id=_message_id(data),
                    mail_from=mail_from,
                    rcpt_tos=list(rcpts),
                    data=data if self.keep_data else b"",
                    connection=conn.number,
                    final_dot_at=time.monotonic(),
                )
                self.deliveries.append(delivery)
                if fault in ("slow-final", "slow-ok"):
                    self.faults_done[fault] += 1
                    slow = self.slow_seconds if fault == "slow-final" else self.slow_ok_seconds
                    await asyncio.sleep(slow)
                elif self.ok_delay:
                    await asyncio.sleep(self.ok_delay)
                await reply("250 2.0.0 Ok: kept")
                delivery.replied = True
                conn.past_final_dot = False
                fault = None
            elif verb == b"RSET":
                mail_from, rcpts, fault = "", [], None
                await reply("250 2.0.0 Ok")
            elif verb == b"NOOP":
                await reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                await reply("221 2.0.0 Bye")
                return
            else:
                await reply("502 5.5.2 Command not implemented")

    async def _read_data(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: str | None
    ) -> bytes | None:
        """The message as sent, dot-unstuffed; None when the connection was cut by a fault."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = await asyncio.wait_for(reader.readline(), 120)
            if not line:
                return None
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
            size += len(line)
            if fault == "drop-data" and size >= 64:
                self.faults_done[fault] += 1
                _reset(writer)
                return None


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashed or firewalled server does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _path(arg: str) -> str:
    """The address in `FROM:<a@b> SIZE=1` or `TO:<"x>y"@b>`: up to the first '>' outside
    quotes (kept apart from Postflow's own parser, which is what is under test)."""
    _, _, rest = arg.partition(":")
    rest = rest.strip()
    if not rest.startswith("<"):
        return rest.split(" ")[0]
    quoted = escaped = False
    for i, ch in enumerate(rest[1:], 1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return rest[1:i]
    return rest[1:]


def _message_id(data: bytes) -> str:
    head = data.split(b"\r\n\r\n", 1)[0]
    match = _MESSAGE_ID.search(head)
    return match[1].decode("ascii", "replace") if match else ""

"""The mail transaction's bytes on an aiosmtplib connection: what aiosmtplib 5 lacks.

aiosmtplib reads one reply per command written, so it cannot pipeline (RFC 2920), and it
gives DATA one timeout where RFC 5321 §4.5.3.2 has three (initiation, each block, final
dot). `Wire` takes over the reading side of aiosmtplib's `SMTPProtocol` for the length of
one transaction: it queues every reply that arrives, in order, so commands can be written
together and their replies read afterwards, and it tracks flow control so the body is sent
block by block. aiosmtplib still owns the connection, TLS, EHLO, AUTH and QUIT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse

__all__ = [
    "BLOCK_SIZE",
    "Wire",
    "WireLost",
    "WireProtocolError",
    "WireTimeout",
    "command",
    "data_blocks",
    "parse_replies",
    "prepare_body",
]

BLOCK_SIZE = 64 * 1024
MAX_LINE = 8192
MAX_PENDING = 4 * MAX_LINE
_SEPARATORS = (b" ", b"-", b"\r", b"\n")


class WireLost(ConnectionError):
    """The server closed the connection."""


class WireTimeout(TimeoutError):
    """The server did not answer, or did not take data, in time."""


class WireProtocolError(ValueError):
    """The server's bytes are not SMTP replies."""


def command(verb: str, *args: str, utf8: bool = False) -> bytes:
    """One command line; ValueError for anything that could smuggle a second command."""
    line = " ".join((verb, *args)).encode("utf-8" if utf8 else "ascii")
    if COMMAND_INJECTION_REGEX.search(line):
        raise ValueError(f"{verb}: control character in command arguments")
    return line + b"\r\n"


def mail_command(sender: str, options: list[str], utf8: bool) -> bytes:
    return command("MAIL", "FROM:" + quote_address(sender), *options, utf8=utf8)


def rcpt_command(recipient: str, options: list[str], utf8: bool) -> bytes:
    return command("RCPT", "TO:" + quote_address(recipient), *options, utf8=utf8)


def prepare_body(message: bytes) -> bytes:
    """The DATA payload: CRLF line endings, dot-stuffed, with the final `.` line."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"


def data_blocks(payload: bytes, size: int = BLOCK_SIZE) -> Iterator[bytes]:
    view = memoryview(payload)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def parse_replies(buffer: bytearray) -> list[SMTPResponse]:
    """Removes every complete reply (multiline ones joined with newlines) from `buffer`."""
    replies: list[SMTPResponse] = []
    lines: list[str] = []
    start = consumed = 0
    while (end := buffer.find(b"\n", start)) != -1:
        line = bytes(buffer[start : end + 1])
        start = end + 1
        separator = line[3:4]
        if len(line) > MAX_LINE or not line[:3].isdigit() or separator not in _SEPARATORS:
            raise WireProtocolError(f"not an SMTP reply: {line[:80]!r}")
        lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
        if line[3:4] != b"-":
            replies.append(SMTPResponse(int(line[:3]), "\n".join(lines)))
            lines = []
            consumed = start
    del buffer[:consumed]
    if len(buffer) > MAX_PENDING:
        raise WireProtocolError("reply too long")
    return replies


class Wire:
    """Holds a connected protocol's input callbacks while a transaction runs (a `with` block)."""

    _HOOKS = ("data_received", "connection_lost", "pause_writing", "resume_writing")

    def __init__(self, protocol: SMTPProtocol) -> None:
        self._protocol = protocol
        self._buffer = bytearray()
        self._replies: asyncio.Queue[SMTPResponse | BaseException] = asyncio.Queue()
        self._failed: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._originals: dict[str, Any] = {}

    def __enter__(self) -> Wire:
        for name in self._HOOKS:
            self._originals[name] = getattr(self._protocol, name)
            # An instance attribute shadows the class's method: the transports look the
            # callbacks up on every call, so the protocol's own state keeps being updated
            # by the originals we forward to.
            setattr(self._protocol, name, getattr(self, f"_{name}"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for name in self._HOOKS:
            self._protocol.__dict__.pop(name, None)

    # ---- callbacks from the transport -------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._failed is not None:
            return
        self._buffer.extend(data)
        try:
            for reply in parse_replies(self._buffer):
                self._replies.put_nowait(reply)
        except WireProtocolError as exc:
            self._failed = exc
            self._replies.put_nowait(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._failed is None:
            lost = WireLost(f"connection lost: {exc}" if exc else "connection closed by server")
            self._failed = lost
            self._replies.put_nowait(lost)
        self._writable.set()
        self._originals["connection_lost"](exc)

    def _pause_writing(self) -> None:
        self._writable.clear()
        self._originals["pause_writing"]()

    def _resume_writing(self) -> None:
        self._writable.set()
        self._originals["resume_writing"]()

    # ---- used by the session ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        transport = self._protocol.transport
        if transport is None or transport.is_closing():
            raise WireLost("connection closed")
        self._protocol.write(data)

    async def drain(self, within: float) -> None:
        """Waits until the transport takes more data: the per-block timeout."""
        if not self._writable.is_set():
            try:
                await asyncio.wait_for(self._writable.wait(), within)
            except TimeoutError:
                raise WireTimeout(f"server took no data for {within:g} s") from None
        if self._failed is not None:
            raise self._failed

    async def reply(self, within: float) -> SMTPResponse:
        """The next reply in order, whether it arrived already or arrives `within` seconds."""
        if self._replies.empty() and self._failed is not None:
            raise self._failed
        try:
            item = await asyncio.wait_for(self._replies.get(), within)
        except TimeoutError:
            raise WireTimeout(f"no reply within {within:g} s") from None
        if isinstance(item, BaseException):
            # Keep it queued for the caller's next read as well.
            self._replies.put_nowait(item)
            raise item
        return item

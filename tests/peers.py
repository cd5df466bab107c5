"""Real SMTP peers on loopback for tests: an aiosmtpd server whose answers a test scripts.

`SmtpPeer(rcpt=...)` decides the RCPT reply per recipient and per attempt, so a test can
say "defer bob 3 times, then accept" without mocking aiosmtplib.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = ["Received", "SmtpPeer", "defer_times", "fixed"]

RcptScript = Callable[[str, int], str | None]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)


def fixed(reply: str) -> RcptScript:
    """The same reply on every attempt."""
    return lambda address, seen: reply


def defer_times(n: int, reply: str = "451 4.7.1 Try again later") -> RcptScript:
    """Defer the first `n` RCPTs of a recipient, then accept."""
    return lambda address, seen: reply if seen <= n else None


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.peer.rcpt_counts[address] += 1
        script = self.peer.scripts.get(address) or self.peer.default
        reply = script(address, self.peer.rcpt_counts[address]) if script else None
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.peer.data_reply:
            return self.peer.data_reply
        self.peer.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                mail_options=list(envelope.mail_options),
                rcpt_options=list(envelope.rcpt_options),
            )
        )
        self.peer.arrived.set()
        return "250 2.0.0 Ok: queued"


class SmtpPeer:
    """An aiosmtpd server on a loopback address; `received` holds what it accepted."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        scripts: dict[str, RcptScript] | None = None,
        default: RcptScript | None = None,
        data_reply: str | None = None,
        smtp_kwargs: dict | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.scripts = scripts or {}
        self.default = default
        self.data_reply = data_reply
        self.received: list[Received] = []
        self.rcpt_counts: Counter[str] = Counter()
        self.arrived = asyncio.Event()
        self._smtp_kwargs = smtp_kwargs or {}
        self._server: asyncio.Server | None = None

    @property
    def destination(self) -> str:
        return f"server:{self.host}:{self.port}"

    async def start(self) -> SmtpPeer:
        handler = _Handler(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(handler, enable_SMTPUTF8=True, decode_data=False, **self._smtp_kwargs),
            self.host,
            0,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> SmtpPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def delivered_to(self, address: str) -> int:
        return sum(address in r.rcpt_tos for r in self.received)

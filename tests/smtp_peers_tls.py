"""SMTP peers on loopback for the SMTP client tests: aiosmtpd with STARTTLS, AUTH, SIZE,
PIPELINING and DSN as options, one that refuses EHLO, one that drops the connection after
DATA, and a server that never sends a greeting. Each records what it saw. `run_send` runs
the `send_message` activity against them on a real spool."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import re
import secrets
import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session
from temporalio.testing import ActivityEnvironment

from activities.smtp import SmtpActivities
from postflow.config import Config
from postflow.models import MxHost, Recipient, SendRequest, SendResult
from postflow.spool import FsSpool, new_queue_id
from tests.certs import Issued, server_context
from tests.helpers import MESSAGE
from tests.peers import SmtpPeer, _Handler

__all__ = ["PeerOptions", "SilentServer", "SmtpTestPeer", "StallingServer", "mx", "run_send"]

_DSN_MAIL = re.compile(r"\s+((?:RET|ENVID)=\S+)", re.IGNORECASE)
_DSN_RCPT = re.compile(r"\s+((?:NOTIFY|ORCPT)=\S+)", re.IGNORECASE)


@dataclass
class PeerOptions:
    tls: Issued | None = None  # offer STARTTLS with this certificate
    require_client_cert: bool = False
    tls_max_version: ssl.TLSVersion | None = None
    users: dict[str, str] | None = None  # offer AUTH (PLAIN, LOGIN, CRAM-MD5) for these
    auth_require_tls: bool = True
    auth_exclude: list[str] = field(default_factory=list)
    size_limit: int = 0  # announce SIZE with this limit (0: no SIZE)
    smtputf8: bool = True
    pipelining: bool = False
    dsn: bool = False
    refuse_ehlo: bool = False
    mail_reply: str | None = None  # answer MAIL with this instead of 250
    drop_after_data: bool = False
    data_delay: float = 0.0  # seconds before answering the final dot


@dataclass
class Seen:
    """What the peer observed, for assertions."""

    helo_names: list[str] = field(default_factory=list)
    auth: list[tuple[str, str, bool]] = field(default_factory=list)  # mechanism, login, ok
    chunks: list[bytes] = field(default_factory=list)  # raw bytes as received, after TLS
    dsn_mail: list[str] = field(default_factory=list)
    dsn_rcpt: list[str] = field(default_factory=list)
    data_commands: int = 0
    tls_sessions: int = 0
    client_certs: list[dict[str, Any]] = field(default_factory=list)


class _PeerHandler(_Handler):
    def __init__(self, peer: SmtpTestPeer) -> None:
        super().__init__(peer)
        self.options = peer.options
        self.seen = peer.seen

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list[str]:
        self.seen.helo_names.append(f"EHLO {hostname}")
        if self.options.refuse_ehlo:
            return ["502 5.5.1 EHLO not implemented"]
        session.host_name = hostname
        if self.options.users is None:
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        extra = (["250-PIPELINING"] if self.options.pipelining else []) + (
            ["250-DSN"] if self.options.dsn else []
        )
        return responses[:-1] + extra + responses[-1:]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        self.seen.helo_names.append(f"HELO {hostname}")
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if self.options.mail_reply:
            return self.options.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.seen.data_commands += 1
        if self.options.data_delay:
            await asyncio.sleep(self.options.data_delay)
        if session.ssl is not None:
            self.seen.tls_sessions += 1
            if session.ssl.get("peercert"):
                self.seen.client_certs.append(session.ssl["peercert"])
        if self.options.drop_after_data:
            assert server.transport is not None
            server.transport.abort()
            return "250 never sent"
        return await super().handle_DATA(server, session, envelope)

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        challenge = f"<{secrets.token_hex(8)}@peer.test>".encode()
        response = await server.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=False)
        login, _, digest = bytes(response).decode().partition(" ")
        password = (self.options.users or {}).get(login)
        ok = password is not None and hmac.compare_digest(
            digest, hmac.new(password.encode(), challenge, "md5").hexdigest()
        )
        self.seen.auth.append(("CRAM-MD5", login, ok))
        return AuthResult(success=ok, handled=False)


class _PeerSMTP(SMTP):
    """aiosmtpd with a raw-bytes record and DSN parameters accepted when announced."""

    def __init__(self, handler: _PeerHandler, peer: SmtpTestPeer, **kwargs: Any) -> None:
        self._peer = peer
        super().__init__(handler, **kwargs)

    def data_received(self, data: bytes) -> None:
        self._peer.seen.chunks.append(data)
        super().data_received(data)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self._peer.options.dsn and arg:
            self._peer.seen.dsn_mail.extend(_DSN_MAIL.findall(arg))
            arg = _DSN_MAIL.sub("", arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if self._peer.options.dsn and arg:
            self._peer.seen.dsn_rcpt.extend(_DSN_RCPT.findall(arg))
            arg = _DSN_RCPT.sub("", arg)
        await super().smtp_RCPT(arg)


class SmtpTestPeer(SmtpPeer):
    """`SmtpPeer` (scripted RCPT replies, `received`) with the options above."""

    def __init__(self, host: str = "127.0.0.1", options: PeerOptions | None = None, **kw: Any):
        super().__init__(host, **kw)
        self.options = options or PeerOptions()
        self.seen = Seen()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        ok = (self.options.users or {}).get(login) == password
        self.seen.auth.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False)

    async def start(self) -> SmtpTestPeer:
        options = self.options
        kwargs: dict[str, Any] = {
            "hostname": "peer.test",
            "enable_SMTPUTF8": options.smtputf8,
            "decode_data": False,
            "data_size_limit": options.size_limit or None,
        }
        if options.tls is not None:
            context = server_context(options.tls, options.require_client_cert)
            if options.tls_max_version is not None:
                context.maximum_version = options.tls_max_version
            kwargs["tls_context"] = context
        if options.users is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = options.auth_require_tls
            kwargs["auth_exclude_mechanism"] = options.auth_exclude
        else:
            kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN", "CRAM-MD5"]
        handler = _PeerHandler(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _PeerSMTP(handler, self, **kwargs), self.host, 0
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> SmtpTestPeer:
        return await self.start()


class SilentServer:
    """Accepts connections and never says a word: the greeting timeout's peer."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.read()
        finally:
            writer.close()

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._hold, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def mx(peer: SmtpPeer | SilentServer | StallingServer, name: str = "mx.dest.test") -> MxHost:
    """The peer as a resolved host named `name` (what a certificate is checked against)."""
    return MxHost(name=name, addresses=[peer.host], port=peer.port)


async def run_send(
    config: Config,
    hosts: list[MxHost],
    recipients: list[str] | list[Recipient] | None = None,
    data: bytes = MESSAGE,
    heartbeat_timeout: float = 1.0,
    start_to_close: float = 60.0,
    transport: str = "default",
    **request: Any,
) -> tuple[SendResult, list[str]]:
    """Runs `send_message` as an activity on a real spool; returns its result and heartbeats."""
    spool = FsSpool(config.spool.path)
    key = new_queue_id()
    spool.store(key, data)
    env = ActivityEnvironment()
    env.info = dataclasses.replace(
        env.info,
        start_to_close_timeout=timedelta(seconds=start_to_close),
        heartbeat_timeout=timedelta(seconds=heartbeat_timeout),
    )
    beats: list[str] = []
    env.on_heartbeat = lambda *details: beats.append(str(details[0]) if details else "")
    rcpts = [
        Recipient(address=r) if isinstance(r, str) else r
        for r in (recipients if recipients is not None else ["bob@dest.test"])
    ]
    req = SendRequest(
        queue_id=key,
        spool_key=key,
        transport=transport,
        domain=rcpts[0].domain,
        mail_from=request.pop("mail_from", "alice@sender.test"),
        recipients=rcpts,
        hosts=hosts,
        attempt=1,
        size=len(data),
        **request,
    )
    result = await env.run(SmtpActivities(config, spool).send_message, req)
    return result, beats


class StallingServer:
    """Speaks just enough SMTP to get to DATA, then stops reading: the block timeout's peer."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await self._stop.wait()
                    break
                writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 stall.test\r\n")
        finally:
            writer.close()

    async def __aenter__(self) -> StallingServer:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

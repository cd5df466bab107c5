"""The SMTP ingest (`postflow ingest`): who may send, and 250 only for mail made durable.

Relay control (trusted networks, else AUTH after STARTTLS), recipient and session caps,
and queueing through `Submitter`: `250 2.0.0 Ok: queued as <id>` only after the body is
fsynced and the workflow started, 451 (and nothing kept) otherwise. SIGTERM drains: no new
sessions, transactions in progress finish, then the process exits. The SMTP dialogue
itself is `starter/ingest_smtp.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
from typing import Any

from aiosmtpd.smtp import Session
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from postflow.config import Config, ConfigError, load_config
from postflow.destination import parse_host_port
from postflow.models import Recipient
from postflow.passwd import PasswordFile, PasswordFileError
from starter.ingest_smtp import IngestSMTP, Listener, Transaction, peer_ip
from starter.submit import SubmitError, Submitter

__all__ = ["Ingest", "IngestHandler", "run_ingest", "start_ingest"]

log = logging.getLogger("postflow.ingest")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class IngestHandler:
    """The ingest's policy: relay control, the recipient cap, AUTH and queueing."""

    def __init__(
        self,
        submitter: Submitter,
        config: Config,
        users: PasswordFile | None = None,
        submissions: set[asyncio.Task[Any]] | None = None,
    ) -> None:
        self._submitter = submitter
        self._settings = config.ingest
        self._users = users
        self._networks: list[Network] = [
            ipaddress.ip_network(n, strict=False) for n in config.ingest.allow_networks
        ]
        self.submissions = submissions if submissions is not None else set()

    def trusted(self, session: Session) -> bool:
        address = _ip(peer_ip(session))
        return address is not None and any(address in n for n in self._networks)

    async def accept_recipient(
        self, server: IngestSMTP, session: Session, tx: Transaction, rcpt: Recipient
    ) -> str:
        if not (session.authenticated or self.trusted(session)):
            log.info("reject RCPT <%s>: relay denied, client=%s", rcpt.address, peer_ip(session))
            return f"554 5.7.1 <{rcpt.address}>: Relay access denied"
        if any(r.address == rcpt.address for r in tx.recipients):
            return "250 2.1.5 Ok"  # the same recipient twice is delivered once
        if len(tx.recipients) >= self._settings.max_recipients:
            return "452 4.5.3 Error: too many recipients"
        tx.recipients.append(rcpt)
        tx.rcpt_tos.append(rcpt.address)
        return "250 2.1.5 Ok"

    async def queue_message(self, server: IngestSMTP, session: Session, tx: Transaction) -> str:
        assert tx.mail_from is not None and tx.original_content is not None
        data, queue_id = tx.original_content, tx.queue_id
        # Shielded: a client that hangs up mid-way must not leave a half-queued message.
        task = asyncio.ensure_future(
            self._submitter.submit(
                tx.mail_from,
                list(tx.recipients),
                data,
                ret=tx.params.ret,
                envid=tx.params.envid,
                smtputf8=tx.smtp_utf8,
                queue_id=queue_id,
            )
        )
        self.submissions.add(task)
        task.add_done_callback(self.submissions.discard)
        try:
            queue_id = await asyncio.shield(task)
        except SubmitError as exc:
            log.warning("%s: not queued: %s, client=%s", queue_id, exc, peer_ip(session))
            if exc.no_space:
                return "452 4.3.1 Error: insufficient system storage, try again later"
            if exc.temporary:
                return "451 4.3.0 Error: queue file write error or queue unavailable, try again"
            return "554 5.3.0 Error: message not accepted"
        log.info(
            "%s: queued from=<%s> size=%d nrcpt=%d client=%s helo=%s%s",
            queue_id,
            tx.mail_from,
            len(data),
            len(tx.recipients),
            peer_ip(session),
            session.host_name,
            f" sasl_username={session.auth_data}" if session.authenticated else "",
        )
        return f"250 2.0.0 Ok: queued as {queue_id}"

    async def check_login(self, user: str, password: bytes) -> bool:
        if self._users is None:
            return False
        try:
            return await asyncio.to_thread(self._users.check, user, password)
        except PasswordFileError as exc:
            log.error("AUTH unavailable: %s", exc)
            return False

    async def handle_exception(self, error: Exception) -> str:
        log.error("session error: %r", error, exc_info=error)
        return "451 4.3.0 Error: local error in processing"


def _tls_context(config: Config) -> ssl.SSLContext | None:
    settings = config.ingest
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "[ingest]",
            [f"ingest.tls_cert_file/tls_key_file: {settings.tls_cert_file!r}: {exc}"],
        ) from None
    return context


def _users(config: Config) -> PasswordFile | None:
    if not config.ingest.users_file:
        return None
    users = PasswordFile(config.ingest.users_file)
    try:
        users.load()
    except PasswordFileError as exc:
        raise ConfigError("[ingest]", [f"ingest.users_file: {exc}"]) from None
    return users


class _Refuse(asyncio.Protocol):
    """Over the session cap: say so and hang up, before any SMTP state exists."""

    def __init__(self, reply: bytes) -> None:
        self._reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self._reply)  # type: ignore[attr-defined]
        transport.close()


class _DropLoginDataWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


class Ingest:
    """The running ingest: its listeners, live sessions and the submissions in flight."""

    def __init__(
        self, submitter: Submitter, config: Config, *, users: PasswordFile | None = None
    ) -> None:
        self._config = config
        self._users = users if users is not None else _users(config)
        self._tls = _tls_context(config)
        self.sessions: set[IngestSMTP] = set()
        self.handler = IngestHandler(submitter, config, self._users)
        self.addresses: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        self._all_ended = asyncio.Event()
        mail_log = logging.getLogger("mail.log")
        # aiosmtpd logs every command at INFO (addresses included); our own log suffices.
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropLoginDataWarning) for f in mail_log.filters):
            mail_log.addFilter(_DropLoginDataWarning())

    def _factory(self, listener: Listener) -> Any:
        settings = self._config.ingest
        hostname = settings.hostname or self._config.smtp.helo_name
        busy = f"421 4.3.2 {hostname} Too many sessions, try again later\r\n".encode()

        def factory() -> asyncio.Protocol:
            if len(self.sessions) >= settings.max_sessions:
                log.warning("session cap %d reached: refusing a client", settings.max_sessions)
                return _Refuse(busy)
            session = IngestSMTP(
                self.handler,
                listener,
                hostname=hostname,
                max_message_size=settings.max_message_size,
                idle_timeout=settings.idle_timeout.total_seconds(),
                tls_context=self._tls,
                auth_enabled=self._users is not None,
                on_close=self._session_ended,
            )
            self.sessions.add(session)
            return session

        return factory

    async def start(
        self,
        *,
        listen: tuple[str, int] | None = None,
        submission: tuple[str, int] | None = None,
    ) -> Ingest:
        """Listens on the configured addresses; tests pass (host, 0) to get a free port."""
        settings = self._config.ingest
        plan: list[tuple[Listener, tuple[str, int]]] = []
        main = parse_host_port(settings.listen, 25)
        plan.append((Listener("smtp"), listen or (main.host, main.port)))
        if settings.listen_submission or submission:
            if submission is None:
                hp = parse_host_port(settings.listen_submission or "", 587)
                submission = (hp.host, hp.port)
            plan.append((Listener("submission", auth_required=True), submission))
        loop = asyncio.get_running_loop()
        for listener, (host, port) in plan:
            server = await loop.create_server(self._factory(listener), host, port)
            self._servers.append(server)
            self.addresses[listener.name] = server.sockets[0].getsockname()[:2]
        return self

    @property
    def in_flight(self) -> int:
        return len(self.handler.submissions)

    def _stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    def _session_ended(self, session: IngestSMTP) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._all_ended.set()

    async def drain(self, grace: float | None = None) -> None:
        """Stops accepting, lets transactions in progress finish, then closes the rest.

        `grace` (default `[ingest] drain_timeout`) bounds the wait for slow clients.
        """
        self._stop_listening()
        if self.sessions:
            self._all_ended.clear()
            for session in list(self.sessions):
                session.drain()
            if grace is None:
                grace = self._config.ingest.drain_timeout.total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_ended.wait(), grace)
        await self.close()

    async def close(self) -> None:
        """Closes every session now; still waits for messages being queued (never lost)."""
        self._stop_listening()
        for session in list(self.sessions):
            session.close_with("421 4.3.2 Service shutting down")
        if self.handler.submissions:
            await asyncio.wait(list(self.handler.submissions))
        for server in self._servers:
            await server.wait_closed()

    async def __aenter__(self) -> Ingest:
        return self if self._servers else await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_ingest(submitter: Submitter, config: Config) -> Ingest:
    return await Ingest(submitter, config).start()


async def connect_lazily(config: Config) -> Client:
    """Connects on first use, so the ingest starts (and answers 451) while Temporal is down."""
    return await Client.connect(
        config.temporal.address,
        namespace=config.temporal.namespace,
        data_converter=pydantic_data_converter,
        lazy=True,
    )


async def run_ingest(config: Config) -> None:
    client = await connect_lazily(config)
    ingest = await start_ingest(Submitter(client, config), config)
    stop = asyncio.Event()
    closing: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if stop.is_set() and not closing:
            log.warning("second signal: closing every session now")
            closing.append(asyncio.create_task(ingest.close()))
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    shown = ", ".join(f"{name} {host}:{port}" for name, (host, port) in ingest.addresses.items())
    log.info("ingest listening: %s", shown)
    await stop.wait()
    log.info("draining: %d sessions, %d being queued", len(ingest.sessions), ingest.in_flight)
    await ingest.drain()
    log.info("ingest stopped")


def main(config_path: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_ingest(load_config(config_path)))

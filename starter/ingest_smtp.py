"""The ingest's SMTP dialogue: aiosmtpd's `SMTP` with Postflow's ESMTP on top.

EHLO keywords, MAIL/RCPT parsing (addresses, SIZE, DSN parameters) with enhanced status
codes, DATA with the size limit and the `Received:` header, AUTH checked off the event
loop, 421 on idle timeout and on drain. Knows the protocol only: relay control, limits
and queueing are the policy's (`starter/ingest.py`).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import ssl
from base64 import b64decode
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from postflow.addresses import AddressError, parse_path, split_path
from postflow.esmtp_params import (
    MailParams,
    ParamError,
    parse_mail_params,
    parse_rcpt_params,
)
from postflow.models import Recipient
from postflow.received import TraceInfo, received_header
from postflow.spool import new_queue_id

__all__ = ["IngestSMTP", "Listener", "Policy", "Transaction", "peer_ip"]

log = logging.getLogger("postflow.ingest")

MAX_AUTH_FAILURES = 3
# RFC 1869/3461/4954 let MAIL and RCPT lines grow past 512 octets; the reader caps at 1001.
_LINE_LIMITS = {"MAIL": 1000, "RCPT": 1000, "AUTH": 1000}


@dataclass(frozen=True)
class Listener:
    """One listening socket's rules: `submission` requires AUTH for every message."""

    name: str
    auth_required: bool = False


class Transaction(Envelope):
    """aiosmtpd's envelope plus Postflow's per-transaction state."""

    def __init__(self) -> None:
        super().__init__()
        self.params = MailParams()
        self.recipients: list[Recipient] = []
        self.queue_id: str | None = None


class Policy(Protocol):
    """What the protocol asks the ingest's policy (see `starter.ingest.IngestHandler`)."""

    async def accept_recipient(
        self, server: IngestSMTP, session: Session, tx: Transaction, rcpt: Recipient
    ) -> str: ...

    async def queue_message(self, server: IngestSMTP, session: Session, tx: Transaction) -> str: ...

    async def check_login(self, user: str, password: bytes) -> bool: ...

    async def handle_exception(self, error: Exception) -> str: ...


def peer_ip(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class IngestSMTP(SMTP):
    """One client connection. `drain()` ends it at the next point with no transaction."""

    def __init__(
        self,
        policy: Policy,
        listener: Listener,
        *,
        hostname: str,
        max_message_size: int,
        idle_timeout: float,
        tls_context: ssl.SSLContext | None,
        auth_enabled: bool,
        on_close: Callable[[IngestSMTP], None] | None = None,
    ) -> None:
        self.policy = policy
        self.listener = listener
        self._on_close = on_close
        self._ended = False  # not `_closed`: StreamReaderProtocol owns that name
        self._draining = False
        self._busy = False  # queueing a message: our work, not the client's idleness
        self._auth_failures = 0
        super().__init__(
            policy,
            hostname=hostname,
            ident="ESMTP Postflow",
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls_context,
            timeout=idle_timeout,
            auth_required=listener.auth_required,
            auth_require_tls=True,
            auth_exclude_mechanism=None if auth_enabled else ["PLAIN", "LOGIN"],
        )
        # aiosmtpd keeps these limits in a class-wide dict that every EHLO grows.
        self.command_size_limits = defaultdict(lambda: SMTP.command_size_limit, _LINE_LIMITS)

    # -- connection life -------------------------------------------------------------

    def _create_envelope(self) -> Transaction:
        return Transaction()

    def _tx(self) -> Transaction:
        assert isinstance(self.envelope, Transaction)
        return self.envelope

    @property
    def in_transaction(self) -> bool:
        return self._busy or (self.envelope is not None and self.envelope.mail_from is not None)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._ended:
            self._ended = True
            if self._on_close is not None:
                self._on_close(self)
        super().connection_lost(error)

    def close_with(self, reply: str) -> None:
        """Says why, then closes; written directly so it works outside the dialogue too."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(reply.encode("utf-8") + b"\r\n")  # type: ignore[attr-defined]
            transport.close()

    def drain(self) -> None:
        """Shutting down: leave now if idle, else after the transaction in progress."""
        self._draining = True
        if not self.in_transaction:
            self.close_with(f"421 4.3.2 {self.hostname} Service shutting down")

    def _timeout_cb(self) -> None:
        if self._busy:
            self._reset_timeout()
            return
        log.info("timeout after %ss, client %s", self._timeout_duration, peer_ip(self.session))
        self.close_with(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    async def _refused_for_drain(self) -> bool:
        if self._draining:
            self.close_with(f"421 4.3.2 {self.hostname} Service shutting down")
            return True
        return False

    # -- greeting and small commands with enhanced status codes ------------------------

    async def check_helo_needed(self, helo: str = "HELO") -> bool:
        if not self.session or not self.session.host_name:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return True
        return False

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        if await self._refused_for_drain():
            return
        self._set_rset_state()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        keywords = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
        ]
        if self.tls_context and not self._tls_protocol:
            keywords.append("STARTTLS")
        if self._auth_methods and self._tls_protocol and not self.session.authenticated:
            keywords.append("AUTH " + " ".join(sorted(self._auth_methods)))
        lines = [f"250-{k}" for k in keywords[:-1]] + [f"250 {keywords[-1]}"]
        await self.push("\r\n".join(lines))

    async def smtp_HELO(self, hostname: str) -> None:
        if await self._refused_for_drain():
            return
        await super().smtp_HELO(hostname)

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()
        await self.push("250 2.0.0 Ok")
        if self._draining:
            self.close_with(f"421 4.3.2 {self.hostname} Service shutting down")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.push("250 2.0.0 Ok")

    async def smtp_QUIT(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: QUIT")
            return
        await self.push("221 2.0.0 Bye")
        assert self._handler_coroutine is not None and self.transport is not None
        self._handler_coroutine.cancel()
        self.transport.close()

    async def smtp_VRFY(self, arg: str) -> None:
        if await self.check_auth_needed("VRFY"):
            return
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if not self.tls_context:
            await self.push("502 5.5.1 Error: STARTTLS not offered")
            return
        await super().smtp_STARTTLS(arg)

    # -- AUTH: the password check runs in a thread, scrypt is slow on purpose ----------

    async def smtp_AUTH(self, arg: str) -> None:
        if self._auth_failures >= MAX_AUTH_FAILURES:
            self.close_with("421 4.7.0 Too many failed authentication attempts")
            return
        await super().smtp_AUTH(arg)

    async def _decode(self, blob: str) -> bytes | None:
        try:
            return b64decode(blob.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _challenge(self, text: str) -> bytes | None:
        answer = await self.challenge_auth(text)
        return answer if isinstance(answer, bytes) else None

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        blob = await (self._decode(args[1]) if len(args) > 1 else self._challenge(""))
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split PLAIN credentials")
            return AuthResult(success=False, handled=True)
        authz, login, password = parts
        if authz and authz != login:
            # No proxy authorization: a user may act as itself only (RFC 4616 §2).
            return await self._failed("PLAIN", login)
        return await self._login("PLAIN", login, password)

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        login = await (self._decode(args[1]) if len(args) > 1 else self._challenge("Username:"))
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await self._challenge("Password:")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._login("LOGIN", login, password)

    async def _login(self, mechanism: str, login: bytes, password: bytes) -> AuthResult:
        try:
            user = login.decode("utf-8")
        except UnicodeDecodeError:
            return await self._failed(mechanism, login)
        if not await self.policy.check_login(user, password):
            return await self._failed(mechanism, login)
        log.info("AUTH %s ok: user=%s client=%s", mechanism, user, peer_ip(self.session))
        return AuthResult(success=True, auth_data=user)

    async def _failed(self, mechanism: str, login: bytes) -> AuthResult:
        self._auth_failures += 1
        log.warning(
            "AUTH %s failed: user=%r client=%s",
            mechanism,
            login.decode("utf-8", "replace")[:64],
            peer_ip(self.session),
        )
        return AuthResult(success=False, handled=False)

    # -- the transaction ---------------------------------------------------------------

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._refused_for_drain():
            return
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        assert self.session is not None
        tx = self._tx()
        if tx.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        rest = self._strip_command_keyword("FROM:", arg or "")
        if rest is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        path, params_text = split_path(rest)
        try:
            params = parse_mail_params(params_text, extended=self.session.extended_smtp)
            address = parse_path(path, what="sender", null_ok=True, smtputf8=params.smtputf8)
        except (ParamError, AddressError) as exc:
            await self.push(exc.reply)
            return
        if params.size is not None and self.data_size_limit and params.size > self.data_size_limit:
            await self.push(
                f"552 5.3.4 Message size exceeds fixed limit of {self.data_size_limit} octets"
            )
            return
        tx.mail_from = address
        tx.mail_options = params_text.split()
        tx.smtp_utf8 = params.smtputf8
        tx.params = params
        await self.push("250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        assert self.session is not None
        tx = self._tx()
        if tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        rest = self._strip_command_keyword("TO:", arg or "")
        if rest is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        path, params_text = split_path(rest)
        try:
            params = parse_rcpt_params(
                params_text, extended=self.session.extended_smtp, smtputf8=tx.smtp_utf8
            )
            address = parse_path(path, what="recipient", null_ok=False, smtputf8=tx.smtp_utf8)
        except (ParamError, AddressError) as exc:
            await self.push(exc.reply)
            return
        rcpt = Recipient(address=address, notify=params.notify, orcpt=params.orcpt)
        await self.push(await self.policy.accept_recipient(self, self.session, tx, rcpt))

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.session is not None
        tx = self._tx()
        if tx.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not tx.recipients:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        # The queue id is in the Received header, so it exists before the body is stored.
        tx.queue_id = new_queue_id()
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        problem = await self._read_body(tx, received_header(self._trace(tx)))
        if problem:
            self._set_post_data_state()
            await self.push(problem)
            return
        self._busy = True
        try:
            reply = await self.policy.queue_message(self, self.session, tx)
        finally:
            self._busy = False
        self._set_post_data_state()
        await self.push(reply)
        if self._draining:
            self.close_with(f"421 4.3.2 {self.hostname} Service shutting down")

    async def _read_body(self, tx: Transaction, prefix: bytes) -> str | None:
        """Reads to the lone dot; the body (prefix + unstuffed lines) or the error reply.

        Past the size limit the rest is read and dropped (RFC 1870 §6.3 answers after
        the dot), so nothing of an oversized message is kept.
        """
        limit = self.data_size_limit or 0
        body = bytearray(prefix)
        size = 0
        too_big = too_long = mid_line = False
        last_reset = self.loop.time()
        while True:
            try:
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                chunk = await self._reader.read(exc.consumed)
                size += len(chunk)
                too_long = mid_line = True
                body.clear()
                continue
            now = self.loop.time()
            if now - last_reset > 1:
                self._reset_timeout()  # a slow but moving client is not idle
                last_reset = now
            if mid_line:  # the end of an over-long line is never the terminator
                mid_line = False
                size += len(line)
                continue
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            if too_big or too_long:
                continue
            if limit and size > limit:
                too_big = True
                body.clear()
                continue
            body += line
        if too_big:
            return f"552 5.3.4 Message size exceeds fixed limit of {limit} octets"
        if too_long:
            return "500 5.5.2 Message has a line longer than 1000 octets (RFC 5321 4.5.3.1.6)"
        tx.original_content = bytes(body)
        return None

    def _trace(self, tx: Transaction) -> TraceInfo:
        assert self.session is not None
        tls = self.session.ssl or {}
        ssl_object = tls.get("ssl_object")
        cipher = tls.get("cipher") or (None, None, None)
        return TraceInfo(
            helo=self.session.host_name,
            client_ip=peer_ip(self.session),
            by=self.hostname,
            queue_id=tx.queue_id or "",
            extended=self.session.extended_smtp,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            tls_cipher=cipher[0],
            tls_bits=cipher[2],
            authenticated=bool(self.session.authenticated),
            smtputf8=tx.smtp_utf8,
            recipient=tx.recipients[0].address if len(tx.recipients) == 1 else None,
        )

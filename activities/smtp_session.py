"""One SMTP session to one address: connect, greeting, EHLO (or HELO), STARTTLS as the
transport's TLS policy says, AUTH, then one mail transaction. The only module that opens
outbound SMTP connections; it records what happened and lets `postflow.replies` say what
that means. It never decides retry policy and never raises for a remote failure.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace

import aiosmtplib

from activities.smtp_wire import (
    Wire,
    WireLost,
    WireProtocolError,
    WireTimeout,
    data_blocks,
    mail_command,
    rcpt_command,
)
from postflow.config import SaslSettings, SmtpSettings
from postflow.models import HostTry, MxHost, Recipient, RecipientOutcome, SendRequest
from postflow.replies import Policy, ReplyCode, Stage, Trouble, Verdict, judge_reply, judge_trouble
from postflow.tls_policy import TlsPolicy, describe_handshake_error

__all__ = ["SessionResult", "SessionSpec", "SmtpSession"]

# Replies to AUTH that reject the mechanism, not the credentials: try the next mechanism.
_MECHANISM_REFUSED = frozenset({504, 534, 538})
_QUIT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SessionSpec:
    """What every session of one attempt shares: settings, policy, secret and the message."""

    settings: SmtpSettings
    tls: TlsPolicy
    policy: Policy
    request: SendRequest
    payload: bytes  # the DATA payload, dot-stuffed and terminated
    size: int
    needs_smtputf8: bool
    body_8bit: bool
    sasl: SaslSettings | None = None
    password: str | None = field(default=None, repr=False)


@dataclass
class SessionResult:
    tried: HostTry
    # Recipients this session answered for, finally for this attempt.
    settled: list[RecipientOutcome]
    # The session ended early: what it means for every recipient not settled.
    failure: Verdict | None = None
    # Opportunistic TLS failed in the handshake: try this host again without STARTTLS.
    retry_plaintext: bool = False
    dsn_announced: bool = False


class _Abort(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.text)
        self.verdict = verdict


class SmtpSession:
    """Delivers to one address; `run()` returns what happened, per recipient and overall."""

    def __init__(
        self,
        spec: SessionSpec,
        host: MxHost,
        ip: str,
        recipients: list[Recipient],
        beat: Callable[[str], None],
        plaintext: bool = False,
    ) -> None:
        self.spec = spec
        self.host = host
        self.ip = ip
        self.recipients = recipients
        self.plaintext = plaintext
        self.tried = HostTry(host=host.name, ip=ip, port=host.port, plaintext_fallback=plaintext)
        self.settled: list[RecipientOutcome] = []
        self._beat = beat
        self._client: aiosmtplib.SMTP | None = None
        self._retry_plaintext = False
        self._dsn = False
        self.stage = Stage.CONNECT.value
        # False once the dialogue is out of step (timeout, lost bytes, broken TLS): then the
        # connection is dropped instead of sending QUIT into the middle of something.
        self._sane = True

    # ---- the session -------------------------------------------------------------------

    async def run(self) -> SessionResult:
        failure: Verdict | None = None
        try:
            await self._connect()
            await self._hello()
            await self._starttls()
            await self._authenticate()
            await self._transaction()
        except _Abort as abort:
            failure = abort.verdict
        except asyncio.CancelledError:
            self._drop()
            raise
        if self._sane:
            await self._quit()
        else:
            self._drop()
        return self._result(failure)

    def out_of_time(self) -> SessionResult:
        """The result when the attempt's time ran out mid-session: no time for more hosts."""
        self._drop()
        verdict = judge_trouble(
            Trouble.TIMEOUT, Stage(self.stage), "attempt time limit reached", self.spec.policy
        )
        return self._result(replace(verdict, next_host=False))

    def _result(self, failure: Verdict | None) -> SessionResult:
        if failure is not None:
            self.tried.error = failure.text
            self.tried.stage = failure.stage.value
            self.tried.code = failure.code
            self.tried.enhanced = failure.enhanced
        return SessionResult(
            tried=self.tried,
            settled=self.settled,
            failure=failure,
            retry_plaintext=self._retry_plaintext,
            dsn_announced=self._dsn,
        )

    def _note(self, step: str) -> None:
        self._beat(f"{self.host.name} [{self.ip}]:{self.host.port} {step}")

    @contextmanager
    def _stage(self, stage: Stage) -> Iterator[None]:
        """Turns whatever goes wrong inside into the verdict for `stage`."""
        self.stage = stage.value
        policy = self.spec.policy
        try:
            yield
        except _Abort:
            raise
        except aiosmtplib.SMTPResponseException as exc:
            raise _Abort(judge_reply(exc.code, exc.message, stage, policy)) from None
        except (aiosmtplib.SMTPTimeoutError, WireTimeout, TimeoutError) as exc:
            self._sane = False
            raise _Abort(judge_trouble(Trouble.TIMEOUT, stage, _why(exc), policy)) from None
        except (WireProtocolError, ValueError) as exc:
            self._sane = False
            raise _Abort(judge_trouble(Trouble.PROTOCOL, stage, _why(exc), policy)) from None
        except (aiosmtplib.SMTPException, WireLost, OSError) as exc:
            self._sane = False
            raise _Abort(judge_trouble(Trouble.LOST, stage, _why(exc), policy)) from None

    # ---- steps ---------------------------------------------------------------------------

    async def _connect(self) -> None:
        settings, policy = self.spec.settings, self.spec.policy
        self.stage = Stage.CONNECT.value
        self._note("connect")
        family = socket.AF_INET6 if ":" in self.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        timeout = settings.connect_timeout.total_seconds()
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (self.ip, self.host.port)), timeout)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, TimeoutError):
                detail = f"no connection within {timeout:g} s"
            elif isinstance(exc, OSError):
                detail = exc.strerror or str(exc)
            else:
                raise
            verdict = judge_trouble(Trouble.CONNECT_FAILED, Stage.CONNECT, detail, policy)
            raise _Abort(verdict) from None
        self._client = aiosmtplib.SMTP(
            sock=sock,
            local_hostname=settings.helo_name,
            start_tls=False,
            validate_certs=False,
            timeout=settings.command_timeout.total_seconds(),
        )
        greeting = settings.greeting_timeout.total_seconds()
        self._note("greeting")
        with self._stage(Stage.GREETING):
            try:
                await self._client.connect(timeout=greeting)
            except aiosmtplib.SMTPConnectTimeoutError:
                raise WireTimeout(f"no greeting within {greeting:g} s") from None

    async def _hello(self) -> None:
        client = self._require_client()
        timeout = self.spec.settings.command_timeout.total_seconds()
        self._note("EHLO")
        with self._stage(Stage.EHLO):
            try:
                await client.ehlo(timeout=timeout)
            except aiosmtplib.SMTPHeloError as exc:
                if exc.code == ReplyCode.SERVICE_UNAVAILABLE or not client.is_connected:
                    raise
                # RFC 5321 §3.2: a server that does not know EHLO still knows HELO.
                self._note("HELO")
                await client.helo(timeout=timeout)
                self.tried.helo_fallback = True
        self._record_extensions()

    async def _starttls(self) -> None:
        client, tls = self._require_client(), self.spec.tls
        if self.plaintext or tls.level == "none" or tls.context is None:
            return
        timeout = self.spec.settings.command_timeout.total_seconds()
        policy = self.spec.policy
        if not client.supports_extension("starttls"):
            if tls.must_encrypt:
                self.tried.tls = tls.info(None, False, error="STARTTLS not offered")
                raise _Abort(judge_trouble(Trouble.TLS_NOT_OFFERED, Stage.TLS, "", policy))
            return
        self._note("STARTTLS")
        self.stage = Stage.TLS.value
        try:
            await client.starttls(
                tls_context=tls.context, server_hostname=self.host.name, timeout=timeout
            )
        except aiosmtplib.SMTPResponseException as exc:
            if tls.must_encrypt or exc.code == ReplyCode.SERVICE_UNAVAILABLE:
                self.tried.tls = tls.info(None, False, error=f"STARTTLS refused: {exc.code}")
                raise _Abort(judge_reply(exc.code, exc.message, Stage.TLS, policy)) from None
            # Opportunistic: the session is still plaintext and usable (Postfix's `may`).
            self.tried.tls = tls.info(None, False, error=f"STARTTLS refused: {exc.code}")
            self.tried.plaintext_fallback = True
            return
        except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
            self._sane = False
            unverified, reason = describe_handshake_error(exc)
            self.tried.tls = tls.info(None, False, error=reason)
            self._retry_plaintext = tls.level == "opportunistic"
            trouble = Trouble.TLS_UNVERIFIED if unverified else Trouble.TLS_FAILED
            raise _Abort(judge_trouble(trouble, Stage.TLS, reason, policy)) from None
        ssl_object = client.get_transport_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        problem = tls.check_peer(der, self.host.name)
        self.tried.tls = tls.info(ssl_object, tls.level == "verify" and problem is None, problem)
        if problem:
            raise _Abort(judge_trouble(Trouble.TLS_UNVERIFIED, Stage.TLS, problem, policy))
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        self._note("EHLO after STARTTLS")
        with self._stage(Stage.EHLO):
            await client.ehlo(timeout=timeout)
        self._record_extensions()

    async def _authenticate(self) -> None:
        sasl, client, policy = self.spec.sasl, self._require_client(), self.spec.policy
        if sasl is None:
            return
        self.stage = Stage.AUTH.value
        encrypted = client.get_transport_info("sslcontext") is not None
        if not encrypted and not sasl.allow_plaintext:
            raise _Abort(judge_trouble(Trouble.AUTH_NOT_ENCRYPTED, Stage.AUTH, "", policy))
        if not client.supports_extension("auth"):
            raise _Abort(judge_trouble(Trouble.AUTH_NOT_OFFERED, Stage.AUTH, "", policy))
        offered = [m.upper() for m in client.server_auth_methods]
        allowed = list(sasl.mechanisms or [m.upper() for m in client.AUTH_METHODS])
        candidates = [m for m in allowed if m in offered]
        if not candidates:
            detail = f"server offers {' '.join(offered) or 'none'}; allowed {' '.join(allowed)}"
            raise _Abort(judge_trouble(Trouble.AUTH_NO_MECHANISM, Stage.AUTH, detail, policy))
        timeout = self.spec.settings.command_timeout.total_seconds()
        password = self.spec.password or ""
        refused: aiosmtplib.SMTPAuthenticationError | None = None
        for mechanism in candidates:
            self._note(f"AUTH {mechanism}")
            method = getattr(client, "auth_" + mechanism.lower().replace("-", ""))
            with self._stage(Stage.AUTH):
                try:
                    await method(sasl.username, password, timeout=timeout)
                except aiosmtplib.SMTPAuthenticationError as exc:
                    if exc.code not in _MECHANISM_REFUSED:
                        raise
                    refused = exc
                    continue
            self.tried.auth_mechanism = mechanism
            return
        assert refused is not None
        raise _Abort(judge_reply(refused.code, refused.message, Stage.AUTH, policy))

    async def _transaction(self) -> None:
        client, spec = self._require_client(), self.spec
        req = spec.request
        self._dsn = client.supports_extension("dsn")
        self._check_message_fits(client)
        utf8 = client.supports_extension("smtputf8") and (spec.needs_smtputf8 or req.smtputf8)
        with self._stage(Stage.MAIL):
            mail_line = mail_command(req.mail_from, self._mail_options(client, utf8), utf8)
            rcpt_lines = [
                rcpt_command(r.address, self._rcpt_options(r), utf8) for r in self.recipients
            ]
        assert client.protocol is not None
        pipelined = spec.settings.pipelining and client.supports_extension("pipelining")
        with Wire(client.protocol) as wire:
            try:
                await self._exchange(wire, pipelined, mail_line, rcpt_lines)
            except _Abort:
                # Replies to pipelined commands may still be on their way: no QUIT after them.
                self._sane = self._sane and not pipelined
                raise

    async def _exchange(
        self, wire: Wire, pipelined: bool, mail_line: bytes, rcpt_lines: list[bytes]
    ) -> None:
        """MAIL, RCPT..., DATA and the body; with PIPELINING all commands go in one write."""
        settings, policy = self.spec.settings, self.spec.policy
        command_timeout = settings.command_timeout.total_seconds()
        if pipelined:
            self.tried.pipelined = True
            wire.send(mail_line + b"".join(rcpt_lines) + b"DATA\r\n")
        self._note("MAIL")
        with self._stage(Stage.MAIL):
            if not pipelined:
                wire.send(mail_line)
            reply = await wire.reply(command_timeout)
        refused = None
        if reply.code != ReplyCode.OK:
            refused = judge_reply(reply.code, reply.message, Stage.MAIL, policy)
            if not pipelined:
                raise _Abort(refused)
        accepted: list[Recipient] = []
        for number, (rcpt, line) in enumerate(zip(self.recipients, rcpt_lines, strict=True)):
            self._note(f"RCPT {number + 1}/{len(rcpt_lines)}")
            with self._stage(Stage.RCPT):
                if not pipelined:
                    wire.send(line)
                reply = await wire.reply(command_timeout)
            if refused is not None:
                continue
            if reply.code in (ReplyCode.OK, ReplyCode.WILL_FORWARD):
                accepted.append(rcpt)
                continue
            verdict = judge_reply(reply.code, reply.message, Stage.RCPT, policy)
            if verdict.next_host:
                raise _Abort(verdict)
            self.settled.append(verdict.outcome(rcpt.address, self.host.name, self.ip))
        if not pipelined and not accepted:
            return
        self._note("DATA")
        with self._stage(Stage.DATA):
            if not pipelined:
                wire.send(b"DATA\r\n")
            reply = await wire.reply(settings.data_timeout.total_seconds())
        if reply.code != ReplyCode.START_DATA:
            if refused is not None:
                raise _Abort(refused)
            if accepted:
                self._settle(accepted, judge_reply(reply.code, reply.message, Stage.DATA, policy))
            return
        if refused is not None or not accepted:
            # RFC 2920 §3.1: DATA was accepted for nobody; end it with an empty message.
            with suppress(WireLost, WireTimeout, WireProtocolError, OSError):
                wire.send(b".\r\n")
                await wire.reply(settings.final_timeout.total_seconds())
            if refused is not None:
                raise _Abort(refused)
            return
        with self._stage(Stage.DATA):
            await self._send_body(wire)
            self._note("waiting for the reply to the final dot")
            reply = await wire.reply(settings.final_timeout.total_seconds())
        self._settle(accepted, judge_reply(reply.code, reply.message, Stage.DATA, policy))

    async def _send_body(self, wire: Wire) -> None:
        block_timeout = self.spec.settings.block_timeout.total_seconds()
        total, sent = len(self.spec.payload), 0
        for block in data_blocks(self.spec.payload):
            wire.send(block)
            sent += len(block)
            self._note(f"DATA {sent}/{total} bytes")
            await wire.drain(block_timeout)

    # ---- helpers -------------------------------------------------------------------------

    def _settle(self, recipients: list[Recipient], verdict: Verdict) -> None:
        if verdict.next_host:
            raise _Abort(verdict)
        self.settled.extend(verdict.outcome(r.address, self.host.name, self.ip) for r in recipients)

    def _check_message_fits(self, client: aiosmtplib.SMTP) -> None:
        spec, policy = self.spec, self.spec.policy
        limit = client.esmtp_extensions.get("size", "").strip()
        if limit.isdigit() and 0 < int(limit) < spec.size:
            detail = f"{spec.size} bytes, {self.host.name} accepts at most {limit}"
            raise _Abort(judge_trouble(Trouble.TOO_BIG, Stage.MAIL, detail, policy))
        if spec.needs_smtputf8 and not client.supports_extension("smtputf8"):
            detail = "non-ASCII addresses or headers"
            raise _Abort(judge_trouble(Trouble.NEEDS_SMTPUTF8, Stage.MAIL, detail, policy))

    def _mail_options(self, client: aiosmtplib.SMTP, utf8: bool) -> list[str]:
        req, options = self.spec.request, []
        if client.supports_extension("size"):
            options.append(f"SIZE={self.spec.size}")
        if self.spec.body_8bit and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if utf8:
            options.append("SMTPUTF8")
        if self._dsn:
            if req.ret:
                options.append(f"RET={req.ret}")
            if req.envid:
                options.append(f"ENVID={req.envid}")
        return options

    def _rcpt_options(self, rcpt: Recipient) -> list[str]:
        options = []
        if self._dsn:
            if rcpt.notify:
                options.append("NOTIFY=" + ",".join(rcpt.notify))
            if rcpt.orcpt:
                options.append(f"ORCPT={rcpt.orcpt}")
        return options

    def _record_extensions(self) -> None:
        client = self._require_client()
        self.tried.extensions = sorted(
            f"{name.upper()} {params}".strip() for name, params in client.esmtp_extensions.items()
        )

    def _require_client(self) -> aiosmtplib.SMTP:
        if self._client is None or not self._client.is_connected:
            verdict = judge_trouble(
                Trouble.LOST, Stage(self.stage), "connection closed", self.spec.policy
            )
            raise _Abort(verdict)
        return self._client

    async def _quit(self) -> None:
        client = self._client
        if client is None:
            return
        if client.is_connected:
            timeout = min(self.spec.settings.command_timeout.total_seconds(), _QUIT_TIMEOUT)
            with suppress(aiosmtplib.SMTPException, OSError):
                await client.quit(timeout=timeout)
        client.close()

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()


def _why(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__

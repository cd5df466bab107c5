"""The SMTP delivery activity: the only module that opens outbound SMTP connections.

It tries the resolved hosts in order and returns one outcome per recipient; it never
decides retry policy. It raises only for trouble on our side (spool unreadable).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import aiosmtplib
from temporalio import activity

from postflow.config import Config, TransportSettings
from postflow.models import (
    HostTry,
    MxHost,
    Recipient,
    RecipientOutcome,
    RecipientState,
    SendRequest,
    SendResult,
)
from postflow.replies import clean_text, outcome_from_reply
from postflow.spool import FsSpool

__all__ = ["SmtpActivities"]


class _HostFailed(Exception):
    """This host could not take the message; try the next one. Carries the would-be outcome."""

    def __init__(self, code: int | None, enhanced: str, text: str, stage: str) -> None:
        super().__init__(text)
        self.code, self.enhanced, self.text, self.stage = code, enhanced, clean_text(text), stage


@dataclass
class _Session:
    host: MxHost
    ip: str
    transport: TransportSettings
    outcomes: list[RecipientOutcome] = field(default_factory=list)
    dsn: bool = False


class SmtpActivities:
    def __init__(self, config: Config, spool: FsSpool) -> None:
        self._config = config
        self._spool = spool

    @activity.defn(name="send_message")
    async def send_message(self, req: SendRequest) -> SendResult:
        transport = self._config.transport(req.transport)
        body = await asyncio.to_thread(self._spool.read, req.spool_key)
        tries: list[HostTry] = []
        last: _HostFailed | None = None
        last_host: tuple[str | None, str | None] = (None, None)
        for host in req.hosts[: transport.max_mx_hosts]:
            for ip in host.addresses:
                activity.heartbeat(f"{host.name} [{ip}]:{host.port}")
                session = _Session(host=host, ip=ip, transport=transport)
                try:
                    await self._deliver(session, req, body)
                except _HostFailed as failed:
                    tries.append(HostTry(host=host.name, ip=ip, port=host.port, error=failed.text))
                    last, last_host = failed, (host.name, ip)
                    continue
                tries.append(HostTry(host=host.name, ip=ip, port=host.port))
                return SendResult(
                    recipients=session.outcomes, tries=tries, dsn_announced=session.dsn
                )
        assert last is not None or not req.hosts
        failure = last or _HostFailed(None, "4.4.4", "no host to try", "connect")
        outcomes = [
            RecipientOutcome(
                address=r.address,
                state=RecipientState.DEFERRED,
                code=failure.code,
                enhanced=failure.enhanced,
                text=failure.text,
                remote_host=last_host[0],
                remote_ip=last_host[1],
                stage=failure.stage,
            )
            for r in req.recipients
        ]
        return SendResult(recipients=outcomes, tries=tries)

    async def _deliver(self, session: _Session, req: SendRequest, body: bytes) -> None:
        smtp_cfg = self._config.smtp
        host, ip = session.host, session.ip
        client = aiosmtplib.SMTP(
            hostname=ip,
            port=host.port,
            local_hostname=smtp_cfg.helo_name,
            timeout=smtp_cfg.connect_timeout.total_seconds(),
            start_tls=False,
            validate_certs=False,
        )
        try:
            await self._open(client, session)
            await self._transaction(client, session, req, body)
        finally:
            if client.is_connected:
                try:
                    await client.quit(timeout=10)
                except (aiosmtplib.SMTPException, OSError):
                    client.close()

    async def _open(self, client: aiosmtplib.SMTP, session: _Session) -> None:
        smtp_cfg = self._config.smtp
        try:
            await client.connect(timeout=smtp_cfg.connect_timeout.total_seconds())
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _HostFailed(exc.code, _enh(exc.code), exc.message, "greeting") from None
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            raise _HostFailed(None, "4.4.1", f"connect timeout: {exc}", "connect") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _HostFailed(None, "4.4.1", f"connect failed: {exc}", "connect") from None
        try:
            try:
                await client.ehlo(timeout=smtp_cfg.command_timeout.total_seconds())
            except aiosmtplib.SMTPHeloError:
                await client.helo(timeout=smtp_cfg.command_timeout.total_seconds())
            if session.transport.tls != "none" and client.supports_extension("starttls"):
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                await client.starttls(tls_context=context, server_hostname=session.host.name)
            elif session.transport.tls in ("required", "verify"):
                raise _HostFailed(
                    None, "4.7.4", "TLS is required but the server does not offer STARTTLS", "tls"
                )
        except aiosmtplib.SMTPResponseException as exc:
            raise _HostFailed(exc.code, _enh(exc.code), exc.message, "ehlo") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _HostFailed(None, "4.4.2", f"session failed: {exc}", "ehlo") from None
        session.dsn = client.supports_extension("dsn")

    async def _transaction(
        self, client: aiosmtplib.SMTP, session: _Session, req: SendRequest, body: bytes
    ) -> None:
        smtp_cfg = self._config.smtp
        soft = self._config.delivery.soft_bounce
        where = {"host": session.host.name, "ip": session.ip}
        command_timeout = smtp_cfg.command_timeout.total_seconds()
        try:
            await client.mail(
                req.mail_from, options=_mail_options(client, req), timeout=command_timeout
            )
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                session.outcomes = [
                    outcome_from_reply(
                        r.address, exc.code, exc.message, stage="mail", soft_bounce=soft, **where
                    )
                    for r in req.recipients
                ]
                return
            raise _HostFailed(exc.code, _enh(exc.code), exc.message, "mail") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise _HostFailed(None, "4.4.2", f"lost connection at MAIL: {exc}", "mail") from None

        accepted: list[Recipient] = []
        for rcpt in req.recipients:
            try:
                await client.rcpt(
                    rcpt.address, options=_rcpt_options(client, rcpt), timeout=command_timeout
                )
                accepted.append(rcpt)
            except aiosmtplib.SMTPResponseException as exc:
                session.outcomes.append(
                    outcome_from_reply(
                        rcpt.address, exc.code, exc.message, stage="rcpt", soft_bounce=soft, **where
                    )
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                raise _HostFailed(
                    None, "4.4.2", f"lost connection at RCPT: {exc}", "rcpt"
                ) from None
        if not accepted:
            return
        try:
            reply = await client.data(body, timeout=smtp_cfg.final_timeout.total_seconds())
            code, text = reply.code, reply.message
        except aiosmtplib.SMTPResponseException as exc:
            code, text = exc.code, exc.message
        except (aiosmtplib.SMTPException, OSError) as exc:
            # Cut mid-DATA: the server may or may not have the message; deferring risks a
            # duplicate, never a loss.
            code, text = 451, f"4.4.2 connection lost during DATA: {exc}"
            where = {"host": session.host.name, "ip": session.ip}
        session.outcomes.extend(
            outcome_from_reply(r.address, code, text, stage="data", soft_bounce=soft, **where)
            for r in accepted
        )


def _enh(code: int) -> str:
    return "5.0.0" if code >= 500 else "4.0.0"


def _mail_options(client: aiosmtplib.SMTP, req: SendRequest) -> list[str]:
    options = []
    if req.size and client.supports_extension("size"):
        options.append(f"SIZE={req.size}")
    if req.body_8bit and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    if req.smtputf8 and client.supports_extension("smtputf8"):
        options.append("SMTPUTF8")
    if client.supports_extension("dsn"):
        if req.ret:
            options.append(f"RET={req.ret}")
        if req.envid:
            options.append(f"ENVID={req.envid}")
    return options


def _rcpt_options(client: aiosmtplib.SMTP, rcpt: Recipient) -> list[str]:
    options = []
    if client.supports_extension("dsn"):
        if rcpt.notify:
            options.append("NOTIFY=" + ",".join(rcpt.notify))
        if rcpt.orcpt:
            options.append(f"ORCPT={rcpt.orcpt}")
    return options

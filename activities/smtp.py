"""The `send_message` activity: one delivery attempt over the resolved hosts, in order.

It reads the body and the SASL password (by reference) itself, runs one SMTP session per
address until every recipient has an answer, and returns one outcome per recipient plus a
record of every session (`tries`, with the TLS outcome). It never decides retry policy and
raises only for trouble on our side (spool unreadable). Heartbeats carry the current step.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from types import TracebackType

from aiosmtplib.email import quote_address
from temporalio import activity

from activities.smtp_session import SessionResult, SessionSpec, SmtpSession
from activities.smtp_wire import prepare_body
from postflow.config import Config
from postflow.models import HostTry, MxHost, Recipient, RecipientOutcome, SendRequest, SendResult
from postflow.replies import Policy, Stage, Trouble, Verdict, judge_trouble
from postflow.secrets import SecretError, read_password
from postflow.spool import Spool
from postflow.tls_policy import TlsConfigError, TlsPolicy

__all__ = ["SmtpActivities"]

# Leave this much of the activity's start-to-close timeout to return a result in: a
# result beats a timeout, which Temporal would retry with no record of this attempt.
_RESULT_MARGIN_SECONDS = 30.0
_REDACTED = "<redacted>"


class _Heartbeat:
    """Heartbeats with the current step, also while a session waits on a slow server."""

    def __init__(self) -> None:
        self.step = "starting"
        self._task: asyncio.Task[None] | None = None

    def __call__(self, step: str) -> None:
        self.step = step
        activity.heartbeat(step)

    async def __aenter__(self) -> _Heartbeat:
        timeout = activity.info().heartbeat_timeout
        # The SDK throttles what it sends; beating well inside the timeout is cheap.
        interval = min(timeout.total_seconds() / 3, 10.0) if timeout else 10.0
        self._task = asyncio.create_task(self._beat_every(max(interval, 0.01)))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _beat_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat(self.step)


class SmtpActivities:
    def __init__(self, config: Config, spool: Spool) -> None:
        self._config = config
        self._spool = spool
        self._tls: dict[str, TlsPolicy] = {}

    async def _tls_policy(self, name: str) -> TlsPolicy:
        policy = self._tls.get(name)
        if policy is None:
            settings = self._config.transport(name)
            # Loading CA bundles reads files: off the event loop, once per transport.
            policy = await asyncio.to_thread(
                TlsPolicy.from_settings, settings, f"transports.{name}"
            )
            self._tls[name] = policy
        return policy

    @activity.defn(name="send_message")
    async def send_message(self, req: SendRequest) -> SendResult:
        transport = self._config.transport(req.transport)
        sasl = transport.sasl
        policy = Policy(
            soft_bounce=self._config.delivery.soft_bounce,
            auth_failure=sasl.auth_failure if sasl else "defer",
        )
        # Read once per attempt and dropped after it; no thread for an S3 spool.
        body = await self._spool.aread(req.spool_key)
        outcomes = _bad_addresses(req, policy)
        pending = [r for r in req.recipients if r.address not in outcomes]
        if not pending:
            return SendResult(recipients=[outcomes[r.address] for r in req.recipients])
        password: str | None = None
        try:
            tls = await self._tls_policy(req.transport)
            if sasl is not None:
                where = f"transports.{req.transport}.sasl"
                password = await asyncio.to_thread(read_password, sasl, where)
        except (TlsConfigError, SecretError) as exc:
            verdict = judge_trouble(Trouble.LOCAL_CONFIG, Stage.CONNECT, str(exc), policy)
            outcomes.update({r.address: verdict.outcome(r.address, None, None) for r in pending})
            return SendResult(recipients=[outcomes[r.address] for r in req.recipients])
        spec = SessionSpec(
            settings=self._config.smtp,
            tls=tls,
            policy=policy,
            request=req,
            payload=prepare_body(body),
            size=max(req.size, len(body)),
            needs_smtputf8=_needs_smtputf8(req, body),
            body_8bit=req.body_8bit or not body.isascii(),
            sasl=sasl,
            password=password,
        )
        result = await self._attempt(spec, req.hosts[: transport.max_mx_hosts], pending, outcomes)
        return _redact(result, password) if password else result

    async def _attempt(
        self,
        spec: SessionSpec,
        hosts: list[MxHost],
        pending: list[Recipient],
        outcomes: dict[str, RecipientOutcome],
    ) -> SendResult:
        req = spec.request
        tries: list[HostTry] = []
        last: Verdict | None = None
        last_at: tuple[str | None, str | None] = (None, None)
        dsn = False
        timeout = activity.info().start_to_close_timeout
        loop = asyncio.get_running_loop()
        deadline = None
        if timeout:
            seconds = timeout.total_seconds()
            deadline = loop.time() + seconds - min(_RESULT_MARGIN_SECONDS, seconds / 10)
        async with _Heartbeat() as beat:
            for host, ip in ((h, ip) for h in hosts for ip in h.addresses):
                result = await _session(spec, host, ip, pending, beat, deadline)
                tries.append(result.tried)
                if result.retry_plaintext:
                    # Postfix's `may`: a failed handshake is retried once without TLS.
                    result = await _session(spec, host, ip, pending, beat, deadline, True)
                    tries.append(result.tried)
                outcomes.update({o.address: o for o in result.settled})
                pending = [r for r in pending if r.address not in outcomes]
                dsn = dsn or result.dsn_announced
                if result.failure is None:
                    break
                last, last_at = result.failure, (host.name, ip)
                if not result.failure.next_host or not pending:
                    break
        if pending:
            nothing = judge_trouble(Trouble.NO_HOSTS, Stage.CONNECT, req.domain, spec.policy)
            verdict = last or nothing
            outcomes.update({r.address: verdict.outcome(r.address, *last_at) for r in pending})
        return SendResult(
            recipients=[outcomes[r.address] for r in req.recipients],
            tries=tries,
            dsn_announced=dsn,
        )


async def _session(
    spec: SessionSpec,
    host: MxHost,
    ip: str,
    recipients: list[Recipient],
    beat: _Heartbeat,
    deadline: float | None,
    plaintext: bool = False,
) -> SessionResult:
    session = SmtpSession(spec, host, ip, recipients, beat, plaintext=plaintext)
    try:
        async with asyncio.timeout_at(deadline):
            return await session.run()
    except TimeoutError:
        return session.out_of_time()


def _bad_addresses(req: SendRequest, policy: Policy) -> dict[str, RecipientOutcome]:
    """Addresses that cannot go on a command line fail here, before any connection."""
    try:
        quote_address(req.mail_from)
    except ValueError:
        verdict = judge_trouble(Trouble.BAD_ADDRESS, Stage.MAIL, "sender", policy)
        return {r.address: verdict.outcome(r.address, None, None) for r in req.recipients}
    bad: dict[str, RecipientOutcome] = {}
    for rcpt in req.recipients:
        try:
            quote_address(rcpt.address)
        except ValueError:
            verdict = judge_trouble(Trouble.BAD_ADDRESS, Stage.RCPT, "recipient", policy)
            bad[rcpt.address] = verdict.outcome(rcpt.address, None, None)
    return bad


def _needs_smtputf8(req: SendRequest, body: bytes) -> bool:
    """RFC 6531: non-ASCII addresses, or non-ASCII headers in a message sent with SMTPUTF8."""
    if not req.mail_from.isascii() or not all(r.address.isascii() for r in req.recipients):
        return True
    if req.smtputf8:
        end = body.find(b"\n\n") if b"\r\n\r\n" not in body else body.find(b"\r\n\r\n")
        return not body[: end if end >= 0 else len(body)].isascii()
    return False


def _redact(result: SendResult, password: str) -> SendResult:
    """Defence in depth: a server that echoes a credential must not put it in history."""

    def clean(text: str | None) -> str | None:
        return text.replace(password, _REDACTED) if text else text

    return result.model_copy(
        update={
            "recipients": [
                o.model_copy(update={"text": clean(o.text) or ""}) for o in result.recipients
            ],
            "tries": [t.model_copy(update={"error": clean(t.error)}) for t in result.tries],
        }
    )

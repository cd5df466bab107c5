"""The SMTP ingest against real clients (aiosmtplib, smtplib) on loopback, with a dev server.

Each test runs the ingest in-process on a free loopback port and queues on a task queue
no worker polls, so the spool files and workflows it leaves are there to inspect.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import ssl
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from postflow.config import Config
from postflow.constants import message_workflow_id
from postflow.models import DeliverInput
from postflow.passwd import PasswordFile
from starter.ingest import Ingest
from starter.submit import Submitter
from tests.certs import pki
from tests.conftest import make_config
from tests.helpers import MESSAGE

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "alice", "correct horse battery"
HOST = "mx.postflow.test"


@dataclass
class Running:
    ingest: Ingest
    config: Config
    client: Client
    queue: str

    @property
    def port(self) -> int:
        return self.ingest.addresses["smtp"][1]

    @property
    def spool(self) -> Path:
        return Path(self.config.spool.path)

    def spooled(self) -> list[Path]:
        """Every file in the spool, finished or half-written."""
        return sorted(p for p in self.spool.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users"
    PasswordFile(path).set(USER, PASSWORD)
    return path


@asynccontextmanager
async def running(
    client: Client,
    tmp_path: Path,
    *,
    users: Path | None = None,
    submission: bool = False,
    **settings: object,
) -> AsyncIterator[Running]:
    ingest: dict[str, object] = {"hostname": HOST, **settings}
    if users is not None:
        tls = pki().valid
        ingest.update(tls_cert_file=str(tls.cert), tls_key_file=str(tls.key), users_file=str(users))
    config = make_config(tmp_path, ingest=ingest)
    queue = f"ingest-{uuid.uuid4().hex[:10]}"
    submitter = Submitter(client, config, task_queue=queue, priority_task_queue=queue)
    server = Ingest(submitter, config)
    await server.start(listen=("127.0.0.1", 0), submission=("127.0.0.1", 0) if submission else None)
    try:
        yield Running(server, config, client, queue)
    finally:
        await server.close()


def client_tls() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki().ca))


def smtp(port: int, **kwargs: object) -> aiosmtplib.SMTP:
    kwargs.setdefault("start_tls", False)
    kwargs.setdefault("local_hostname", "client.test")
    return aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, **kwargs)  # type: ignore[arg-type]


async def command(client: aiosmtplib.SMTP, line: str) -> tuple[int, str]:
    """One raw command and its reply; greets with EHLO first if needed, as a client does."""
    verb, _, rest = line.partition(" ")
    if client.is_ehlo_or_helo_needed and verb in ("MAIL", "RCPT"):
        await client.ehlo()
    args = [verb.encode()] + ([rest.encode("utf-8")] if rest else [])
    reply = await client.execute_command(*args)
    return reply.code, reply.message


async def send(client: aiosmtplib.SMTP, data: bytes = MESSAGE, **kwargs: object) -> tuple[int, str]:
    """MAIL/RCPT then DATA; returns the reply to the end of DATA."""
    code, text = await command(client, "MAIL FROM:<alice@sender.test>")
    assert code == 250, text
    code, text = await command(client, "RCPT TO:<bob@dest.test>")
    assert code == 250, text
    try:
        reply = await client.data(data)
    except aiosmtplib.SMTPDataError as exc:
        return exc.code, exc.message
    return reply.code, reply.message


def queue_id_of(reply: str) -> str:
    assert reply.startswith("2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


async def workflow_input(client: Client, queue_id: str) -> DeliverInput:
    """The DeliverMessage input as Temporal recorded it in the start event."""
    handle = client.get_workflow_handle(message_workflow_id(queue_id))
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            payloads = event.workflow_execution_started_event_attributes.input.payloads
            [value] = await client.data_converter.decode(payloads, [DeliverInput])
            return value
    raise AssertionError("no start event")


async def workflow_count(client: Client, queue: str, expect: int) -> int:
    """Workflows on `queue` per visibility, which lags starts by up to ~100 ms: polled for a
    second until it shows `expect` (and 0 must hold for 0.3 s)."""
    deadline = time.monotonic() + 1.0
    while True:
        count = len([w async for w in client.list_workflows(f'TaskQueue = "{queue}"')])
        settled = expect != 0 or time.monotonic() > deadline - 0.7
        if (count == expect and settled) or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.1)


# -- access control -------------------------------------------------------------------


def _smtplib_dialogue(port: int, source: str) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10) as s:
        replies = {"ehlo": s.ehlo("client.test")}
        replies["mail"] = s.mail("alice@sender.test")
        replies["rcpt"] = s.rcpt("bob@dest.test")
        replies["data"] = s.data(MESSAGE) if replies["rcpt"][0] == 250 else s.docmd("DATA")
        return replies


async def test_not_an_open_relay(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path, allow_networks=["127.0.0.1/32"]) as run:
        outside = await asyncio.to_thread(_smtplib_dialogue, run.port, "127.0.0.9")
        assert outside["mail"][0] == 250
        assert outside["rcpt"] == (554, b"5.7.1 <bob@dest.test>: Relay access denied")
        assert outside["data"] == (554, b"5.5.1 Error: no valid recipients")
        assert run.spooled() == []
        # The same dialogue from inside the allowed network is accepted: the check is real.
        inside = await asyncio.to_thread(_smtplib_dialogue, run.port, "127.0.0.1")
        assert inside["rcpt"][0] == 250
        assert inside["data"][0] == 250
        assert len(run.spooled()) == 1


async def test_auth_after_starttls_lets_an_outside_client_relay(
    dev_env: WorkflowEnvironment, tmp_path: Path, users_file: Path
) -> None:
    async with running(
        dev_env.client, tmp_path, users=users_file, allow_networks=["127.0.0.1/32"]
    ) as run:
        client = smtp(run.port, source_address=("127.0.0.9", 0), tls_context=client_tls())
        async with client:
            await client.ehlo()
            assert "starttls" in client.esmtp_extensions
            assert "auth" not in client.esmtp_extensions
            await client.starttls()
            await client.ehlo()
            assert client.esmtp_extensions["auth"].split() == ["LOGIN", "PLAIN"]
            reply = await client.auth_plain(USER, PASSWORD)
            assert (reply.code, reply.message) == (235, "2.7.0 Authentication successful")
            code, text = await send(client)
        assert code == 250
        queue_id = queue_id_of(text)
        body = (run.spool / f"{queue_id}.eml").read_bytes()
        assert f"with ESMTPSA id {queue_id}".encode() in body
        assert b"(using TLSv1.3 with cipher " in body
        assert (await workflow_input(run.client, queue_id)).queue_id == queue_id


async def test_auth_login_and_failures(
    dev_env: WorkflowEnvironment, tmp_path: Path, users_file: Path
) -> None:
    async with running(
        dev_env.client, tmp_path, users=users_file, allow_networks=["127.0.0.1/32"]
    ) as run:
        client = smtp(run.port, source_address=("127.0.0.9", 0), tls_context=client_tls())
        async with client:
            await client.starttls()
            await client.ehlo()  # STARTTLS forgets the EHLO (RFC 3207 §4.2)
            with pytest.raises(aiosmtplib.SMTPAuthenticationError) as wrong:
                await client.auth_login(USER, "wrong password")
            assert (wrong.value.code, wrong.value.message) == (
                535,
                "5.7.8 Authentication credentials invalid",
            )
            with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                await client.auth_plain("mallory", PASSWORD)
            # Unauthenticated from outside: still no relaying.
            await command(client, "MAIL FROM:<alice@sender.test>")
            code, _ = await command(client, "RCPT TO:<bob@dest.test>")
            assert code == 554
            reply = await client.auth_login(USER, PASSWORD)
            assert reply.code == 235
            assert (await command(client, "RCPT TO:<bob@dest.test>"))[0] == 250
        # Three failures end the session.
        client = smtp(run.port, tls_context=client_tls())
        async with client:
            await client.starttls()
            await client.ehlo()
            for _ in range(3):
                with pytest.raises(aiosmtplib.SMTPAuthenticationError):
                    await client.auth_plain(USER, "guess")
            code, text = await command(client, "AUTH PLAIN AGFsaWNlAGd1ZXNz")
            assert (code, text) == (421, "4.7.0 Too many failed authentication attempts")


async def test_auth_refused_before_starttls(
    dev_env: WorkflowEnvironment, tmp_path: Path, users_file: Path
) -> None:
    async with running(dev_env.client, tmp_path, users=users_file) as run:
        async with smtp(run.port) as client:
            await client.ehlo()
            assert "auth" not in client.esmtp_extensions
            code, text = await command(client, "AUTH PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
            assert (code, text) == (
                538,
                "5.7.11 Encryption required for requested authentication mechanism",
            )


async def test_submission_port_requires_auth_even_from_trusted_networks(
    dev_env: WorkflowEnvironment, tmp_path: Path, users_file: Path
) -> None:
    async with running(dev_env.client, tmp_path, users=users_file, submission=True) as run:
        port = run.ingest.addresses["submission"][1]
        async with smtp(port, tls_context=client_tls()) as client:
            await client.starttls()
            await client.ehlo()
            code, text = await command(client, "MAIL FROM:<alice@sender.test>")
            assert (code, text) == (530, "5.7.0 Authentication required")
            await client.auth_plain(USER, PASSWORD)
            assert (await send(client))[0] == 250


# -- protocol -------------------------------------------------------------------------


async def test_ehlo_keywords(
    dev_env: WorkflowEnvironment, tmp_path: Path, users_file: Path
) -> None:
    async with running(dev_env.client, tmp_path, users=users_file, max_message_size=123456) as run:
        async with smtp(run.port) as client:
            reply = await client.ehlo()
        assert reply.message.splitlines() == [
            HOST,
            "PIPELINING",
            "SIZE 123456",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "DSN",
            "STARTTLS",
        ]


async def test_size_limit_declared_at_mail(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path, max_message_size=2000) as run:
        async with smtp(run.port) as client:
            await client.ehlo()
            assert client.esmtp_extensions["size"] == "2000"
            code, text = await command(client, "MAIL FROM:<alice@sender.test> SIZE=2001")
            assert (code, text) == (552, "5.3.4 Message size exceeds fixed limit of 2000 octets")
            assert (await command(client, "MAIL FROM:<alice@sender.test> SIZE=2000"))[0] == 250


async def test_size_limit_at_end_of_data_stores_nothing(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    limit = 2000
    filler = b"".join(b"x" * 70 + b"\r\n" for _ in range(30))
    exact = MESSAGE + filler[: limit - len(MESSAGE) - 2] + b"\r\n"
    assert len(exact) == limit
    async with running(dev_env.client, tmp_path, max_message_size=limit) as run:
        async with smtp(run.port) as client:
            code, text = await send(client, exact + b"y\r\n")
            assert (code, text) == (552, "5.3.4 Message size exceeds fixed limit of 2000 octets")
            assert run.spooled() == []
            assert await workflow_count(run.client, run.queue, 0) == 0
            # The session goes on, and a message of exactly the limit is taken.
            code, text = await send(client, exact)
            assert code == 250, text
        assert len(run.spooled()) == 1


async def test_overlong_line_is_refused_and_not_stored(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        code, text = await send(client, MESSAGE + b"z" * 1200 + b"\r\nmore\r\n")
        assert (code, text) == (
            500,
            "5.5.2 Message has a line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
        )
        assert run.spooled() == []
        # The transaction is over and the session goes on.
        assert (await command(client, "RCPT TO:<bob@dest.test>"))[0] == 503
        assert (await send(client))[0] == 250


@pytest.mark.parametrize(
    ("line", "code", "text"),
    [
        ("RCPT TO:<bob>", 501, "5.1.3 Bad recipient address syntax: missing '@domain'"),
        ("RCPT TO:<bob@dest..test>", 501, "5.1.3 Bad recipient address syntax: empty label"),
        ("RCPT TO:<" + "b" * 65 + "@dest.test>", 553, "5.1.3 Bad recipient address: local part"),
        ("RCPT TO:<jürgen@dest.test>", 553, "5.6.7 Bad recipient address: non-ASCII address"),
        ("RCPT TO:<>", 501, "5.1.3 Bad recipient address syntax: the null address"),
        ("RCPT TO:<bob@dest.test> NOTIFY=NEVER,DELAY", 501, "5.5.4 Bad NOTIFY parameter"),
        ("RCPT TO:<bob@dest.test> FOO=BAR", 555, "5.5.4 Unsupported RCPT parameter FOO"),
        ("RCPT bob@dest.test", 501, "5.5.4 Syntax: RCPT TO:<address> [parameters]"),
    ],
)
async def test_bad_recipient_addresses(
    dev_env: WorkflowEnvironment, tmp_path: Path, line: str, code: int, text: str
) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        await client.ehlo()
        assert (await command(client, "MAIL FROM:<alice@sender.test>"))[0] == 250
        got = await command(client, line)
        assert got[0] == code
        assert got[1].startswith(text), got


async def test_bad_sender_and_smtputf8(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        await client.ehlo()
        code, text = await command(client, "MAIL FROM:<al ice@sender.test>")
        assert (code, text) == (
            501,
            "5.1.3 Bad sender address syntax: character ' ' not allowed in the local part",
        )
        code, text = await command(client, "MAIL FROM:<jürgen@sender.test>")
        assert (code, text[:9]) == (553, "5.6.7 Bad")
        assert (await command(client, "MAIL FROM:<jürgen@sender.test> SMTPUTF8"))[0] == 250
        assert (await command(client, "RCPT TO:<zoë@bücher.test>"))[0] == 250
        reply = await client.data(MESSAGE)
        msg = await workflow_input(run.client, queue_id_of(reply.message))
        assert msg.smtputf8 is True
        assert msg.mail_from == "jürgen@sender.test"
        assert [r.address for r in msg.recipients] == ["zoë@bücher.test"]


async def test_recipient_cap(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path, max_recipients=3) as run:
        async with smtp(run.port) as client:
            await client.ehlo()
            await command(client, "MAIL FROM:<alice@sender.test>")
            replies = [await command(client, f"RCPT TO:<r{i}@dest.test>") for i in range(5)]
            reply = await client.data(MESSAGE)
        assert [c for c, _ in replies] == [250, 250, 250, 452, 452]
        assert replies[3][1] == "4.5.3 Error: too many recipients"
        msg = await workflow_input(run.client, queue_id_of(reply.message))
        assert [r.address for r in msg.recipients] == [
            "r0@dest.test",
            "r1@dest.test",
            "r2@dest.test",
        ]


async def test_dsn_parameters_reach_the_workflow_input(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        await client.ehlo()
        assert "dsn" in client.esmtp_extensions
        await command(client, "MAIL FROM:<alice@sender.test> RET=HDRS ENVID=Batch+2B7/x")
        await command(
            client, "RCPT TO:<bob@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+40Dest.test"
        )
        await command(client, "RCPT TO:<carol@dest.test> NOTIFY=NEVER")
        await command(client, "RCPT TO:<dave@other.test>")
        reply = await client.data(MESSAGE)
    msg = await workflow_input(run.client, queue_id_of(reply.message))
    assert (msg.ret, msg.envid) == ("HDRS", "Batch+2B7/x")
    got = {r.address: (r.notify, r.orcpt) for r in msg.recipients}
    assert got == {
        "bob@dest.test": (["SUCCESS", "FAILURE"], "rfc822;Bob@Dest.test"),
        "carol@dest.test": (["NEVER"], None),
        "dave@other.test": (None, None),
    }


async def test_received_header_and_queue_id(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        _, text = await send(client)
    queue_id = queue_id_of(text)
    stored = (run.spool / f"{queue_id}.eml").read_bytes()
    head, _, rest = stored.partition(b"; ")
    assert (
        head
        == (
            "Received: from client.test ([127.0.0.1])\r\n"
            f"\tby {HOST} (Postflow) with ESMTP id {queue_id}\r\n"
            "\tfor <bob@dest.test>"
        ).encode()
    )
    date, _, original = rest.partition(b"\r\n")
    assert date.endswith(b" +0000")
    assert original == MESSAGE
    msg = await workflow_input(run.client, queue_id)
    assert (msg.queue_id, msg.spool_key, msg.size) == (queue_id, queue_id, len(stored))


async def test_pipelined_transaction(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path) as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        writer.write(
            b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<bob@dest.test>\r\n"
            b"RCPT TO:<bad@>\r\nRCPT TO:<carol@dest.test>\r\nDATA\r\n"
        )
        replies = [(await reader.readline())[:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"501", b"250", b"354"]
        writer.write(MESSAGE + b".\r\nQUIT\r\n")
        done = await reader.readline()
        assert done.startswith(b"250 2.0.0 Ok: queued as "), done
        assert (await reader.readline()).startswith(b"221 2.0.0")
        writer.close()


# -- durability -----------------------------------------------------------------------


async def test_451_and_nothing_kept_when_temporal_is_down(tmp_path: Path) -> None:
    closed = await Client.connect("127.0.0.1:1", data_converter=pydantic_data_converter, lazy=True)
    async with running(closed, tmp_path) as run, smtp(run.port) as client:
        code, text = await send(client)
        assert code == 451
        assert text.startswith("4.3.0 ")
        assert run.spooled() == []


async def test_451_and_nothing_kept_when_the_spool_write_fails(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        # The spool's temporary directory replaced by a file: every write fails (ENOTDIR).
        (run.spool / "tmp").rmdir()
        (run.spool / "tmp").write_bytes(b"")
        code, _ = await send(client)
        assert code == 451
        assert [p.name for p in run.spooled()] == ["tmp"]
        assert await workflow_count(run.client, run.queue, 0) == 0


async def test_repeated_start_is_idempotent(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path) as run, smtp(run.port) as client:
        queue_id = queue_id_of((await send(client))[1])
    submitter = Submitter(dev_env.client, run.config, task_queue=run.queue)
    again = await submitter.enqueue(
        "alice@sender.test", ["bob@dest.test"], MESSAGE, queue_id=queue_id
    )
    first = await dev_env.client.get_workflow_handle(message_workflow_id(queue_id)).describe()
    assert again.result_run_id == first.run_id
    assert await workflow_count(dev_env.client, run.queue, 1) == 1


# -- sessions -------------------------------------------------------------------------


async def test_session_cap(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path, max_sessions=2) as run:
        async with smtp(run.port), smtp(run.port):
            reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
            assert (
                await reader.read()
                == f"421 4.3.2 {HOST} Too many sessions, try again later\r\n".encode()
            )
            writer.close()
        # Freed slots are usable again.
        for _ in range(100):
            if not run.ingest.sessions:
                break
            await asyncio.sleep(0.02)
        async with smtp(run.port) as client:
            assert (await client.noop()).code == 250


async def test_idle_timeout(dev_env: WorkflowEnvironment, tmp_path: Path) -> None:
    async with running(dev_env.client, tmp_path, idle_timeout="1s") as run:
        reader, writer = await asyncio.open_connection("127.0.0.1", run.port)
        await reader.readline()
        started = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), timeout=5)
        assert rest == f"421 4.4.2 {HOST} Error: timeout exceeded\r\n".encode()
        assert 0.9 < time.monotonic() - started < 3
        writer.close()


async def test_drain_finishes_transactions_in_progress(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    async with running(dev_env.client, tmp_path) as run:
        busy, idle = smtp(run.port), smtp(run.port)
        await busy.connect()
        await idle.connect()
        await command(busy, "MAIL FROM:<alice@sender.test>")
        await command(busy, "RCPT TO:<bob@dest.test>")
        draining = asyncio.create_task(run.ingest.drain(grace=10))
        await asyncio.sleep(0.2)
        # The idle session is told and closed; no new session is accepted.
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await idle.noop()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", run.port)
        assert not draining.done()
        # The transaction in progress completes, then that session is closed too.
        reply = await busy.data(MESSAGE)
        assert reply.code == 250
        await asyncio.wait_for(draining, timeout=5)
        assert len(run.spooled()) == 1
        assert await workflow_count(run.client, run.queue, 1) == 1


async def test_sigterm_drains_the_ingest_process(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = dev_env.client.service_client.config.target_host
    config = tmp_path / "postflow.toml"
    config.write_text(
        f'[temporal]\naddress = "{target}"\n[ingest]\nlisten = "127.0.0.1:{port}"\n'
        f'hostname = "{HOST}"\n[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "postflow.cli", "--config", str(config), "ingest"],
        cwd=ROOT,
        env={**os.environ, "POSTFLOW_LOG_LEVEL": "WARNING"},
    )
    try:
        client = smtp(port)
        for _ in range(100):
            try:
                await client.connect()
                break
            except (OSError, aiosmtplib.SMTPConnectError):
                await asyncio.sleep(0.1)
        await command(client, "MAIL FROM:<alice@sender.test>")
        await command(client, "RCPT TO:<bob@dest.test>")
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert proc.returncode is None  # still there for the transaction in progress
        reply = await client.data(MESSAGE)
        assert reply.code == 250
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    queue_id = queue_id_of(reply.message)
    assert (await workflow_input(dev_env.client, queue_id)).queue_id == queue_id


async def test_idle_ingest_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """No session to wait for: SIGTERM must not wait out the drain timeout (60 s)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "postflow.toml"
    config.write_text(
        f'[temporal]\naddress = "127.0.0.1:1"\n[ingest]\nlisten = "127.0.0.1:{port}"\n'
        f'[spool]\npath = "{tmp_path / "spool"}"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "postflow.cli", "--config", str(config), "ingest"],
        cwd=ROOT,
        env={**os.environ, "POSTFLOW_LOG_LEVEL": "WARNING"},
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # the probe connection's session has ended
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

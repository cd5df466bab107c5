"""End to end through the CLI: `postflow up`, a message over SMTP, the sink, the history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiosmtplib
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from postflow.constants import message_workflow_id

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.test>\r\n"
    b"Subject: End to end\r\n"
    b"Message-ID: <e2e-1@example.org>\r\n"
    b"\r\n"
    b"Line one.\r\n"
    b"..a line that starts with a dot\r\n"
    b"Last line.\r\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {port}")


async def test_postflow_up_delivers_a_message_to_the_sink(tmp_path: Path) -> None:
    ports = {k: _free_port() for k in ("temporal", "ui", "ingest", "sink")}
    (tmp_path / "postflow.toml").write_text(
        f"""
[temporal]
address = "127.0.0.1:{ports["temporal"]}"
ui_port = {ports["ui"]}
db_filename = "var/temporal.db"
[ingest]
listen = "127.0.0.1:{ports["ingest"]}"
[smtp]
helo_name = "postflow.test"
[sink]
listen = "127.0.0.1:{ports["sink"]}"
path = "var/sink"
[transports.default]
destination = "server:127.0.0.1:{ports["sink"]}"
tls = "none"
"""
    )
    env = {**os.environ, "POSTFLOW_LOG_LEVEL": "WARNING"}
    env.pop("POSTFLOW_CONFIG", None)
    up = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "postflow.cli", "up"],
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await asyncio.to_thread(_wait_port, ports["ingest"], 60)
        code, reply = await _send_when_ready(ports["ingest"])
        assert code == 250, reply
        queue_id = reply.rsplit(" ", 1)[-1]
        sink = tmp_path / "var" / "sink"
        for _ in range(150):
            if list(sink.glob("*.eml")):
                break
            await asyncio.sleep(0.2)
        [eml] = list(sink.glob("*.eml"))
        envelope = json.loads(eml.with_suffix(".json").read_text())
        assert envelope["mail_from"] == "alice@example.org"
        assert envelope["rcpt_tos"] == ["bob@example.test"]
        # Byte for byte (dot-stuffing undone), after the ingest's own trace header.
        received = eml.read_bytes()
        assert received.endswith(MESSAGE)
        trace = received[: -len(MESSAGE)].decode()
        assert trace.startswith("Received: from ")
        assert f"id {queue_id}" in " ".join(trace.split())

        client = await Client.connect(f"127.0.0.1:{ports['temporal']}")
        handle = client.get_workflow_handle(message_workflow_id(queue_id))
        for _ in range(50):
            if (await handle.describe()).status.name == "COMPLETED":
                break
            await asyncio.sleep(0.2)
        completed = [
            e
            async for e in handle.fetch_history_events()
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED
        ]
        assert len(completed) == 1  # one SMTP attempt
        assert not (tmp_path / "var" / "spool" / f"{queue_id}.eml").exists()
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(up.communicate(), 60)
    assert up.returncode == 0, out.decode(errors="replace")
    assert b"Temporal Web UI" in out


async def _send_when_ready(port: int) -> tuple[int, str]:
    # The ingest may listen a moment before the worker polls: that is fine, the message
    # waits in Temporal. Retry only while the ingest itself answers 451 (starting up).
    for _ in range(50):
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        try:
            _, reply = await client.sendmail("alice@example.org", ["bob@example.test"], MESSAGE)
            return 250, reply
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code != 451:
                return exc.code, exc.message
        finally:
            await client.quit()
        await asyncio.sleep(0.5)
    raise AssertionError("ingest never accepted the message")

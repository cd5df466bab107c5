"""Postflow as separate processes for the fault scenarios: dev server, worker(s), ingest.

The dev server is started with `postflow up`'s own command line (SQLite with WAL, search
attributes), so a restart finds its workflows again; the worker and the ingest are the
real `python -m postflow.cli` commands, so `kill -9` hits what production runs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client

from postflow.config import load_config
from postflow.temporal import connect
from postflow.up import dev_server_command

__all__ = ["ROOT", "Stack", "free_port"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> None:
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))


@dataclass
class Stack:
    """One Postflow installation under `workdir`; every process logs to `workdir/<name>.log`."""

    workdir: Path
    destination: str
    smtp: dict[str, Any] = field(default_factory=dict)
    transport: dict[str, Any] = field(default_factory=dict)
    spool_path: Path | None = None
    temporal_port: int = field(default_factory=free_port)
    ingest_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _client: Client | None = None
    _started: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spool_path = self.spool_path or self.workdir / "spool"
        self.config_path = self.workdir / "postflow.toml"
        write_toml(
            self.config_path,
            {
                "temporal": {
                    "address": f"127.0.0.1:{self.temporal_port}",
                    "ui_port": free_port(),
                    "db_filename": str(self.workdir / "temporal.db"),
                },
                "ingest": {"listen": f"127.0.0.1:{self.ingest_port}", "max_sessions": 1000},
                "spool": {"path": str(self.spool_path)},
                "smtp": {"helo_name": "postflow.test", "connect_timeout": "5s", **self.smtp},
                "transports.default": {
                    "destination": self.destination,
                    "tls": "none",
                    "retry_delays": "1",
                    **self.transport,
                },
            },
        )
        self.config = load_config(self.config_path)

    # ---- processes ----------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        self._started += 1
        env = {
            **os.environ,
            "POSTFLOW_CONFIG": str(self.config_path),
            "POSTFLOW_LOG_LEVEL": "WARNING",
        }
        log = (self.workdir / f"{name}.log").open("ab")
        log.write(f"---- start {name} #{self._started} at {time.time():.3f}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    async def start_temporal(self) -> None:
        self._spawn("temporal", [*dev_server_command(self.config), "--headless"])
        deadline = time.monotonic() + 60
        while True:
            try:
                client = await self.client(fresh=True)
                await client.count_workflows()
                return
            except Exception:
                if time.monotonic() > deadline or self.procs["temporal"].poll() is not None:
                    raise RuntimeError(
                        f"dev server did not start; see {self.workdir / 'temporal.log'}"
                    ) from None
                await asyncio.sleep(0.3)

    def start_worker(self) -> None:
        self._spawn("worker", [sys.executable, "-m", "postflow.cli", "worker"])

    async def start_ingest(self) -> None:
        self._spawn("ingest", [sys.executable, "-m", "postflow.cli", "ingest"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.procs["ingest"].poll() is not None:
                break
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.ingest_port)
                greeting = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                if greeting.startswith(b"220"):
                    return
            except (OSError, TimeoutError):
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"ingest did not start; see {self.workdir / 'ingest.log'}")

    def kill(self, name: str) -> None:
        """`kill -9`: no cleanup, no goodbye, exactly like a crash."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    async def stop(self) -> None:
        """Everything down: worker and ingest first, the dev server last."""
        if self._client is not None:
            self._client = None
        for name in ("ingest", "worker", "temporal"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def client(self, *, fresh: bool = False) -> Client:
        if self._client is None or fresh:
            self._client = await connect(self.config)
        return self._client

    async def running_workflows(self) -> int:
        client = await self.client()
        count = await client.count_workflows("ExecutionStatus = 'Running'")
        return count.count

    def spool_files(self) -> tuple[list[str], list[str]]:
        """Bodies (`*.eml`) and half-written temp files left in the spool directory."""
        assert self.spool_path is not None
        bodies = sorted(p.name for p in self.spool_path.glob("*.eml"))
        tmp = self.spool_path / "tmp"
        temps = sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
        return bodies, temps

    async def sweep(self, grace: str = "0") -> str:
        """`postflow sweep` as an operator would run it after a crash."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "postflow.cli",
            "sweep",
            "--grace",
            grace,
            cwd=ROOT,
            env={
                **os.environ,
                "POSTFLOW_CONFIG": str(self.config_path),
                "POSTFLOW_LOG_LEVEL": "WARNING",
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"postflow sweep exited {proc.returncode}: {out.decode()}")
        return out.decode()

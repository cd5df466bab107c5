"""`postflow up`: the embedded default installation on one machine.

Starts the Temporal dev server (SQLite with WAL, search attributes, Web UI), then the
worker, the ingest and, when configured, the sink, each as its own process. Ctrl-C or
SIGTERM stops them all, the dev server last.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from postflow.config import Config
from postflow.constants import SEARCH_ATTRIBUTES
from postflow.destination import parse_host_port
from postflow.temporal import find_binary

__all__ = ["dev_server_command", "run_up"]


def dev_server_command(config: Config) -> list[str]:
    address = parse_host_port(config.temporal.address, 7233)
    Path(config.temporal.db_filename).parent.mkdir(parents=True, exist_ok=True)
    command = [
        find_binary("temporal"),
        "server",
        "start-dev",
        "--ip",
        address.host,
        "--port",
        str(address.port),
        "--ui-port",
        str(config.temporal.ui_port),
        "--namespace",
        config.temporal.namespace,
        "--db-filename",
        config.temporal.db_filename,
        # Measured here: the default journal halves throughput; WAL matches in-memory.
        "--sqlite-pragma",
        "journal_mode=wal",
        "--sqlite-pragma",
        "synchronous=normal",
        "--log-level",
        "warn",
    ]
    for name, kind in SEARCH_ATTRIBUTES.items():
        command += ["--search-attribute", f"{name}={kind}"]
    return command


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def run_up(config: Config, config_path: str | None) -> int:
    env = dict(os.environ)
    if config_path:
        env["POSTFLOW_CONFIG"] = str(Path(config_path).resolve())
    me = [sys.executable, "-m", "postflow.cli"]
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    address = parse_host_port(config.temporal.address, 7233)
    server = subprocess.Popen(dev_server_command(config), env=env, start_new_session=True)
    procs.append(("temporal", server))
    try:
        if not _wait_port(address.host, address.port, 60):
            print("postflow up: the Temporal dev server did not start", file=sys.stderr)
            return 1
        time.sleep(1.0)  # the frontend listens a moment before namespaces are ready
        for name in ("worker", "ingest"):
            procs.append((name, subprocess.Popen([*me, name], env=env, start_new_session=True)))
        if config.sink is not None:
            procs.append(("sink", subprocess.Popen([*me, "sink"], env=env, start_new_session=True)))
        ui = f"http://{address.host}:{config.temporal.ui_port}"
        ingest = config.ingest.listen
        print(
            f"\nPostflow is up.\n"
            f"  Temporal Web UI : {ui}/namespaces/{config.temporal.namespace}/workflows\n"
            f"  SMTP ingest     : {ingest}\n"
            + (
                f"  Sink            : {config.sink.listen} → {config.sink.path}/\n"
                if config.sink
                else ""
            )
            + "\nSend a first mail:\n"
            "  postflow send --from alice@example.org --to bob@example.test examples/hello.eml\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        stop = False

        def _stop(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stop:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"postflow up: {name} exited with {proc.returncode}", file=sys.stderr)
                    stop = True
            time.sleep(0.5)
        return 0
    finally:
        # Workers and ingest first, so in-flight sessions end; the server last.
        for _name, proc in reversed(procs[1:]):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in procs[1:]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

"""Shared plumbing for the benchmarks: free ports, a dev server, processes and their cost."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from postflow.constants import SEARCH_ATTRIBUTES  # noqa: E402
from postflow.temporal import find_binary  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


WORDS = "queue relay domain transport retry message deliver sender header body".split()


def bench_message(n: int, *, tag: str = "bench", size: int = 5000) -> bytes:
    """Message n of a run: ~`size` bytes of CRLF text, told apart by `X-Bench-Id: n`."""
    rng = random.Random(n)
    head = (
        f"From: Bench <bench@sender.test>\r\nTo: Sink <sink@dest.test>\r\n"
        f"Subject: {tag} {n}\r\nMessage-ID: <{tag}-{n}@sender.test>\r\nX-Bench-Id: {n}\r\n\r\n"
    ).encode()
    lines, total = [], len(head)
    while total < size:
        line = (" ".join(rng.choice(WORDS) for _ in range(11)) + "\r\n").encode()
        lines.append(line)
        total += len(line)
    return head + b"".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@dataclass(eq=False)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its reaped children."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(f) for f in fields[11:15]) / _TICKS

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def start_dev_server(workdir: Path, port: int, ui_port: int) -> Proc:
    """The dev server as `postflow up` runs it: SQLite with WAL, search attributes."""
    command = [
        find_binary("temporal"), "server", "start-dev", "--ip", "127.0.0.1",
        "--port", str(port), "--ui-port", str(ui_port), "--headless",
        "--db-filename", str(workdir / "temporal.db"),
        "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal",
        "--log-level", "error",
    ]  # fmt: skip
    for name, kind in SEARCH_ATTRIBUTES.items():
        command += ["--search-attribute", f"{name}={kind}"]
    proc = Proc("temporal", subprocess.Popen(command, stdout=subprocess.DEVNULL))
    wait_port(port)
    time.sleep(1.5)
    return proc


def start_postflow(name: str, config: Path, *args: str) -> Proc:
    env = {**os.environ, "POSTFLOW_CONFIG": str(config), "POSTFLOW_LOG_LEVEL": "WARNING"}
    popen = subprocess.Popen([sys.executable, "-m", "postflow.cli", name, *args], env=env, cwd=ROOT)
    return Proc(name, popen)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def machine() -> dict[str, object]:
    load = os.getloadavg()
    return {"cores": os.cpu_count(), "loadavg_at_start": [round(x, 2) for x in load]}

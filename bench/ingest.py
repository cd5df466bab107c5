"""Ingest load: N messages (default 10 000, ~5 KB) from 20, then 100, concurrent SMTP sessions.

Starts its own dev server (SQLite + WAL, as `postflow up`) and, for each concurrency, a
fresh `postflow ingest` process; no worker runs, so only the ingest (spool fsync plus
workflow start) is measured. Writes bench/results/ingest.json: accepted messages per
second, p50/p95 of the time from the end of DATA (the final dot sent) to the 250 reply,
the ingest's peak RSS and CPU, and how many accepted queue ids exist as workflows after.

    python bench/ingest.py [--messages 10000] [--sessions 20,100] [--per-connection 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiosmtplib
from common import (
    bench_message,
    free_port,
    machine,
    percentile,
    start_dev_server,
    start_postflow,
    wait_port,
    write_result,
)
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError

from postflow.constants import message_workflow_id


def make_message(n: int) -> bytes:
    return bench_message(n, tag="ingest")


class Run:
    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.latencies: list[float] = []
        self.refused: Counter[str] = Counter()


async def _one(client: aiosmtplib.SMTP, n: int, run: Run) -> None:
    await client.mail("bench@sender.test")
    await client.rcpt(f"rcpt{n % 50}@dest.test")
    start = await client.execute_command(b"DATA")
    if start.code != 354:
        run.refused[f"DATA {start.code}"] += 1
        return
    payload = make_message(n).replace(b"\r\n.", b"\r\n..") + b".\r\n"
    protocol = client.protocol
    assert protocol is not None
    # DATA's end measured exactly: the final dot written, then the reply awaited.
    protocol._response_pending = True
    began = time.perf_counter()
    protocol.write(payload)
    reply = await protocol.read_response(timeout=120)
    elapsed = time.perf_counter() - began
    if reply.code == 250:
        run.accepted.append(reply.message.rsplit(" ", 1)[1])
        run.latencies.append(elapsed)
    else:
        run.refused[f"{reply.code} {reply.message[:40]}"] += 1


async def _session_loop(port: int, numbers: list[int], per_connection: int, run: Run) -> None:
    for start in range(0, len(numbers), per_connection):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, start_tls=False, timeout=120,
            local_hostname="bench.test",
        )  # fmt: skip
        async with client:
            for n in numbers[start : start + per_connection]:
                try:
                    await _one(client, n, run)
                except aiosmtplib.SMTPException as exc:
                    run.refused[type(exc).__name__] += 1
                    await client.rset()


async def submit_all(port: int, messages: int, sessions: int, per_connection: int) -> Run:
    run = Run()
    shares = [list(range(i, messages, sessions)) for i in range(sessions)]
    await asyncio.gather(*(_session_loop(port, s, per_connection, run) for s in shares if s))
    return run


async def count_workflows(client: Client, queue_ids: list[str]) -> int:
    """Listed through visibility, then each one still missing asked for directly."""
    wanted = {message_workflow_id(q) for q in queue_ids}
    seen = {w.id async for w in client.list_workflows('WorkflowType = "DeliverMessage"')}
    found = len(wanted & seen)
    for workflow_id in wanted - seen:
        try:
            await client.get_workflow_handle(workflow_id).describe()
            found += 1
        except RPCError:
            pass
    return found


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    port, ui = free_port(), free_port()
    server = start_dev_server(workdir, port, ui)
    results = []
    try:
        client = await Client.connect(f"127.0.0.1:{port}", data_converter=pydantic_data_converter)
        for sessions in args.sessions:
            ingest_port = free_port()
            config = workdir / f"ingest-{sessions}.toml"
            config.write_text(
                f'[temporal]\naddress = "127.0.0.1:{port}"\n'
                f'[ingest]\nlisten = "127.0.0.1:{ingest_port}"\nhostname = "mx.bench.test"\n'
                f"max_sessions = {sessions + 10}\n"
                f'[spool]\npath = "{workdir / f"spool-{sessions}"}"\n'
            )
            ingest = start_postflow("ingest", config)
            try:
                wait_port(ingest_port)
                cpu_ingest, cpu_server = ingest.cpu_seconds(), server.cpu_seconds()
                began = time.perf_counter()
                run = await submit_all(ingest_port, args.messages, sessions, args.per_connection)
                elapsed = time.perf_counter() - began
                cpu_ingest = ingest.cpu_seconds() - cpu_ingest
                cpu_server = server.cpu_seconds() - cpu_server
                rss = ingest.peak_rss_mb()
            finally:
                ingest.stop()
            await asyncio.sleep(1)  # visibility catches up
            found = await count_workflows(client, run.accepted)
            per_k = 1000 / max(1, len(run.accepted))
            ms = [x * 1000 for x in run.latencies]
            result = {
                "sessions": sessions,
                "accepted": len(run.accepted),
                "refused": dict(run.refused),
                "elapsed_s": round(elapsed, 2),
                "accepted_per_s": round(len(run.accepted) / elapsed, 1),
                "data_end_to_250_ms": {
                    "p50": round(percentile(ms, 50), 2),
                    "p95": round(percentile(ms, 95), 2),
                    "max": round(max(ms, default=float("nan")), 2),
                },
                "ingest_peak_rss_mb": round(rss, 1),
                "cpu_s_per_1000": {
                    "ingest": round(cpu_ingest * per_k, 2),
                    "temporal_server": round(cpu_server * per_k, 2),
                },
                "accepted_ids_found_as_workflows": found,
            }
            print(result, flush=True)
            results.append(result)
    finally:
        server.stop()
    return {
        "messages_per_run": args.messages,
        "message_bytes": len(make_message(0)),
        "per_connection": args.per_connection,
        "worker": "stopped (ingest only)",
        "runs": results,
        "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument(
        "--sessions", type=lambda s: [int(x) for x in s.split(",")], default=[20, 100]
    )
    parser.add_argument("--per-connection", type=int, default=100, help="messages per session")
    parser.add_argument("--output", default="ingest", help="name of the JSON in bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="postflow-bench-ingest-") as tmp:
        data = asyncio.run(measure(args, Path(tmp)))
    path = write_result(args.output, data)
    print(f"wrote {path}")
    runs: list[dict[str, int]] = data["runs"]  # type: ignore[assignment]
    ok = all(r["accepted_ids_found_as_workflows"] == r["accepted"] for r in runs)
    sys.stdout.flush()
    # The Temporal SDK can abort at interpreter exit (sdk-python#300): leave directly.
    os._exit(0 if ok else 1)


if __name__ == "__main__":
    main()

"""Throughput: N messages (default 2000, ~5 KB) through the SMTP ingest to a loopback sink.

Starts its own dev server (SQLite + WAL, as `postflow up`), runs a minimal baseline (one
workflow with one aiosmtplib activity) and then Postflow's full pipeline (ingest, worker)
on it, and writes bench/results/throughput.json: messages per second from first
submission to last delivery, latency p50/p95, worker peak RSS, workflow tasks and history
events per message, CPU seconds per 1000 messages for worker, ingest and server.

    python bench/throughput.py [--messages 2000] [--sessions 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP
from common import (
    ROOT,
    Proc,
    bench_message,
    free_port,
    machine,
    percentile,
    start_dev_server,
    start_postflow,
    wait_port,
    write_result,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from postflow.constants import message_workflow_id


def make_message(n: int) -> bytes:
    return bench_message(n, tag="bench")


class Sink:
    def __init__(self) -> None:
        self.arrived: dict[int, float] = {}
        self.done = asyncio.Event()
        self.expect = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        data: bytes = envelope.original_content  # type: ignore[attr-defined]
        start = data.find(b"X-Bench-Id: ") + len(b"X-Bench-Id: ")
        ident = int(data[start : data.find(b"\r\n", start)])
        self.arrived.setdefault(ident, time.monotonic())
        if len(self.arrived) >= self.expect:
            self.done.set()
        return "250 2.0.0 Ok"


async def submit_all(port: int, count: int, sessions: int, sent: dict[int, float]) -> list[str]:
    queue_ids: list[str] = []
    todo = iter(range(count))

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=120)
        await client.connect()
        for n in todo:
            sent[n] = time.monotonic()
            _, reply = await client.sendmail(
                "bench@sender.test", ["sink@dest.test"], make_message(n)
            )
            queue_ids.append(reply.rsplit(" ", 1)[-1])
        await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))
    return queue_ids


async def history_cost(client: Client, queue_ids: list[str], sample: int = 25) -> dict:
    tasks, events = [], []
    for queue_id in random.Random(1).sample(queue_ids, min(sample, len(queue_ids))):
        handle = client.get_workflow_handle(message_workflow_id(queue_id))
        history = [e async for e in handle.fetch_history_events()]
        events.append(len(history))
        tasks.append(
            sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED for e in history)
        )
    return {
        "workflow_tasks_per_message": max(tasks),
        "history_events_per_message": max(events),
        "sampled_messages": len(events),
    }


async def wait_all(sink: Sink, count: int, limit: float) -> None:
    sink.expect = count
    if len(sink.arrived) >= count:
        return
    await asyncio.wait_for(sink.done.wait(), limit)


async def run_baseline(
    address: str, sink: Sink, sink_port: int, args, work: Path, server: Proc
) -> dict:
    message = work / "baseline.eml"
    message.write_bytes(make_message(0))
    worker = start_postflow_like_baseline(address)
    client = await Client.connect(address)
    sink.arrived.clear()
    sink.done.clear()
    sent: dict[int, float] = {}
    # The baseline sends the same bytes each time; tell deliveries apart by order of arrival.
    originals = sink.handle_DATA
    counter = iter(range(args.messages))

    async def handle(server: object, session: object, envelope: object) -> str:
        sink.arrived[next(counter)] = time.monotonic()
        if len(sink.arrived) >= sink.expect:
            sink.done.set()
        return "250 2.0.0 Ok"

    sink.handle_DATA = handle  # type: ignore[method-assign]
    sink.expect = args.messages
    todo = iter(range(args.messages))

    async def starter() -> None:
        for n in todo:
            sent[n] = time.monotonic()
            await client.start_workflow(
                "BaselineSend",
                [str(message), str(sink_port), "bench@sender.test", "sink@dest.test"],
                id=f"baseline-{n}-{time.time_ns()}",
                task_queue="baseline",
            )

    server_cpu = server.cpu_seconds()
    started = time.monotonic()
    await asyncio.gather(*(starter() for _ in range(args.sessions)))
    await wait_all(sink, args.messages, 1800)
    elapsed = max(sink.arrived.values()) - started
    sink.handle_DATA = originals  # type: ignore[method-assign]
    await asyncio.sleep(2)  # let the last workflows complete before stopping their worker
    worker.stop()
    return {"messages": args.messages, "seconds": round(elapsed, 2),
            "messages_per_second": round(args.messages / elapsed, 1),
            "server_cpu_seconds_per_1000":
                round((server.cpu_seconds() - server_cpu) * 1000 / args.messages, 2)}  # fmt: skip


def start_postflow_like_baseline(address: str) -> Proc:
    return Proc(
        "baseline",
        subprocess.Popen([sys.executable, str(ROOT / "bench" / "baseline.py"), address]),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--output", default="throughput")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="postflow-bench-"))
    port, ui, ingest_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    server = start_dev_server(work, port, ui)
    sink = Sink()
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(lambda: SMTP(sink, decode_data=False), "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    result: dict = {"machine": machine(), "messages": args.messages, "sessions": args.sessions,
                    "workers": args.workers, "message_bytes": len(make_message(0))}  # fmt: skip
    procs = []
    try:
        if not args.skip_baseline:
            result["baseline"] = await run_baseline(address, sink, sink_port, args, work, server)
            print("baseline:", result["baseline"], flush=True)

        config = work / "postflow.toml"
        config.write_text(
            f'[temporal]\naddress = "{address}"\n'
            f'[ingest]\nlisten = "127.0.0.1:{ingest_port}"\n'
            f'[spool]\npath = "{work / "spool"}"\n'
            f'[smtp]\nhelo_name = "bench.test"\n'
            f'[transports.default]\ndestination = "server:127.0.0.1:{sink_port}"\ntls = "none"\n'
        )
        workers = [start_postflow("worker", config) for _ in range(args.workers)]
        ingest = start_postflow("ingest", config)
        procs = [*workers, ingest]
        wait_port(ingest_port)
        await asyncio.sleep(1.0)
        cpu0 = {p: p.cpu_seconds() for p in [*procs, server]}
        sink.arrived.clear()
        sink.done.clear()
        sent: dict[int, float] = {}
        started = time.monotonic()
        submitting = asyncio.create_task(
            submit_all(ingest_port, args.messages, args.sessions, sent)
        )
        await wait_all(sink, args.messages, 3600)
        queue_ids = await submitting
        finished = max(sink.arrived.values())
        elapsed = finished - started
        latencies = [sink.arrived[n] - sent[n] for n in sent if n in sink.arrived]
        per_k = 1000 / args.messages
        result["postflow"] = {
            "messages_per_second": round(args.messages / elapsed, 1),
            "seconds": round(elapsed, 2),
            "submit_seconds": round(max(sent.values()) - started, 2),
            "latency_p50_s": round(percentile(latencies, 50), 3),
            "latency_p95_s": round(percentile(latencies, 95), 3),
            "worker_peak_rss_mb": round(max(w.peak_rss_mb() for w in workers), 1),
            "ingest_peak_rss_mb": round(ingest.peak_rss_mb(), 1),
            "cpu_seconds_per_1000": {
                "worker": round(sum(w.cpu_seconds() - cpu0[w] for w in workers) * per_k, 2),
                "ingest": round((ingest.cpu_seconds() - cpu0[ingest]) * per_k, 2),
                "server": round((server.cpu_seconds() - cpu0[server]) * per_k, 2),
            },
        }
        await asyncio.sleep(2)  # let the last workflows complete before reading histories
        client = await Client.connect(address)
        result["postflow"].update(await history_cost(client, queue_ids))
        if "baseline" in result:
            result["ratio_to_baseline"] = round(
                result["postflow"]["messages_per_second"]
                / result["baseline"]["messages_per_second"],
                2,
            )
    finally:
        for proc in procs:
            proc.stop()
        server.stop()
        sink_server.close()
    path = write_result(args.output, result)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())

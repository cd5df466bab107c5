"""Prioritized queue: corporate mail submitted while a bulk backlog drains, with and without rules.

For each run it starts its own dev server (SQLite + WAL, as `postflow up`), a `postflow
worker` and a `postflow ingest` process with a config file written to a temporary directory,
and a loopback sink that takes 50 ms per message. It submits a bulk backlog through the
ingest first (default 5000 messages from list@news.test), then, while the backlog drains,
prioritized messages from ceo@corp.test at a steady pace (default 50, one every 0.5 s). The
runs: `with_rules` (`[[priority]] sender_domains = ["corp.test"]`), `without_rules` (the
same traffic, rules removed) and `bulk_only` (no corporate traffic). Writes
bench/results/priority.json: ingest-to-delivered latency p50/p95/max of the corporate mail,
bulk throughput, and whether the corporate mail really ran on the priority queue.

    python bench/priority.py [--bulk 5000] [--priority 50] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from common import (
    free_port,
    machine,
    percentile,
    start_dev_server,
    start_postflow,
    wait_port,
    write_result,
)
from temporalio.client import Client

BULK_SENDER = "list@news.test"
CORP_SENDER = "ceo@corp.test"
RULES = '[[priority]]\nsender_domains = ["corp.test"]\n'
FILLER = b"".join(b"bulk campaign line %02d with some words to make a typical size\r\n" % i
                  for i in range(40))  # fmt: skip


def make_message(ident: str, sender: str) -> bytes:
    head = (
        f"From: <{sender}>\r\nTo: <reader@dest.test>\r\nSubject: bench {ident}\r\n"
        f"Message-ID: <{ident}@bench.test>\r\nX-Bench-Id: {ident}\r\n\r\n"
    ).encode()
    return head + FILLER


class Sink:
    """The receiving MTA: 50 ms per message, and when each message arrived."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrived: dict[str, float] = {}
        self.expect = 0
        self.done = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        data = envelope.original_content or b""
        start = data.find(b"X-Bench-Id: ") + len(b"X-Bench-Id: ")
        ident = data[start : data.find(b"\r\n", start)].decode()
        self.arrived.setdefault(ident, time.monotonic())
        if len(self.arrived) >= self.expect:
            self.done.set()
        return "250 2.0.0 Ok"


async def submit_bulk(port: int, count: int, sessions: int, sent: dict[str, float]) -> None:
    todo = iter(range(count))

    async def session() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=300)
        await client.connect()
        for n in todo:
            ident = f"b{n}"
            sent[ident] = time.monotonic()
            await client.sendmail(
                BULK_SENDER, ["reader@dest.test"], make_message(ident, BULK_SENDER)
            )
        await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))


async def submit_priority(
    port: int,
    count: int,
    interval: float,
    sent: dict[str, float],
    accepted: dict[str, float],
    sink: Sink,
) -> list[int]:
    """One message per interval on one connection; returns the bulk backlog at each send."""
    backlog = []
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=300)
    await client.connect()
    began = time.monotonic()
    for n in range(count):
        await asyncio.sleep(max(0.0, began + n * interval - time.monotonic()))
        ident = f"p{n}"
        backlog.append(sum(1 for k in sent if k[0] == "b" and k not in sink.arrived))
        sent[ident] = time.monotonic()
        await client.sendmail(CORP_SENDER, ["cfo@dest.test"], make_message(ident, CORP_SENDER))
        accepted[ident] = time.monotonic()
    await client.quit()
    return backlog


async def run_once(name: str, args: argparse.Namespace, rules: str, corp: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"postflow-bench-priority-{name}-"))
    port, ui, ingest_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    sink = Sink(args.sink_delay_ms / 1000)
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(lambda: SMTP(sink, decode_data=False), "127.0.0.1", 0)
    sink_port = sink_server.sockets[0].getsockname()[1]
    config = work / "postflow.toml"
    config.write_text(
        f'[temporal]\naddress = "{address}"\n'
        f'[ingest]\nlisten = "127.0.0.1:{ingest_port}"\n'
        f'[spool]\npath = "{work / "spool"}"\n'
        f'[smtp]\nhelo_name = "bench.test"\n'
        f'[transports.default]\ndestination = "server:127.0.0.1:{sink_port}"\ntls = "none"\n'
        + rules
    )
    server = start_dev_server(work, port, ui)
    procs = [start_postflow("worker", config), start_postflow("ingest", config)]
    try:
        wait_port(ingest_port)
        await asyncio.sleep(2.0)  # let the worker's pollers reach the server
        sent: dict[str, float] = {}
        sink.expect = args.bulk + corp
        started = time.monotonic()
        await submit_bulk(ingest_port, args.bulk, args.sessions, sent)
        bulk_submitted = time.monotonic()
        accepted: dict[str, float] = {}
        backlog = await submit_priority(ingest_port, corp, args.interval, sent, accepted, sink)
        await asyncio.wait_for(sink.done.wait(), args.timeout)
        client = await Client.connect(address)
        on_priority_queue = (
            await client.count_workflows('WorkflowType = "DeliverMessage" AND Priority = true')
        ).count
    finally:
        cpu = {
            p.name: round(p.cpu_seconds(), 1) for p in [*procs, server] if p.popen.poll() is None
        }
        for proc in procs:
            proc.stop()
        server.stop()
        sink_server.close()

    bulk_times = [sink.arrived[k] for k in sent if k[0] == "b"]
    corp_ids = [k for k in sent if k[0] == "p"]
    latency = [sink.arrived[k] - sent[k] for k in corp_ids]
    last_bulk = max(bulk_times)
    result: dict = {
        "bulk": {
            "messages": args.bulk,
            "submit_seconds": round(bulk_submitted - started, 2),
            "drained_seconds": round(last_bulk - started, 2),
            "messages_per_second": round(args.bulk / (last_bulk - started), 1),
        },
        "delivered": len(sink.arrived),
        "submitted": len(sent),
        "cpu_seconds": cpu,
    }
    if corp:
        last_corp = max(sink.arrived[k] for k in corp_ids)
        result["corporate"] = {
            "messages": corp,
            "on_priority_queue": on_priority_queue,
            "latency_p50_s": round(percentile(latency, 50), 3),
            "latency_p95_s": round(percentile(latency, 95), 3),
            "latency_max_s": round(max(latency), 3),
            # Of which the ingest's part: SMTP DATA to its 250 (body stored, workflow started).
            "ingest_p50_s": round(percentile([accepted[k] - sent[k] for k in corp_ids], 50), 3),
            "bulk_backlog_when_sent": {"first": backlog[0], "last": backlog[-1]},
            # More than 0: every corporate message arrived while bulk mail was still queued.
            "bulk_still_queued_at_last_corporate_delivery": sum(t > last_corp for t in bulk_times),
        }
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk", type=int, default=5000, help="bulk backlog size")
    parser.add_argument("--priority", type=int, default=50, help="corporate messages")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between them")
    parser.add_argument("--sessions", type=int, default=10, help="SMTP sessions for bulk")
    parser.add_argument("--sink-delay-ms", type=float, default=50)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--skip-bulk-only", action="store_true")
    parser.add_argument("--output", default="priority")
    args = parser.parse_args()

    result: dict = {
        "machine": machine(),
        "bulk": args.bulk,
        "priority": args.priority,
        "interval_s": args.interval,
        "sink_delay_ms": args.sink_delay_ms,
        "bulk_sessions": args.sessions,
        "runs": {},
    }
    runs = [("with_rules", RULES, args.priority), ("without_rules", "", args.priority)]
    if not args.skip_bulk_only:
        runs.append(("bulk_only", RULES, 0))
    for name, rules, corp in runs:
        result["runs"][name] = await run_once(name, args, rules, corp)
        print(name, result["runs"][name], flush=True)

    runs_done = result["runs"]
    with_rules = runs_done["with_rules"]
    summary = {
        "priority_p95_s": with_rules["corporate"]["latency_p95_s"],
        "priority_p95_s_without_rules": runs_done["without_rules"]["corporate"]["latency_p95_s"],
        "target_p95_s": 2.0,
    }
    if "bulk_only" in runs_done:
        base = runs_done["bulk_only"]["bulk"]["messages_per_second"]
        summary["bulk_throughput_ratio_to_bulk_only"] = round(
            with_rules["bulk"]["messages_per_second"] / base, 3
        )
        summary["target_bulk_ratio"] = 0.9
    result["summary"] = summary
    path = write_result(args.output, result)
    print(path.read_text())


if __name__ == "__main__":
    asyncio.run(main())

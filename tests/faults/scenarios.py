"""The six fault scenarios: each sends a burst through the SMTP ingest, strikes, and counts.

Every scenario ends the same way: every message the ingest answered 250 must reach the sink
at least once (lost = 0), copies beyond the first are counted as duplicates, every workflow
must have finished as delivered and the spool must be empty. A scenario returns a `Result`
whose `problems` list says what broke; an empty list means it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from postflow.spool import FsSpool
from tests.dnsserver import DnsServer, Fault
from tests.faults.client import Burst, Outcome, SmtpSession, make_message, send_burst
from tests.faults.relay import relay
from tests.faults.sink import RecordingSink
from tests.faults.stack import Stack

__all__ = ["SCENARIOS", "Result", "Size", "run_scenario"]


KILL_GRACE_S = 0.5


@dataclass
class Size:
    messages: int
    quick: bool


@dataclass
class Result:
    scenario: str
    variant: str
    messages: int = 0  # sent by the client
    accepted: int = 0  # answered 250
    delivered: int = 0  # accepted and at the sink at least once
    lost: int = 0
    duplicates: int = 0  # copies beyond the first, over all messages
    time_to_drain_s: float = 0.0
    replies: dict[str, int] = field(default_factory=dict)  # final answers by code
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def accepted_ids(outcomes: list[Outcome]) -> set[str]:
    return {o.message_id for o in outcomes if o.accepted}


def tally(result: Result, outcomes: list[Outcome], sink: RecordingSink) -> None:
    """Fills the counts from what the client was told and what the sink got; call it last."""
    got = sink.by_message_id()
    accepted = accepted_ids(outcomes)
    result.messages = len(outcomes)
    result.accepted = len(accepted)
    result.delivered = sum(1 for m in accepted if got[m])
    result.lost = result.accepted - result.delivered
    result.duplicates = sum(n - 1 for n in got.values() if n > 1)
    result.replies = dict(Counter(str(o.code or "none") for o in outcomes))
    # Delivered although the client never heard 250 (the ingest died after the start): the
    # sender retries, so the recipient gets it twice; only the sender's retry can cause it.
    unanswered = [o.message_id for o in outcomes if not o.accepted and got[o.message_id]]
    result.details["delivered_without_250"] = len(unanswered)
    if result.lost:
        missing = sorted(m for m in accepted if not got[m])
        result.problems.append(f"{result.lost} accepted message(s) lost: {missing[:5]}")


async def drain(
    result: Result,
    accepted: set[str],
    sink: RecordingSink,
    running: Callable[[], Awaitable[int]],
    since: float,
    limit_s: float,
) -> None:
    """Waits until every accepted message arrived and no workflow is still running."""
    deadline = time.monotonic() + limit_s
    while True:
        got = sink.by_message_id()
        missing = [m for m in accepted if not got[m]]
        still = await running() if not missing else None
        if not missing and still == 0:
            result.time_to_drain_s = round(time.monotonic() - since, 2)
            return
        if time.monotonic() > deadline:
            result.time_to_drain_s = round(time.monotonic() - since, 2)
            result.problems.append(
                f"not drained after {limit_s:.0f} s: {len(missing)} accepted message(s) "
                f"missing, {still if still is not None else '?'} workflow(s) running"
            )
            return
        await asyncio.sleep(0.5)


async def diagnose(result: Result, stack: Stack) -> None:
    """When something is off: which processes died, and what the stuck messages say."""
    result.details["exited"] = {
        name: proc.returncode for name, proc in stack.procs.items() if proc.poll() is not None
    }
    client = await stack.client()
    stuck = []
    async for wf in client.list_workflows("ExecutionStatus = 'Running'", limit=5):
        handle = client.get_workflow_handle(wf.id)
        try:
            status = await handle.query("status")
            stuck.append({"id": wf.id, "status": status})
        except Exception as exc:  # a diagnosis must not hide the result
            stuck.append({"id": wf.id, "query_failed": str(exc)})
    result.details["stuck"] = stuck
    result.details["workdir"] = str(stack.workdir)


async def check_stack_end(result: Result, stack: Stack) -> None:
    """Every workflow finished as delivered; the spool holds nothing, not even temp files."""
    if result.problems:
        await diagnose(result, stack)
    client = await stack.client()
    not_delivered = await client.count_workflows(
        "ExecutionStatus != 'Running' AND DeliveryState != 'delivered'"
    )
    if not_delivered.count:
        result.problems.append(f"{not_delivered.count} workflow(s) not delivered")
    total = await client.count_workflows()
    result.details["workflows"] = total.count
    bodies, temps = stack.spool_files()
    result.details["spool_left"] = len(bodies)
    result.details["spool_temp_left"] = len(temps)
    if bodies or temps:
        result.problems.append(f"spool not empty: {bodies[:3]} {temps[:3]}")


@contextlib.asynccontextmanager
async def running_stack(workdir: Path, sink: RecordingSink, **kwargs: Any) -> AsyncIterator[Stack]:
    stack = Stack(workdir, destination=kwargs.pop("destination", sink.destination), **kwargs)
    try:
        await stack.start_temporal()
        stack.start_worker()
        await stack.start_ingest()
        yield stack
    finally:
        await stack.stop()


async def _when(condition: Callable[[], bool], limit_s: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# ---- 1: kill -9 the worker -----------------------------------------------------------------


async def worker_kill(size: Size, workdir: Path, env: WorkflowEnvironment | None = None) -> Result:
    """kill -9 the worker mid-burst, start a new one: all delivered; duplicates only from
    SMTP sessions that had passed the final dot when the worker died."""
    result = Result("worker-kill", "quick" if size.quick else "full")
    # A short pause before each 250 widens the window in which a session is past the final
    # dot but its activity has not reported back: the sessions that can turn into duplicates.
    sink = await RecordingSink(ok_delay=0.05).start()
    try:
        async with running_stack(workdir, sink) as stack:
            burst = Burst()
            sender = asyncio.create_task(
                send_burst("127.0.0.1", stack.ingest_port, "wk", size.messages, burst=burst)
            )
            target = max(1, size.messages // 4)
            if not await _when(lambda: len(sink.deliveries) >= target, 120):
                result.problems.append("no deliveries before the kill")
            past_dot = sink.open_sessions_past_final_dot()
            in_flight = len(sink._open)
            stack.kill("worker")
            killed_at = time.monotonic()
            delivered_before = len(sink.deliveries)
            stack.start_worker()
            await sender
            end = time.monotonic()
            accepted = accepted_ids(burst.outcomes)
            await drain(result, accepted, sink, stack.running_workflows, end, 300)
            tally(result, burst.outcomes, sink)
            await check_stack_end(result, stack)
            firsts: dict[str, float] = {}
            for d in sink.deliveries:
                firsts.setdefault(d.message_id, d.final_dot_at)
            dup_ids = [m for m, n in sink.by_message_id().items() if n > 1]
            # The dead worker's last writes (a final dot in the socket buffer) still reach
            # the sink a moment after the kill: those sessions were past the dot too.
            late = [m for m in dup_ids if firsts[m] > killed_at + KILL_GRACE_S]
            result.details["duplicates_first_copy_just_after_kill"] = sum(
                killed_at < firsts[m] <= killed_at + KILL_GRACE_S for m in dup_ids
            )
            if late:
                result.problems.append(
                    f"{len(late)} duplicate(s) whose first copy arrived after the kill: {late[:3]}"
                )
            result.details.update(
                killed_after_deliveries=delivered_before,
                sink_sessions_open_at_kill=in_flight,
                sink_sessions_past_final_dot_at_kill=past_dot,
                duplicated_messages=len(dup_ids),
            )
    finally:
        await sink.stop()
    return result


# ---- 2: stop and restart the Temporal server --------------------------------------------------


async def temporal_restart(
    size: Size, workdir: Path, env: WorkflowEnvironment | None = None
) -> Result:
    """kill -9 the dev server mid-burst, restart it on the same SQLite file: every 250
    delivered; what could not be started got 451 and has no workflow."""
    result = Result("temporal-restart", "quick" if size.quick else "full")
    down_seconds = 12.0 if size.quick else 20.0
    sink = await RecordingSink().start()
    try:
        async with running_stack(workdir, sink) as stack:
            burst = Burst()
            sender = asyncio.create_task(
                send_burst(
                    "127.0.0.1",
                    stack.ingest_port,
                    "tr",
                    size.messages,
                    burst=burst,
                    concurrency=4 if size.quick else 10,
                    reply_wait=120,
                )
            )
            if not await _when(lambda: len(burst.outcomes) >= size.messages // 3, 120):
                result.problems.append("burst too slow")
            stack.kill("temporal")
            down_at = time.monotonic()
            answered_before = len(burst.outcomes)
            await asyncio.sleep(down_seconds)
            await stack.start_temporal()
            result.details["server_down_s"] = round(time.monotonic() - down_at, 1)
            await sender
            end = time.monotonic()
            accepted = accepted_ids(burst.outcomes)
            await drain(result, accepted, sink, stack.running_workflows, end, 300)
            # A start cut off by the crash may have happened: its body was kept for the
            # sweep, which an operator runs after such an outage.
            result.details["sweep"] = "; ".join((await stack.sweep("0")).strip().splitlines())
            tally(result, burst.outcomes, sink)
            await check_stack_end(result, stack)
            bad = [o for o in burst.outcomes if o.code not in (250, 451)]
            if bad:
                result.problems.append(
                    f"{len(bad)} answer(s) neither 250 nor 451: {[o.text for o in bad[:3]]}"
                )
            refused = [o for o in burst.outcomes if not o.accepted]
            started = await _workflows_for(await stack.client(), refused)
            result.details.update(
                answered_before_stop=answered_before,
                refused_451=sum(o.code == 451 for o in burst.outcomes),
                # Started although the ingest could not know it: delivered by that workflow
                # and again by the sender's retry (a duplicate, the price of never losing).
                refused_but_started=len(started),
            )
    finally:
        await sink.stop()
    return result


async def _workflows_for(client: Client, outcomes: list[Outcome]) -> list[str]:
    """Message-IDs among `outcomes` for which some workflow exists anyway."""
    found = []
    for o in outcomes:
        query = f"MessageId = '{o.message_id}'"
        if (await client.count_workflows(query)).count:
            found.append(o.message_id)
    return found


# ---- 3: kill -9 the ingest during DATA --------------------------------------------------------


async def ingest_kill(size: Size, workdir: Path, env: WorkflowEnvironment | None = None) -> Result:
    """kill -9 the ingest while several sessions are in DATA, some just past the final dot:
    no 250 for a message that is not queued; after restart + sweep no orphan body remains."""
    result = Result("ingest-kill", "quick" if size.quick else "full")
    sessions = 8 if size.quick else 20
    rounds = max(1, size.messages // sessions)
    sink = await RecordingSink().start()
    outcomes: list[Outcome] = []
    swept: list[str] = []
    try:
        async with running_stack(workdir, sink) as stack:
            planted = "0RPHAN0000000000"  # a body without workflow, as a crash leaves one
            FsSpool(stack.spool_path).store(planted, b"Subject: orphan\r\n\r\nno workflow\r\n")
            for round_no in range(rounds):
                # Spread the kill over the submit: from "before any final dot is read" to
                # "some bodies stored, their workflows being started".
                delay = (0.0, 0.05, 0.01, 0.1, 0.02)[round_no % 5]
                outcomes += await _ingest_round(stack, round_no, sessions, delay)
                await stack.start_ingest()
            bodies_after_kills, temps_after_kills = stack.spool_files()
            report = await stack.sweep("0")
            swept.append("; ".join(report.strip().splitlines()))
            outcomes += (
                await send_burst("127.0.0.1", stack.ingest_port, "ik-after", 5, concurrency=5)
            ).outcomes
            end = time.monotonic()
            await drain(result, accepted_ids(outcomes), sink, stack.running_workflows, end, 300)
            tally(result, outcomes, sink)
            await check_stack_end(result, stack)
            if (workdir / "spool" / f"{planted}.eml").exists():
                result.problems.append("the planted orphan survived the sweep")
            result.details.update(
                rounds=rounds,
                sessions_per_round=sessions,
                bodies_after_kills=len(bodies_after_kills),
                temp_files_after_kills=len(temps_after_kills),
                sweep=swept[0],
                no_reply=sum(o.code is None for o in outcomes),
            )
    finally:
        await sink.stop()
    return result


async def _ingest_round(stack: Stack, round_no: int, sessions: int, delay: float) -> list[Outcome]:
    """`sessions` concurrent sessions into DATA; half finish, then the ingest dies."""
    loop = asyncio.get_running_loop()
    opened: list[tuple[SmtpSession, Outcome, bytes]] = []
    for n in range(sessions):
        number = round_no * sessions + n
        message_id, data = make_message("ik", number, size=2000)
        rcpt = f"r{number}@dest.test"
        session = SmtpSession("127.0.0.1", stack.ingest_port, timeout=30)
        outcome = Outcome(message_id=message_id, rcpt=rcpt, stage="data")
        await session.open()
        code, text = await session.envelope("sender@faults.test", [rcpt])
        if code != 354:
            outcome.code, outcome.text = code, text
            continue
        await session.send_body(data[: len(data) // 2], finish=False)
        opened.append((session, outcome, data[len(data) // 2 :]))

    async def _finish(session: SmtpSession, outcome: Outcome, rest: bytes) -> None:
        try:
            await session.send_body(rest)
            outcome.code, outcome.text = await session.final_reply()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            outcome.text = f"{type(exc).__name__}: {exc}"
        outcome.answered_at = loop.time()
        if outcome.accepted and "queued as " in outcome.text:
            outcome.queue_id = outcome.text.rsplit("queued as ", 1)[1].split()[0]

    finishing = [asyncio.create_task(_finish(*item)) for item in opened[: len(opened) // 2]]
    await asyncio.sleep(delay)
    stack.kill("ingest")
    await asyncio.gather(*finishing)
    for _session, outcome, _ in opened[len(opened) // 2 :]:
        outcome.text = outcome.text or "killed mid-DATA"
    for session, _, _ in opened:
        await session.close()
    return [o for _, o, _ in opened]


# ---- 4: the receiving server misbehaves -------------------------------------------------------

_RECEIVER_FAULTS = ("drop-data", "slow-rcpt", "slow-final", "reset-rcpt", "slow-ok")


def _receiver_plan(sink: RecordingSink, count: int) -> dict[str, str]:
    plan = {f"r{n}@dest.test": _RECEIVER_FAULTS[n % len(_RECEIVER_FAULTS)] for n in range(count)}
    sink.plan = {rcpt: [fault] for rcpt, fault in plan.items()}
    sink.connect_faults = ["reset-connect"] * max(1, count // 10)
    return plan


_RECEIVER_SMTP = {"command_timeout": "2s", "data_timeout": "2s", "final_timeout": "2s"}


async def receiver_faults(
    size: Size, workdir: Path, env: WorkflowEnvironment | None = None
) -> Result:
    """The receiving server cuts DATA, answers slowly, or accepts and then resets: the
    recipients are deferred and delivered on a later attempt."""
    result = Result("receiver-faults", "quick" if size.quick else "full")
    sink = RecordingSink(slow_seconds=4.0, slow_ok_seconds=0.5)
    await sink.start()
    plan = _receiver_plan(sink, size.messages)
    resets = len(sink.connect_faults)
    try:
        if size.quick:
            assert env is not None, "the quick variant runs on the time-skipping server"
            outcomes, attempts = await _on_time_skipping(
                env, workdir, sink, size.messages, "rf", smtp=_RECEIVER_SMTP
            )
            _ts_end(result, attempts)
            tally(result, outcomes, sink)
            _check_attempts(result, plan, attempts, resets)
        else:
            async with running_stack(workdir, sink, smtp=_RECEIVER_SMTP) as stack:
                burst = await send_burst("127.0.0.1", stack.ingest_port, "rf", size.messages)
                end = time.monotonic()
                accepted = accepted_ids(burst.outcomes)
                await drain(result, accepted, sink, stack.running_workflows, end, 600)
                tally(result, burst.outcomes, sink)
                await check_stack_end(result, stack)
        expected = Counter(plan.values())
        expected["reset-connect"] = resets
        result.details["faults_planned"] = dict(expected)
        result.details["faults_struck"] = dict(sink.faults_done)
        if dict(sink.faults_done) != dict(expected):
            result.problems.append("not every planned fault struck")
        # Only slow-final can duplicate: the sink kept a message the client had given up on.
        if result.duplicates > expected["slow-final"]:
            result.problems.append(
                f"{result.duplicates} duplicates, but only {expected['slow-final']} slow-final"
            )
        result.details["duplicates_from_slow_final"] = result.duplicates
    finally:
        await sink.stop()
    return result


def _check_attempts(
    result: Result, plan: dict[str, str], attempts: dict[str, Any], resets: int
) -> None:
    """Faulted recipients needed a second attempt; slow-but-in-time ones did not (unless a
    connection reset, which strikes whichever message comes first, hit them)."""
    wrong = []
    slow_ok_retried = 0
    for rcpt, fault in plan.items():
        got = attempts.get(rcpt)
        if got is None:
            continue
        if fault == "slow-ok":
            slow_ok_retried += got["attempts"] > 1
        elif got["attempts"] < 2:
            wrong.append(f"{rcpt} ({fault}): {got['attempts']} attempt")
        if got["state"] != "delivered":
            wrong.append(f"{rcpt} ({fault}): {got['state']}")
    if slow_ok_retried > resets:
        wrong.append(f"{slow_ok_retried} slow-but-in-time recipient(s) retried")
    if wrong:
        result.problems.append(f"unexpected attempts: {wrong[:5]}")
    result.details["recipients_deferred_then_delivered"] = sum(
        1 for a in attempts.values() if a["attempts"] >= 2 and a["state"] == "delivered"
    )


async def _on_time_skipping(
    env: WorkflowEnvironment,
    workdir: Path,
    sink: RecordingSink,
    count: int,
    tag: str,
    *,
    destination: str | None = None,
    smtp: dict[str, str] | None = None,
    transport: dict[str, Any] | None = None,
    between: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """The burst through ingest and worker in this process on the time-skipping server:
    hours of retry delays pass in a moment. `between` runs once every first attempt is made."""
    from workflows.deliver import DeliverMessage

    destination = destination or sink.destination
    async with relay(env, workdir, destination, smtp=smtp, transport=transport) as rl:
        burst = await send_burst("127.0.0.1", rl.port, tag, count, concurrency=10)
        end = time.monotonic()
        queued = {o.rcpt: o.queue_id for o in burst.outcomes if o.queue_id}

        async def first_attempts_done() -> bool:
            for queue_id in queued.values():
                status = await rl.handle(queue_id).query(DeliverMessage.status)
                if not status.done and not status.next_attempt_at:
                    return False
            return True

        if between is not None:
            deadline = time.monotonic() + 60
            while not await first_attempts_done() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            await between()
        reports = {
            rcpt: await asyncio.wait_for(rl.result(queue_id), 120)
            for rcpt, queue_id in queued.items()
        }
    attempts: dict[str, Any] = {
        rcpt: {
            "attempts": max(r.attempts for r in report.recipients),
            "state": str(report.recipients[0].state),
        }
        for rcpt, report in reports.items()
    }
    attempts["_drain_s"] = round(time.monotonic() - end, 2)
    attempts["_spool_left"] = [p.name for p in (workdir / "spool").glob("*.eml")]
    return burst.outcomes, attempts


def _ts_end(result: Result, attempts: dict[str, Any]) -> None:
    result.time_to_drain_s = attempts.pop("_drain_s")
    left = attempts.pop("_spool_left")
    result.details["spool_left"] = len(left)
    if left:
        result.problems.append(f"spool not empty: {left[:3]}")


# ---- 5: DNS unreachable -----------------------------------------------------------------------

_ZONE = "@ MX 10 mx\nmx A 127.0.0.1\n"


async def dns_outage(size: Size, workdir: Path, env: WorkflowEnvironment | None = None) -> Result:
    """The DNS server stops answering: every recipient deferred (4.4.3), then delivered once
    it answers again."""
    result = Result("dns-outage", "quick" if size.quick else "full")
    sink = await RecordingSink().start()
    dns_server = await DnsServer({"dest.test": _ZONE}).start()
    dns_server.fail(Fault.DROP)
    destination = dns_server.destination(port=sink.port)
    transport = {"dns_timeout": "2s"}
    try:
        if size.quick:
            assert env is not None, "the quick variant runs on the time-skipping server"

            async def _back() -> None:
                result.details["dns_queries_unanswered"] = len(dns_server.queries)
                dns_server.clear_faults()

            outcomes, attempts = await _on_time_skipping(
                env,
                workdir,
                sink,
                size.messages,
                "dns",
                destination=destination,
                transport=transport,
                between=_back,
            )
            _ts_end(result, attempts)
            tally(result, outcomes, sink)
            early = [r for r, a in attempts.items() if a["attempts"] < 2]
            if early:
                result.problems.append(f"{len(early)} delivered without waiting for DNS")
            result.details["recipients_deferred_then_delivered"] = len(attempts) - len(early)
        else:
            outage = 90.0
            async with running_stack(
                workdir, sink, destination=destination, transport=transport
            ) as stack:
                burst = await send_burst("127.0.0.1", stack.ingest_port, "dns", size.messages)
                await asyncio.sleep(outage)
                if sink.deliveries:
                    result.problems.append(f"{len(sink.deliveries)} delivered while DNS was down")
                result.details["dns_queries_unanswered"] = len(dns_server.queries)
                dns_server.clear_faults()
                end = time.monotonic()
                accepted = accepted_ids(burst.outcomes)
                await drain(result, accepted, sink, stack.running_workflows, end, 600)
                tally(result, burst.outcomes, sink)
                await check_stack_end(result, stack)
                result.details["dns_down_s"] = outage
    finally:
        await dns_server.stop()
        await sink.stop()
    return result


# ---- 6: the spool's disk is full ----------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size_kb: int) -> Any:
    """A tmpfs of `size_kb` for the spool; needs root (or CAP_SYS_ADMIN)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="postflow-full-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        mountpoint.rmdir()
        raise PermissionError(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


def fill(directory: Path, leave: int = 0) -> int:
    """Writes a ballast file until the filesystem says ENOSPC, then gives back `leave`
    bytes (so that the next stores fail part-way); returns the ballast's size."""
    ballast = directory / "ballast"
    written = 0
    with ballast.open("wb") as f:
        chunk = b"\0" * 4096
        try:
            while True:
                written += os.write(f.fileno(), chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        if leave:
            written = max(0, written - leave)
            f.truncate(written)
    return written


async def disk_full(size: Size, workdir: Path, env: WorkflowEnvironment | None = None) -> Result:
    """The spool's filesystem fills up: the ingest answers 452 4.3.1, keeps nothing half
    written, and accepts again once space is back."""
    result = Result("disk-full", "quick" if size.quick else "full")
    third = max(3, size.messages // 3)
    sink = await RecordingSink().start()
    try:
        with small_tmpfs(2048) as mount:
            spool = mount / "spool"
            async with running_stack(workdir, sink, spool_path=spool) as stack:
                outcomes: list[Outcome] = []
                before = await send_burst("127.0.0.1", stack.ingest_port, "df-a", third)
                outcomes += before.outcomes
                await drain(
                    result,
                    accepted_ids(before.outcomes),
                    sink,
                    stack.running_workflows,
                    time.monotonic(),
                    120,
                )
                # Room for about two and a half bodies: the next stores fail part-way.
                result.details["ballast_bytes"] = fill(mount, leave=50_000)
                full = await send_burst(
                    "127.0.0.1", stack.ingest_port, "df-b", third, size=20_000, concurrency=3
                )
                outcomes += full.outcomes
                _, temps = stack.spool_files()
                result.details["spool_temp_files_while_full"] = len(temps)
                if temps:
                    result.problems.append(f"half-written files while full: {temps[:3]}")
                wrong = [
                    f"{o.code} {o.text}"
                    for o in full.outcomes
                    if not (o.accepted or (o.code == 452 and o.text.startswith("4.3.1")))
                ]
                if wrong or all(o.accepted for o in full.outcomes):
                    result.problems.append(f"disk full: expected 452 4.3.1, got {wrong[:3]}")
                result.details["accepted_while_full"] = sum(o.accepted for o in full.outcomes)
                (mount / "ballast").unlink()
                after = await send_burst("127.0.0.1", stack.ingest_port, "df-c", third)
                outcomes += after.outcomes
                if not all(o.accepted for o in after.outcomes):
                    result.problems.append("not accepting again after space came back")
                end = time.monotonic()
                accepted = accepted_ids(outcomes)
                await drain(result, accepted, sink, stack.running_workflows, end, 120)
                tally(result, outcomes, sink)
                await check_stack_end(result, stack)
                result.details["refused_452"] = sum(o.code == 452 for o in outcomes)
    finally:
        await sink.stop()
    return result


# ---- the table ----------------------------------------------------------------------------------

Scenario = Callable[[Size, Path, WorkflowEnvironment | None], Awaitable[Result]]

# name: (function, quick size, full size, needs the time-skipping server when quick)
SCENARIOS: dict[str, tuple[Scenario, int, int, bool]] = {
    "worker-kill": (worker_kill, 40, 1000, False),
    "temporal-restart": (temporal_restart, 60, 1000, False),
    "ingest-kill": (ingest_kill, 16, 200, False),
    "receiver-faults": (receiver_faults, 20, 200, True),
    "dns-outage": (dns_outage, 10, 200, True),
    "disk-full": (disk_full, 15, 150, False),
}


async def run_scenario(
    name: str,
    *,
    quick: bool,
    messages: int | None = None,
    workdir: Path | None = None,
    env: WorkflowEnvironment | None = None,
) -> Result:
    function, quick_size, full_size, _ = SCENARIOS[name]
    size = Size(messages or (quick_size if quick else full_size), quick)
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"postflow-{name}-"))
    return await function(size, workdir, env)

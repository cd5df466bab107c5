"""The orphan sweep against a real Temporal server: which bodies go and which stay."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from postflow.spool import FsSpool
from postflow.sweep import parse_grace, sweep_orphans
from tests.conftest import make_config, running_worker
from tests.helpers import MESSAGE, submit
from tests.peers import SmtpPeer

HOUR = 3600


def _age(spool: FsSpool, key: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(spool.root / f"{key}.eml", (then, then))


async def test_sweep_removes_only_old_orphans_and_bodies_of_completed_workflows(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client = dev_env.client
    async with SmtpPeer() as peer:
        config = make_config(
            tmp_path, transports={"default": {"destination": peer.destination, "tls": "none"}}
        )
        spool = FsSpool(config.spool.path)
        async with running_worker(client, config) as queue:
            done = await submit(client, config, queue, ["bob@dest.test"])
            await done.result()
        # Nobody serves this queue: the message stays queued (running) for the test.
        queued = await submit(client, config, "nobody-serves-this", ["carol@dest.test"])
        terminated = await submit(client, config, "nobody-serves-this", ["dave@dest.test"])
        await terminated.terminate("operator")
    keys = {h: h.id.removeprefix("msg-") for h in (done, queued, terminated)}
    # The completed workflow removed its body; put one back as if that cleanup had failed.
    spool.store(keys[done], MESSAGE)
    spool.store("ORPHANOLD", MESSAGE)
    spool.store("ORPHANNEW", MESSAGE)
    for key in [*keys.values(), "ORPHANOLD"]:
        _age(spool, key, HOUR)
    # What a process killed in the middle of a store leaves: an old and a fresh temp file.
    for name, age in (("OLDTEMP.1a2b", HOUR), ("NEWTEMP.3c4d", 0)):
        (spool.root / "tmp" / name).write_bytes(b"half a mess")
        then = time.time() - age
        os.utime(spool.root / "tmp" / name, (then, then))

    dry = await sweep_orphans(client, spool, timedelta(minutes=10), dry_run=True)
    assert dry.orphans == ["ORPHANOLD"] and dry.temp_files == ["OLDTEMP.1a2b"]
    assert spool.exists("ORPHANOLD") and (spool.root / "tmp" / "OLDTEMP.1a2b").exists()

    report = await sweep_orphans(client, spool, timedelta(minutes=10))
    assert report.examined == 5
    assert report.orphans == ["ORPHANOLD"]
    assert report.finished == [keys[done]]
    assert report.live == 1 and report.young == 1
    assert report.kept_closed == [(keys[terminated], "terminated")]
    assert not report.errors
    assert report.temp_files == ["OLDTEMP.1a2b"]
    assert [p.name for p in (spool.root / "tmp").iterdir()] == ["NEWTEMP.3c4d"]
    left = sorted(key for key, _ in spool.keys())
    assert left == sorted(["ORPHANNEW", keys[queued], keys[terminated]])
    assert "removed 1 orphan(s) and 1 of completed workflows" in report.describe()

    # With grace 0 (right after a crash, nothing being submitted) the young orphan goes too.
    again = await sweep_orphans(client, spool, timedelta(0))
    assert again.orphans == ["ORPHANNEW"]
    await queued.terminate("test over")


def test_grace_accepts_durations_and_seconds() -> None:
    assert parse_grace("10m") == timedelta(minutes=10)
    assert parse_grace("0") == timedelta(0)
    assert parse_grace("90") == timedelta(seconds=90)

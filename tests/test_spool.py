"""The spool contract, run against both backends: a directory and a real S3 store (SeaweedFS)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postflow.config import parse_config
from postflow.spool import FsSpool, S3Spool, Spool, SpoolError, new_queue_id, open_spool


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BODY = b"From: a@x.test\r\nSubject: caf\xc3\xa9\r\n\r\nLine\r\n.dot line\r\n"


@pytest.fixture(params=["fs", "s3"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Spool]:
    if request.param == "fs":
        made: Spool = open_spool(parse_config({"spool": {"path": str(tmp_path / "s")}}).spool)
    else:
        table = request.getfixturevalue("s3_spool_settings")
        made = open_spool(parse_config({"spool": table}).spool)
    yield made
    made.close()


def test_open_spool_picks_the_configured_backend(spool: Spool) -> None:
    assert isinstance(spool, Spool)
    assert isinstance(spool, FsSpool | S3Spool)


def test_a_stored_body_reads_back_byte_for_byte(spool: Spool) -> None:
    key = new_queue_id()
    spool.store(key, BODY)
    assert spool.read(key) == BODY
    assert spool.exists(key)


def test_a_large_body_and_an_empty_one(spool: Spool) -> None:
    big = bytes(range(256)) * (6 * 1024 * 1024 // 256 + 7)  # > 6 MiB, not a round size
    spool.store("big", big)
    spool.store("empty", b"")
    assert spool.read("big") == big
    assert spool.read("empty") == b""


def test_storing_again_replaces_the_body(spool: Spool) -> None:
    spool.store("k1", b"first")
    spool.store("k1", b"second")
    assert spool.read("k1") == b"second"
    assert [k for k, _ in spool.keys()].count("k1") == 1


def test_missing_key_is_a_spool_error_naming_it(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="'nope' not found"):
        spool.read("nope")
    assert not spool.exists("nope")


def test_delete_says_whether_there_was_a_body(spool: Spool) -> None:
    spool.store("gone", BODY)
    assert spool.delete("gone") is True
    assert spool.delete("gone") is False
    assert not spool.exists("gone")
    with pytest.raises(SpoolError):
        spool.read("gone")


def test_keys_lists_stored_bodies_with_their_times(spool: Spool) -> None:
    before = time.time()
    for key in ("a1", "b2", "c3"):
        spool.store(key, BODY)
    spool.delete("b2")
    listed = dict(spool.keys())
    assert set(listed) == {"a1", "c3"}
    # S3 keeps whole seconds; a filesystem more.
    assert all(before - 2 <= t <= time.time() + 2 for t in listed.values())


@pytest.mark.parametrize("key", ["", "a/b", ".hidden", "../up", "x\ny"])
def test_bad_keys_are_refused_before_any_io(spool: Spool, key: str) -> None:
    for call in (lambda: spool.store(key, b"x"), lambda: spool.read(key)):
        with pytest.raises(SpoolError, match="bad spool key"):
            call()


async def test_async_twins_share_the_contract(spool: Spool) -> None:
    keys = [new_queue_id() for _ in range(40)]
    await asyncio.gather(*(spool.astore(k, BODY + k.encode()) for k in keys))
    bodies = await asyncio.gather(*(spool.aread(k) for k in keys))
    assert bodies == [BODY + k.encode() for k in keys]
    assert await spool.aexists(keys[0])
    listed = {k async for k, _ in spool.akeys()}
    assert listed == set(keys)
    assert await spool.adelete(keys[0]) is True
    assert await spool.adelete(keys[0]) is False
    assert not await spool.aexists(keys[0])
    with pytest.raises(SpoolError, match="not found"):
        await spool.aread(keys[0])


async def test_sync_methods_work_from_threads_as_callers_use_them(spool: Spool) -> None:
    keys = [f"t{i}" for i in range(20)]
    await asyncio.gather(*(asyncio.to_thread(spool.store, k, k.encode()) for k in keys))
    read = await asyncio.gather(*(asyncio.to_thread(spool.read, k) for k in keys))
    assert read == [k.encode() for k in keys]


def test_keys_ignores_what_is_not_a_body(spool: Spool, tmp_path: Path) -> None:
    spool.store("real", BODY)
    if isinstance(spool, FsSpool):
        (spool.root / "tmp" / "half.eml").write_bytes(b"partial")  # an interrupted write
        (spool.root / "notes.txt").write_text("x")
    else:
        assert isinstance(spool, S3Spool)
        # Beside and below the spool's prefix: neither is a body of this spool.
        for name in (f"{spool.prefix}/deeper/file.eml", f"{spool.prefix}/x.txt", "top.eml"):
            spool._call(
                lambda n=name: spool._client.put_object(Bucket=spool.bucket, Key=n, Body=b"no")
            )
    assert [k for k, _ in spool.keys()] == ["real"]


def test_a_broken_store_fails_the_write(request: pytest.FixtureRequest, spool: Spool) -> None:
    """Ingest answers 451 on SpoolError: the write must fail, never half-succeed."""
    if isinstance(spool, FsSpool):
        shutil.rmtree(spool.root)
        broken: Spool = spool
    else:
        # A store that is down: nothing listens on the endpoint's port.
        table = request.getfixturevalue("s3_spool_settings")
        table["endpoint"] = f"http://127.0.0.1:{_closed_port()}"
        settings = parse_config({"spool": table}).spool
        broken = open_spool(settings)
        request.addfinalizer(broken.close)
    with pytest.raises(SpoolError) as caught:
        broken.store("k", BODY)
    assert isinstance(caught.value, OSError)
    with pytest.raises(SpoolError):
        broken.read("k")

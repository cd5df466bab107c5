"""What only the S3 backend has: object layout, credentials by reference, paging, and a
message delivered end to end with its body in the bucket (SeaweedFS on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from postflow.config import parse_config
from postflow.models import RecipientState
from postflow.spool import S3Spool, SpoolError, open_spool
from starter.submit import SubmitError, Submitter
from tests.conftest import make_config, running_worker
from tests.helpers import MESSAGE, submit
from tests.peers import SmtpPeer
from tests.s3server import ACCESS_KEY, SECRET_ENV, SECRET_KEY, S3Server


def _spool(table: dict[str, Any]) -> S3Spool:
    spool = open_spool(parse_config({"spool": table}).spool)
    assert isinstance(spool, S3Spool)
    return spool


@pytest.fixture
async def raw(s3_server: S3Server) -> AsyncIterator[Any]:
    """A plain aiobotocore client, to look at the bucket behind the spool's back."""
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3",
        endpoint_url=s3_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    ) as client:
        yield client


async def test_bodies_are_objects_under_the_prefix(
    s3_spool_settings: dict[str, Any], raw: Any
) -> None:
    prefix = s3_spool_settings["prefix"]
    spool = _spool({**s3_spool_settings, "prefix": f"/{prefix}/"})  # slashes are trimmed
    try:
        await spool.astore("Q1", MESSAGE)
        head = await raw.head_object(Bucket=spool.bucket, Key=f"{prefix}/Q1.eml")
        assert head["ContentLength"] == len(MESSAGE)
        assert head["ContentType"] == "message/rfc822"
        got = await raw.get_object(Bucket=spool.bucket, Key=f"{prefix}/Q1.eml")
        async with got["Body"] as body:
            assert await body.read() == MESSAGE
    finally:
        spool.close()


async def test_two_prefixes_in_one_bucket_do_not_see_each_other(
    s3_spool_settings: dict[str, Any],
) -> None:
    prefix = s3_spool_settings["prefix"]
    a = _spool({**s3_spool_settings, "prefix": f"{prefix}-a"})
    b = _spool({**s3_spool_settings, "prefix": f"{prefix}-b"})
    try:
        await a.astore("only-a", b"a")
        assert [k async for k, _ in b.akeys()] == []
        assert not await b.aexists("only-a")
        assert await b.adelete("only-a") is False
        assert await a.aread("only-a") == b"a"
    finally:
        a.close()
        b.close()


def test_keys_follows_listing_pages(s3_spool_settings: dict[str, Any]) -> None:
    spool = _spool(s3_spool_settings)
    spool.page_size = 2
    try:
        names = [f"K{i}" for i in range(7)]
        for name in names:
            spool.store(name, b"x")
        assert sorted(k for k, _ in spool.keys()) == names
    finally:
        spool.close()


def test_credentials_come_only_from_the_named_variables(
    s3_spool_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SECRET_ENV)
    with pytest.raises(
        SpoolError, match=f'spool.secret_key_env: environment variable "{SECRET_ENV}"'
    ):
        _spool(s3_spool_settings)


def test_a_wrong_secret_is_refused_and_never_shown(
    s3_spool_settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "not-the-secret-xyzzy")
    spool = _spool(s3_spool_settings)
    try:
        with pytest.raises(SpoolError) as caught:
            spool.store("k", b"x")
    finally:
        spool.close()
    text = str(caught.value)
    assert "SignatureDoesNotMatch" in text
    assert f"s3://postflow/{s3_spool_settings['prefix']}/k.eml" in text
    assert "xyzzy" not in text and SECRET_KEY not in text


def test_close_is_idempotent_and_the_spool_reopens(s3_spool_settings: dict[str, Any]) -> None:
    spool = _spool(s3_spool_settings)
    spool.store("k", b"1")
    spool.close()
    spool.close()
    assert spool.read("k") == b"1"  # used again after close: a new client
    spool.close()


async def test_submit_fails_temporarily_when_the_store_is_down(
    dev_env: WorkflowEnvironment, tmp_path: Path, s3_spool_settings: dict[str, Any]
) -> None:
    """Ingest turns this SubmitError into 451: the client keeps the message."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = make_config(
        tmp_path, spool={**s3_spool_settings, "endpoint": f"http://127.0.0.1:{closed}"}
    )
    submitter = Submitter(dev_env.client, config, task_queue="unused", priority_task_queue="unused")
    with pytest.raises(SubmitError, match="spool write s3://") as caught:
        await submitter.submit("a@sender.test", ["b@dest.test"], MESSAGE)
    assert caught.value.temporary


async def test_a_message_is_delivered_from_the_bucket_and_then_removed(
    dev_env: WorkflowEnvironment, tmp_path: Path, s3_spool_settings: dict[str, Any]
) -> None:
    async with SmtpPeer() as peer:
        config = make_config(
            tmp_path,
            spool=s3_spool_settings,
            transports={"default": {"destination": peer.destination, "tls": "none"}},
        )
        spool = _spool(s3_spool_settings)
        try:
            async with running_worker(dev_env.client, config) as queue:
                handle = await submit(dev_env.client, config, queue, ["bob@dest.test"])
                queue_id = handle.id.removeprefix("msg-")
                report = await handle.result()
            assert report.recipients[0].state == RecipientState.DELIVERED
            assert peer.received[0].data == MESSAGE
            assert not await spool.aexists(queue_id)
            assert not (tmp_path / "spool" / f"{queue_id}.eml").exists()
        finally:
            spool.close()

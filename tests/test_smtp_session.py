"""The SMTP session against real aiosmtpd peers on loopback: PIPELINING, SIZE, SMTPUTF8,
8BITMIME, DSN, EHLO->HELO, dropped connections, timeouts, heartbeats and the reply parser."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from activities.smtp_wire import WireProtocolError, parse_replies
from postflow.models import Recipient, RecipientState, SendResult
from tests.certs import pki
from tests.conftest import make_config
from tests.helpers import MESSAGE
from tests.peers import fixed
from tests.smtp_peers_tls import (
    PeerOptions,
    SilentServer,
    SmtpTestPeer,
    StallingServer,
    mx,
    run_send,
)

DELIVERED = RecipientState.DELIVERED
DEFERRED = RecipientState.DEFERRED
FAILED = RecipientState.FAILED
GONE = "550-5.1.1 <gone@dest.test>: no such user\r\n550 5.1.1 try another address"


def _config(tmp_path: Path, transport: dict | None = None, **smtp: object):
    settings = {"helo_name": "postflow.test", "connect_timeout": 5, **smtp}
    return make_config(tmp_path, smtp=settings, transports={"default": transport or {}})


def _by(result: SendResult) -> dict[str, object]:
    return {o.address: o for o in result.recipients}


def _mail_chunk(peer: SmtpTestPeer) -> bytes:
    (chunk,) = [c for c in peer.seen.chunks if b"MAIL FROM" in c]
    return chunk


RCPTS = ["ann@dest.test", "gone@dest.test", "bob@dest.test"]


async def test_pipelining_sends_mail_rcpt_data_together(tmp_path: Path) -> None:
    options = PeerOptions(pipelining=True)
    async with SmtpTestPeer(options=options, scripts={"gone@dest.test": fixed(GONE)}) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], recipients=RCPTS)
    by = _by(result)
    assert result.tries[0].pipelined
    # One write: MAIL, the three RCPTs and DATA arrived in the same read.
    chunk = _mail_chunk(peer)
    assert chunk.count(b"RCPT TO") == 3 and chunk.endswith(b"DATA\r\n")
    assert by["ann@dest.test"].state == by["bob@dest.test"].state == DELIVERED
    gone = by["gone@dest.test"]
    assert (gone.state, gone.code, gone.enhanced, gone.stage) == (FAILED, 550, "5.1.1", "rcpt")
    assert gone.text == "550 5.1.1 <gone@dest.test>: no such user 5.1.1 try another address"
    assert (gone.remote_host, gone.remote_ip) == ("mx.dest.test", "127.0.0.1")
    assert peer.received[0].rcpt_tos == ["ann@dest.test", "bob@dest.test"]
    assert peer.received[0].data == MESSAGE


@pytest.mark.parametrize("announced", [True, False])
async def test_without_pipelining_one_command_at_a_time(tmp_path: Path, announced: bool) -> None:
    config = _config(tmp_path, pipelining=not announced)  # off in config, or not offered
    options = PeerOptions(pipelining=announced)
    async with SmtpTestPeer(options=options, scripts={"gone@dest.test": fixed(GONE)}) as peer:
        result, _ = await run_send(config, [mx(peer)], recipients=RCPTS)
    assert not result.tries[0].pipelined
    assert b"RCPT" not in _mail_chunk(peer)
    assert [o.state for o in result.recipients] == [DELIVERED, FAILED, DELIVERED]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_refused_fails_every_recipient(tmp_path: Path, pipelining: bool) -> None:
    options = PeerOptions(pipelining=pipelining, mail_reply="553 5.7.1 sender not welcome")
    async with SmtpTestPeer(options=options) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], recipients=RCPTS)
    for out in result.recipients:
        assert (out.state, out.code, out.enhanced, out.stage) == (FAILED, 553, "5.7.1", "mail")
    assert peer.received == []
    assert peer.rcpt_counts.total() == 0


async def test_pipelined_all_recipients_refused(tmp_path: Path) -> None:
    options = PeerOptions(pipelining=True)
    refuse = fixed("450 4.2.1 mailbox busy")
    async with SmtpTestPeer(options=options, default=refuse) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], recipients=RCPTS)
        again, _ = await run_send(_config(tmp_path), [mx(peer)], recipients=RCPTS[:1])
    assert [(o.state, o.enhanced) for o in result.recipients] == [(DEFERRED, "4.2.1")] * 3
    assert result.tries[0].error is None  # the session itself went fine
    assert again.recipients[0].stage == "rcpt" and peer.received == []


async def test_size_limit_fails_permanently_without_sending(tmp_path: Path) -> None:
    big = MESSAGE + b"x" * 2000 + b"\r\n"
    async with SmtpTestPeer(options=PeerOptions(size_limit=1000, pipelining=True)) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], data=big)
        small, _ = await run_send(_config(tmp_path), [mx(peer)])
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (FAILED, "5.3.4", "mail")
    assert f"{len(big)} bytes, mx.dest.test accepts at most 1000" in out.text
    assert small.recipients[0].state == DELIVERED
    # Only the small message's transaction ever started, announcing its size.
    assert len([c for c in peer.seen.chunks if b"MAIL FROM" in c]) == 1
    assert peer.received[0].mail_options == [f"SIZE={len(MESSAGE)}"]


async def test_smtputf8_needed_but_not_offered(tmp_path: Path) -> None:
    utf8 = ["jöran@dest.test"]
    async with SmtpTestPeer(options=PeerOptions(smtputf8=False)) as plain:
        refused, _ = await run_send(_config(tmp_path), [mx(plain)], recipients=utf8)
        ascii_ok, _ = await run_send(_config(tmp_path), [mx(plain)], smtputf8=True)
    async with SmtpTestPeer() as capable:
        sent, _ = await run_send(_config(tmp_path), [mx(capable)], recipients=utf8)
    out = refused.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (FAILED, "5.6.7", "mail")
    assert ascii_ok.recipients[0].state == DELIVERED  # nothing in it needs SMTPUTF8
    assert len(plain.received) == 1
    assert sent.recipients[0].state == DELIVERED
    assert "SMTPUTF8" in capable.received[0].mail_options
    assert capable.received[0].rcpt_tos == utf8


async def test_8bit_body_goes_with_body_8bitmime(tmp_path: Path) -> None:
    body = MESSAGE.replace(b"Hello Bob.", "Grüße, Bob.".encode())
    async with SmtpTestPeer() as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], data=body)
    assert result.recipients[0].state == DELIVERED
    assert "BODY=8BITMIME" in peer.received[0].mail_options
    assert peer.received[0].data == body


async def test_dsn_parameters_pass_through_when_announced(tmp_path: Path) -> None:
    rcpts = [
        Recipient(
            address="ann@dest.test", notify=["SUCCESS", "FAILURE"], orcpt="rfc822;ann@a.test"
        ),
        Recipient(address="bob@dest.test", notify=["NEVER"]),
    ]
    request = {"ret": "HDRS", "envid": "Q123+2Bx"}
    async with SmtpTestPeer(options=PeerOptions(dsn=True, pipelining=True)) as dsn:
        with_dsn, _ = await run_send(_config(tmp_path), [mx(dsn)], recipients=rcpts, **request)
    async with SmtpTestPeer() as plain:
        without, _ = await run_send(_config(tmp_path), [mx(plain)], recipients=rcpts, **request)
    assert with_dsn.dsn_announced and not without.dsn_announced
    assert dsn.seen.dsn_mail == ["RET=HDRS", "ENVID=Q123+2Bx"]
    assert dsn.seen.dsn_rcpt == [
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;ann@a.test",
        "NOTIFY=NEVER",
    ]
    # Not announced: not sent (aiosmtpd would refuse them with 555).
    assert [o.state for o in without.recipients] == [DELIVERED, DELIVERED]
    assert b"NOTIFY" not in b"".join(plain.seen.chunks)


async def test_ehlo_refused_falls_back_to_helo(tmp_path: Path) -> None:
    async with SmtpTestPeer(options=PeerOptions(refuse_ehlo=True)) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)])
    assert result.recipients[0].state == DELIVERED
    assert result.tries[0].helo_fallback and result.tries[0].extensions == []
    assert peer.seen.helo_names == ["EHLO postflow.test", "HELO postflow.test"]


async def test_connection_dropped_after_data_defers_the_session(tmp_path: Path) -> None:
    two = ["ann@dest.test", "bob@dest.test"]
    async with SmtpTestPeer(options=PeerOptions(drop_after_data=True, pipelining=True)) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)], recipients=two)
    for out in result.recipients:
        assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.2", "data")
        assert out.code is None and "connection" in out.text
        assert out.remote_ip == "127.0.0.1"
    assert peer.seen.data_commands == 1 and peer.received == []
    assert result.tries[0].stage == "data"


async def test_dropped_host_then_next_host_delivers(tmp_path: Path) -> None:
    async with (
        SmtpTestPeer(options=PeerOptions(drop_after_data=True)) as bad,
        SmtpTestPeer("127.0.0.2") as good,
    ):
        result, _ = await run_send(_config(tmp_path), [mx(bad), mx(good, "mx2.dest.test")])
    out = result.recipients[0]
    assert (out.state, out.remote_host, out.remote_ip) == (DELIVERED, "mx2.dest.test", "127.0.0.2")
    assert [t.stage for t in result.tries] == ["data", None]
    assert len(good.received) == 1


async def test_greeting_timeout_heartbeats_while_waiting(tmp_path: Path) -> None:
    config = _config(tmp_path, greeting_timeout=0.4)
    async with SilentServer() as silent:
        started = time.monotonic()
        result, beats = await run_send(config, [mx(silent)], heartbeat_timeout=0.15)
        took = time.monotonic() - started
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.2", "greeting")
    assert "no greeting within 0.4 s" in out.text
    assert 0.35 < took < 3
    assert silent.connections == 1
    # Beats while nothing happens on the wire, each naming the step it waits in.
    waiting = [b for b in beats if b.endswith("greeting")]
    assert len(waiting) >= 4 and waiting[0].startswith("mx.dest.test [127.0.0.1]:")


async def test_attempt_time_limit_ends_with_a_result(tmp_path: Path) -> None:
    config = _config(tmp_path, greeting_timeout=30)
    async with SilentServer() as first, SilentServer("127.0.0.2") as second:
        started = time.monotonic()
        result, _ = await run_send(config, [mx(first), mx(second)], start_to_close=1.0)
        took = time.monotonic() - started
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.2", "greeting")
    assert "attempt time limit reached" in out.text
    # Cut off before Temporal's own timeout, and no time spent on the second host.
    assert 0.8 < took < 1.0
    assert len(result.tries) == 1 and second.connections == 0


async def test_final_dot_timeout(tmp_path: Path) -> None:
    config = _config(tmp_path, final_timeout=0.3)
    async with SmtpTestPeer(options=PeerOptions(data_delay=1.0)) as peer:
        result, _ = await run_send(config, [mx(peer)])
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.2", "data")
    assert "no reply within 0.3 s" in out.text


async def test_refused_connection_tries_the_next_host(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    async with SmtpTestPeer("127.0.0.2") as good:
        dead = mx(good, "mx1.dest.test").model_copy(
            update={"addresses": ["127.0.0.1"], "port": closed_port}
        )
        result, _ = await run_send(_config(tmp_path), [dead, mx(good, "mx2.dest.test")])
        only_dead, _ = await run_send(_config(tmp_path), [dead])
    assert result.recipients[0].state == DELIVERED
    assert result.tries[0].enhanced == "4.4.1" and result.tries[0].stage == "connect"
    out = only_dead.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.1", "connect")
    assert (out.remote_host, out.remote_ip) == ("mx1.dest.test", "127.0.0.1")


@pytest.mark.parametrize("tls", [False, True])
async def test_big_body_heartbeats_per_block(tmp_path: Path, tls: bool) -> None:
    body = MESSAGE + (b"." + b"y" * 76 + b"\r\n") * 4000  # ~310 KB, dot-stuffed on the wire
    options = PeerOptions(pipelining=True, tls=pki().valid if tls else None)
    async with SmtpTestPeer(options=options) as peer:
        result, beats = await run_send(_config(tmp_path), [mx(peer)], data=body)
    assert result.tries[0].pipelined and (result.tries[0].tls is not None) == tls
    assert result.recipients[0].state == DELIVERED
    assert peer.received[0].data == body
    progress = [b for b in beats if " DATA " in b and "bytes" in b]
    assert len(progress) >= 4 and progress[-1].endswith(
        f"{len(body) + 4000 + 3}/{len(body) + 4003} bytes"
    )


async def test_server_that_stops_reading_hits_the_block_timeout(tmp_path: Path) -> None:
    body = MESSAGE + (b"z" * 998 + b"\r\n") * 8192  # 8 MB: more than the socket buffers hold
    config = _config(tmp_path, block_timeout=0.3)
    async with StallingServer() as stalling:
        started = time.monotonic()
        result, _ = await run_send(config, [mx(stalling)], data=body)
    out = result.recipients[0]
    assert (out.state, out.enhanced, out.stage) == (DEFERRED, "4.4.2", "data")
    assert "server took no data for 0.3 s" in out.text
    assert time.monotonic() - started < 5


async def test_ipv6_loopback(tmp_path: Path) -> None:
    async with SmtpTestPeer("::1", options=PeerOptions(pipelining=True)) as peer:
        result, _ = await run_send(_config(tmp_path), [mx(peer)])
    out = result.recipients[0]
    assert (out.state, out.remote_ip) == (DELIVERED, "::1")
    assert len(peer.received) == 1


def test_parse_replies_in_pieces() -> None:
    buffer = bytearray(b"250-mx.dest.test\r\n250-PIPELINING\r\n250 SIZE 10")
    assert parse_replies(buffer) == []
    buffer.extend(b"00\r\n354 go on\r\n451 4.3.0 ")
    first, second = parse_replies(buffer)
    assert first.code == 250 and first.message == "mx.dest.test\nPIPELINING\nSIZE 1000"
    assert (second.code, second.message) == (354, "go on")
    assert buffer == bytearray(b"451 4.3.0 ")
    with pytest.raises(WireProtocolError):
        parse_replies(bytearray(b"HTTP/1.1 400 Bad Request\r\n"))

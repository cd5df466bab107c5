"""The ingest's pure parts: RFC 5321 addresses, MAIL/RCPT parameters, xtext, the users
file and the Received header."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from postflow.addresses import AddressError, parse_path, split_path
from postflow.esmtp_params import (
    ParamError,
    parse_mail_params,
    parse_rcpt_params,
    xtext_decode,
    xtext_encode,
)
from postflow.passwd import PasswordFile, PasswordFileError
from postflow.received import TraceInfo, received_header


@pytest.mark.parametrize(
    ("arg", "path", "rest"),
    [
        ("<a@b.test>", "<a@b.test>", ""),
        ("<a@b.test> SIZE=10 BODY=8BITMIME", "<a@b.test>", "SIZE=10 BODY=8BITMIME"),
        (" <a@b.test>", "<a@b.test>", ""),
        ('<"x> y"@b.test> NOTIFY=NEVER', '<"x> y"@b.test>', "NOTIFY=NEVER"),
        ("a@b.test SIZE=1", "a@b.test", "SIZE=1"),
        ("<>", "<>", ""),
    ],
)
def test_split_path(arg: str, path: str, rest: str) -> None:
    assert split_path(arg) == (path, rest)


@pytest.mark.parametrize(
    ("path", "utf8", "want"),
    [
        ("<bob@dest.test>", False, "bob@dest.test"),
        ("<Bob.O'Neil+tag@Dest.Test>", False, "Bob.O'Neil+tag@Dest.Test"),
        ('<"john doe"@dest.test>', False, '"john doe"@dest.test'),
        ("<@relay.test,@b.test:bob@dest.test>", False, "bob@dest.test"),
        ("<bob@[192.0.2.7]>", False, "bob@[192.0.2.7]"),
        ("<bob@[IPv6:2001:db8::7]>", False, "bob@[IPv6:2001:db8::7]"),
        ("<jürgen@bücher.test>", True, "jürgen@bücher.test"),
        ("bob@dest.test", False, "bob@dest.test"),
        ("<" + "a" * 64 + "@dest.test>", False, "a" * 64 + "@dest.test"),
    ],
)
def test_good_addresses(path: str, utf8: bool, want: str) -> None:
    assert parse_path(path, what="recipient", null_ok=False, smtputf8=utf8) == want


@pytest.mark.parametrize(
    ("path", "utf8", "reply"),
    [
        ("<bob>", False, "501 5.1.3 Bad recipient address syntax: missing '@domain'"),
        ("<bob@>", False, "501 5.1.3 Bad recipient address syntax: no domain after '@'"),
        ("<.bob@dest.test>", False, "empty atom in the local part"),
        ("<bo..b@dest.test>", False, "empty atom in the local part"),
        ("<bo b@dest.test>", False, "character ' ' not allowed in the local part"),
        ("<bob@dest..test>", False, "empty label in domain"),
        ("<bob@-dest.test>", False, "invalid domain label '-dest'"),
        ("<bob@dest_x.test>", False, "invalid domain label 'dest_x'"),
        ("<bob@[300.1.1.1]>", False, "is not an IPv4 address literal"),
        ("<bob@[IPv6:zz::1]>", False, "is not an IPv6 address literal"),
        ("<bob@dest.test", False, "missing '>'"),
        ("<bob@dest.test>x", False, "missing '>'"),
        ("<>", False, "the null address <> is allowed for the sender only"),
        ("<" + "a" * 65 + "@dest.test>", False, "553 5.1.3 Bad recipient address: local part"),
        ("<a@" + "b" * 64 + ".test>", False, "553 5.1.3 Bad recipient address: domain label"),
        ("<a@" + "b." * 130 + "test>", False, "553 5.1.3 Bad recipient address: path longer"),
        ("<jürgen@dest.test>", False, "553 5.6.7 Bad recipient address: non-ASCII"),
        ("<bob\udcff@dest.test>", True, "not valid UTF-8"),
        ('<"bob@dest.test>', False, "unterminated quoted local part"),
    ],
)
def test_bad_addresses_name_the_problem(path: str, utf8: bool, reply: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_path(path, what="recipient", null_ok=False, smtputf8=utf8)
    assert reply in caught.value.reply
    assert caught.value.reply.startswith(("501 5.1.3", "553 5.1.3", "553 5.6.7"))


def test_null_sender_is_allowed() -> None:
    assert parse_path("<>", what="sender", null_ok=True, smtputf8=False) == ""


def test_xtext_round_trip() -> None:
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    assert xtext_decode("a+2bb") == "a+b"  # lower-case hex tolerated on input
    for bad in ("a+2", "a+ZZ", "a=b", "a b"):
        with pytest.raises(ValueError):
            xtext_decode(bad)


def test_mail_parameters() -> None:
    params = parse_mail_params("size=100 Body=8bitmime SMTPUTF8 RET=hdrs ENVID=Q+2Bx7")
    assert (params.size, params.body, params.smtputf8) == (100, "8BITMIME", True)
    assert (params.ret, params.envid) == ("HDRS", "Q+2Bx7")
    # ENVID is kept as canonical xtext: lower-case hex is upper-cased, case of text kept.
    assert parse_mail_params("ENVID=aB+2bc").envid == "aB+2Bc"
    assert parse_mail_params("AUTH=<>").auth is None


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("SIZE=abc", "501 5.5.4 Bad SIZE parameter"),
        ("RET=BOTH", "501 5.5.4 Bad RET parameter"),
        ("ENVID=a+ZZ", "501 5.5.4 Bad ENVID parameter: not xtext"),
        ("ENVID=" + "x" * 101, "501 5.5.4 Bad ENVID parameter: 1 to 100 characters"),
        ("BODY=BINARYMIME", "501 5.5.4 Bad BODY parameter"),
        ("SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
        ("RET=FULL RET=HDRS", "501 5.5.4 MAIL parameter RET given twice"),
        ("XFOO=1", "555 5.5.4 Unsupported MAIL parameter XFOO"),
        ("SIZE=", "501 5.5.4 Bad MAIL parameter syntax"),
    ],
)
def test_bad_mail_parameters(text: str, reply: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_mail_params(text)
    assert caught.value.reply.startswith(reply)


def test_mail_parameters_need_ehlo() -> None:
    with pytest.raises(ParamError, match="need EHLO"):
        parse_mail_params("SIZE=10", extended=False)


def test_rcpt_parameters() -> None:
    params = parse_rcpt_params("notify=success,Delay ORCPT=rfc822;Bob+2Bx+40dest.test")
    assert params.notify == ["SUCCESS", "DELAY"]
    assert params.orcpt == "rfc822;Bob+2Bx@dest.test"
    assert parse_rcpt_params("NOTIFY=NEVER").notify == ["NEVER"]
    assert parse_rcpt_params("ORCPT=RFC822;a+40b").orcpt == "rfc822;a@b"
    assert parse_rcpt_params("").notify is None
    utf8 = parse_rcpt_params("ORCPT=utf-8;j\u00fcrgen@dest.test", smtputf8=True)
    assert utf8.orcpt == "utf-8;j\u00fcrgen@dest.test"


@pytest.mark.parametrize(
    ("text", "reply"),
    [
        ("NOTIFY=NEVER,SUCCESS", "501 5.5.4 Bad NOTIFY parameter: NEVER must stand alone"),
        ("NOTIFY=SUCCESS,SUCCESS", "501 5.5.4 Bad NOTIFY parameter"),
        ("NOTIFY=ALWAYS", "501 5.5.4 Bad NOTIFY parameter"),
        ("ORCPT=bob@dest.test", "501 5.5.4 Bad ORCPT parameter: expected addr-type;address"),
        ("ORCPT=rfc822;a+G1", "501 5.5.4 Bad ORCPT parameter: not xtext"),
        ("ORCPT=rfc822;" + "a" * 501, "501 5.5.4 Bad ORCPT parameter: longer than 500"),
        ("ORCPT=utf-8;j\u00fcrgen@dest.test", "501 5.5.4 Bad ORCPT parameter: non-ASCII"),
        ("FOO=1", "555 5.5.4 Unsupported RCPT parameter FOO"),
    ],
)
def test_bad_rcpt_parameters(text: str, reply: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_rcpt_params(text)
    assert caught.value.reply.startswith(reply)


def test_password_file(tmp_path: Path) -> None:
    users = PasswordFile(tmp_path / "users")
    users.set("alice", "correct horse")
    users.set("bob", "battery staple")
    text = (tmp_path / "users").read_text()
    assert "correct horse" not in text
    assert text.startswith("alice:scrypt$16384$8$1$")
    assert (tmp_path / "users").stat().st_mode & 0o777 == 0o600
    fresh = PasswordFile(tmp_path / "users")
    assert fresh.check("alice", b"correct horse")
    assert not fresh.check("alice", b"battery staple")
    assert not fresh.check("carol", b"correct horse")
    # Salted: the same password twice gives two different hashes.
    users.set("carol", "correct horse")
    lines = dict(line.split(":", 1) for line in (tmp_path / "users").read_text().splitlines())
    assert lines["alice"] != lines["carol"]
    # A changed file is noticed without a restart.
    assert users.remove("bob")
    assert not fresh.check("bob", b"battery staple")
    assert fresh.check("carol", b"correct horse")


def test_postflow_passwd_command(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "POSTFLOW_CONFIG"}
    users = tmp_path / "users"

    def passwd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "postflow.cli", "passwd", *args, "--file", str(users)]
        return subprocess.run(
            command, input=stdin, capture_output=True, text=True, cwd=tmp_path, env=env
        )

    done = passwd("alice", stdin="s3cret pass\n")
    assert done.returncode == 0, done.stderr
    assert PasswordFile(users).check("alice", b"s3cret pass")
    bad = passwd("al:ice", stdin="x\n")
    assert bad.returncode == 2
    assert "no spaces, colons or controls" in bad.stderr
    assert passwd("alice", "--delete").returncode == 0
    assert not PasswordFile(users).check("alice", b"s3cret pass")


def test_password_file_names_the_bad_line(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("# users\nalice:plaintext\n")
    with pytest.raises(PasswordFileError, match=r"users:2: not 'user:scrypt\$\.\.\.'"):
        PasswordFile(tmp_path / "users").load()


def test_received_header() -> None:
    when = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
    plain = received_header(
        TraceInfo(
            helo="client.test",
            client_ip="127.0.0.9",
            by="mx.postflow.test",
            queue_id="4ZQ1",
            recipient="bob@dest.test",
            when=when,
        )
    )
    assert plain == (
        b"Received: from client.test ([127.0.0.9])\r\n"
        b"\tby mx.postflow.test (Postflow) with ESMTP id 4ZQ1\r\n"
        b"\tfor <bob@dest.test>; Tue, 01 Jul 2025 12:00:00 +0000\r\n"
    )
    tls = received_header(
        TraceInfo(
            helo="bad(helo)",
            client_ip="::1",
            by="mx.postflow.test",
            queue_id="4ZQ2",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            tls_bits=256,
            authenticated=True,
            when=when,
        )
    )
    assert tls == (
        b"Received: from [IPv6:::1] (HELO bad?helo?)\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
        b"\tby mx.postflow.test (Postflow) with ESMTPSA id 4ZQ2;\r\n"
        b"\tTue, 01 Jul 2025 12:00:00 +0000\r\n"
    )

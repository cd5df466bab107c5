"""Hostile input, each case asserting a clear error and nothing lost.

Destination strings and configuration values (parsers), envelope addresses (the parser and
real SMTP sessions to the ingest), message bodies relayed byte for byte (ingest → workflow →
SMTP peer), receiving servers' reply texts, and DNS answers from a real server on loopback.
Tables of known-nasty cases plus hypothesis properties; `CASES` counts every case tried
and the count is printed at the end of the module. Cases that show a defect in code this
suite does not own are `xfail(strict=True)`: they turn red the day the defect is fixed, so
the marker gets removed.
"""

from __future__ import annotations

import asyncio
import re
import string
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from email.parser import BytesParser
from email.policy import compat32
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.resolve import ResolveActivities
from postflow.addresses import AddressError, parse_path
from postflow.config import ConfigError, parse_config
from postflow.destination import DestinationError, parse_destination
from postflow.models import RecipientState, ResolveRequest, ResolveResult
from postflow.replies import MAX_TEXT, Stage, judge_reply
from tests.dnsserver import DnsServer
from tests.faults.client import SmtpSession
from tests.faults.relay import Relay, relay
from tests.faults.sink import RecordingSink

CASES: Counter[str] = Counter()
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    line = f"bad-input cases tried: {sum(CASES.values())} " + str(dict(sorted(CASES.items())))
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


# ---- destination strings ------------------------------------------------------------------------

DESTINATION_ERRORS = [
    ("", "expected 'server:host"),
    ("smtp:mx.example.test", "expected 'server:host"),
    ("\x00", "expected 'server:host"),
    ("server:", "needs at least one host"),
    ("server:a,,b", "empty host"),
    ("server:h:0", "bad port '0'"),
    ("server:h:65536", "bad port '65536'"),
    ("server:h:+25", "bad port '+25'"),
    ("server:h: 25", "bad port ' 25'"),
    ("server:a:b:c", "bad port 'c'"),
    ("server:[1.2.3]", "'1.2.3' is not an IP address"),
    ("server:[::1", "missing ']'"),
    ("server:[::1]x", "unexpected 'x' after ']'"),
    ("server:a..b", "'a..b' is not a host name"),
    ("server:-a", "'-a' is not a host name"),
    ("server:" + "a" * 64, "is not a host name"),
    ("server:" + "a." * 127 + "a", "is not a host name"),
    ("server:éxample.test", "'éxample.test' is not a host name"),
    ("server:ex ample.test", "is not a host name"),
    ("server:a\r\nb", "is not a host name"),
    ("server:1.2.3.4:25:25", "is not a host name"),
    ("lookup-mx:", "no options"),
    ("lookup-mx:x", "'x' is not name=value"),
    ("lookup-mx:port=1;port=2", "'port' given twice"),
    ("lookup-mx:bogus=1", "unknown option 'bogus'"),
    ("lookup-mx:zone=ex ample", "zone 'ex ample' is not a DNS name"),
    ("lookup-mx:zone=", "is not a DNS name"),
    ("lookup-mx:query=", "needs at least one DNS server"),
    ("lookup-mx:query=;", "needs at least one DNS server"),
    ("lookup-mx:query=\x00", "is not a host name"),
    ("lookup-mx:port=0", "bad port '0'"),
    ("lookup-mx:port=http", "bad port 'http'"),
]


@pytest.mark.parametrize(("text", "fragment"), DESTINATION_ERRORS)
def test_bad_destinations_say_what_is_wrong(text: str, fragment: str) -> None:
    CASES["destination table"] += 1
    with pytest.raises(DestinationError) as err:
        parse_destination(text)
    assert fragment in str(err.value)


def test_destination_port_must_be_ascii_digits() -> None:
    CASES["destination table"] += 1
    with pytest.raises(DestinationError):
        parse_destination("server:h:\u0663")


_PREFIXES = st.sampled_from(
    ["", "server:", "lookup-mx:", "lookup-mx", "server:[", "lookup-mx:query="]
)


@settings(max_examples=400, deadline=None)
@given(text=st.builds(str.__add__, _PREFIXES, st.text(max_size=80)))
def test_any_destination_text_parses_or_fails_with_destination_error(text: str) -> None:
    CASES["destination property"] += 1
    try:
        destination = parse_destination(text)
    except DestinationError as exc:
        assert str(exc).strip()
        return
    assert destination.kind in ("server", "lookup-mx")


@settings(max_examples=200, deadline=None)
@given(text=st.builds(str.__add__, _PREFIXES, st.text(max_size=40)))
def test_destination_errors_are_one_printable_line(text: str) -> None:
    CASES["destination property"] += 1
    try:
        parse_destination(text)
    except DestinationError as exc:
        assert not _CONTROL.search(str(exc)), repr(str(exc))


_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
_HOSTNAME = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
_IPV4 = st.ip_addresses(v=4).map(str)
_IPV6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")


@settings(max_examples=200, deadline=None)
@given(
    hosts=st.lists(
        st.tuples(st.one_of(_HOSTNAME, _IPV4, _IPV6), st.integers(1, 65535)),
        min_size=1,
        max_size=4,
    )
)
def test_valid_server_lists_round_trip(hosts: list[tuple[str, int]]) -> None:
    CASES["destination property"] += 1
    text = "server:" + ",".join(f"{h}:{p}" for h, p in hosts)
    parsed = parse_destination(text)
    assert [(h.host, h.port) for h in parsed.hosts] == [(h.strip("[]"), p) for h, p in hosts]


# ---- configuration values ----------------------------------------------------------------------

CONFIG_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    ({"smtp": {"connect_timeout": "5 minutes"}}, "smtp.connect_timeout", '"5 minutes"'),
    ({"smtp": {"connect_timeout": "10x"}}, "smtp.connect_timeout", '"10x"'),
    ({"smtp": {"command_timeout": [1]}}, "smtp.command_timeout", "[1]"),
    ({"transports": {"default": {"retry_delays": "60,abc"}}}, "retry_delays", '"60,abc"'),
    ({"transports": {"default": {"retry_delays": ""}}}, "retry_delays", '""'),
    ({"transports": {"default": {"retry_delays": [0]}}}, "retry_delays.0", "0"),
    ({"transports": {"default": {"retry_delays": [-5]}}}, "retry_delays.0", "-5"),
    ({"transports": {"default": {"retry_count": -1}}}, "retry_count", "-1"),
    ({"transports": {"default": {"retry_count": "x\ny"}}}, "retry_count", '"x\\ny"'),
    ({"transports": {"default": {"on_give_up": "bounce\n"}}}, "on_give_up", '"bounce\\n"'),
    ({"transports": {"default": {"tls": "yes"}}}, "transports.default.tls", '"yes"'),
    ({"transports": {"default": {"destination": "smtp:x"}}}, "destination", '"smtp:x"'),
    ({"transports": {"default": {"destination": "server:h:0"}}}, "destination", '"server:h:0"'),
    ({"transports": {"default": {"dns_timeout": "1h"}}}, "dns_timeout", "3600"),
    ({"transports": {"default": {"dns_timeout": 0}}}, "dns_timeout", "0"),
    ({"transports": {"default": {"max_mx_hosts": 0}}}, "max_mx_hosts", "0"),
    ({"transports": {"default": {"ip_version": "ipv5"}}}, "ip_version", '"ipv5"'),
    ({"transports": {"default": {"bogus": 1}}}, "transports.default.bogus", "unknown key"),
    ({"transports": {"x": {}}}, "transports.default", "required"),
    ({"ingest": {"allow_networks": ["10.0.0.0/33"]}}, "ingest.allow_networks", "10.0.0.0/33"),
    ({"ingest": {"listen": "127.0.0.1:99999"}}, "ingest.listen", '"127.0.0.1:99999"'),
    ({"ingest": {"listen": "127.0.0.1"}}, "ingest.listen", '"127.0.0.1"'),
    ({"ingest": {"max_recipients": 0}}, "ingest.max_recipients", "0"),
    ({"temporal": {"ui_port": 70000}}, "temporal.ui_port", "70000"),
    ({"temporal": {"ui_port": "http"}}, "temporal.ui_port", '"http"'),
    ({"routes": [{"domains": [], "transport": "default"}]}, "routes.0.domains", "[]"),
    ({"routes": [{"domains": ["a.test"], "transport": "nope"}]}, "routes.0.transport", "nope"),
    ({"worker": {"max_cached_workflows": -1}}, "worker.max_cached_workflows", "-1"),
    ({"bogus": 1}, "bogus", "unknown key"),
]


@pytest.mark.parametrize(("data", "key", "shown"), CONFIG_ERRORS)
def test_config_errors_name_key_and_value(data: dict[str, Any], key: str, shown: str) -> None:
    CASES["config table"] += 1
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    lines = err.value.problems
    assert any(key in line and shown in line for line in lines), lines
    assert all(not _CONTROL.search(line) for line in lines), lines


# Hostile values that must each be refused with an error naming the key.
CONFIG_DEFECTS: list[tuple[dict[str, Any], str]] = [
    ({"smtp": {"helo_name": "mx.test\r\nMAIL FROM:<x@y>"}}, "smtp.helo_name"),
    ({"ingest": {"hostname": "mx.test\r\n250 fake"}}, "ingest.hostname"),
    ({"smtp": {"connect_timeout": -5}}, "smtp.connect_timeout"),
    ({"smtp": {"connect_timeout": True}}, "smtp.connect_timeout"),
    ({"smtp": {"connect_timeout": 1e300}}, "smtp.connect_timeout"),
    ({"smtp": {"connect_timeout": float("inf")}}, "smtp.connect_timeout"),
    ({"smtp": {"connect_timeout": "99999999999999999999d"}}, "smtp.connect_timeout"),
    ({"transports": {"default": {"retry_delays": [10**30]}}}, "retry_delays"),
    ({"routes": [{"domains": ["exa mple.test"], "transport": "default"}]}, "routes.0.domains"),
    ({"routes": [{"domains": ["a.test\r\n"], "transport": "default"}]}, "routes.0.domains"),
    ({"ingest": {"listen": 2525}}, "ingest.listen"),  # AttributeError: 'int' ... 'strip'
    ({"sink": {"listen": ["127.0.0.1", 25]}}, "sink.listen"),
]


@pytest.mark.parametrize(("data", "key"), CONFIG_DEFECTS)
def test_config_defects(data: dict[str, Any], key: str) -> None:
    CASES["config table"] += 1
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert any(key in line for line in err.value.problems)


# Bounded numbers: durations beyond ~30 000 years overflow timedelta (a listed defect).
_ANY = st.one_of(
    st.text(max_size=30),
    st.integers(-(10**9), 10**9),
    st.floats(-1e9, 1e9, allow_nan=False),
    st.booleans(),
    st.lists(st.one_of(st.text(max_size=10), st.integers(-(10**6), 10**6)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_TEXT = st.text(max_size=40)  # listen = <non-string> crashes: a listed defect
_FIELDS = [
    ("smtp", "connect_timeout", _ANY),
    ("smtp", "data_timeout", _ANY),
    ("ingest", "listen", _TEXT),
    ("ingest", "max_recipients", _ANY),
    ("ingest", "allow_networks", _ANY),
    ("ingest", "idle_timeout", _ANY),
    ("temporal", "ui_port", _ANY),
    ("transports.default", "retry_delays", _ANY),
    ("transports.default", "retry_count", _ANY),
    ("transports.default", "on_give_up", _ANY),
    ("transports.default", "dns_timeout", _ANY),
    ("transports.default", "max_mx_hosts", _ANY),
    ("transports.default", "tls", _ANY),
    ("worker", "max_concurrent_activities", _ANY),
    ("spool", "backend", _ANY),
]


def _nest(section: str, key: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {key: value}
    for part in reversed(section.split(".")):
        data = {part: data}
    return data


@settings(max_examples=500, deadline=None)
@given(data=st.data(), field=st.sampled_from(_FIELDS))
def test_any_config_value_is_accepted_or_named_in_one_clean_line(
    data: st.DataObject, field: tuple[str, str, st.SearchStrategy[Any]]
) -> None:
    CASES["config property"] += 1
    section, key, values = field
    value = data.draw(values)
    try:
        parse_config(_nest(section, key, value))
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert line.startswith(f"{section}.{key}") or line.startswith(section), line
            assert not _CONTROL.search(line), line


# ---- envelope addresses: the parser -------------------------------------------------------------

_REPLY = re.compile(r"^5\d\d 5\.\d\.\d{1,3} \S")
_ADDRESS_TEXT = st.one_of(
    st.text(max_size=300),
    st.builds(lambda a, b: f"<{a}@{b}>", st.text(max_size=70), st.text(max_size=70)),
    st.builds(lambda a: f'<"{a}"@dest.test>', st.text(max_size=70)),
    st.builds(lambda a: f"<x@[{a}]>", st.text(string.hexdigits + ":.v6IP", max_size=45)),
)


@settings(max_examples=600, deadline=None)
@given(path=_ADDRESS_TEXT, smtputf8=st.booleans())
def test_any_address_is_a_mailbox_or_a_clear_5xx(path: str, smtputf8: bool) -> None:
    CASES["address property"] += 1
    try:
        mailbox = parse_path(path, what="recipient", null_ok=False, smtputf8=smtputf8)
    except AddressError as exc:
        assert _REPLY.match(exc.reply), exc.reply
        assert not _CONTROL.search(exc.reply), exc.reply
        return
    assert "@" in mailbox
    assert not _CONTROL.search(mailbox)
    assert len(mailbox.encode("utf-8", "surrogateescape")) <= 254


# ---- the relay: ingest → workflow → SMTP peer, on the time-skipping server ----------------------


@pytest.fixture(scope="module")
async def sink() -> AsyncIterator[RecordingSink]:
    async with RecordingSink() as server:
        yield server


@pytest.fixture(scope="module")
async def mta(
    ts_env: WorkflowEnvironment, sink: RecordingSink, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Relay]:
    workdir = tmp_path_factory.mktemp("bad-input")
    async with relay(ts_env, workdir, sink.destination) as running:
        yield running


_serial = iter(range(10**9))


def _rcpt(tag: str) -> str:
    return f"{tag}-{next(_serial)}@dest.test"


def _delivered_to(sink: RecordingSink, rcpt: str) -> list[bytes]:
    return [d.data for d in sink.deliveries if rcpt in d.rcpt_tos]


async def _session(port: int) -> SmtpSession:
    session = SmtpSession("127.0.0.1", port, timeout=10)
    code, _ = await session.open()
    assert code == 250
    return session


async def _raw(session: SmtpSession, line: bytes) -> list[tuple[int, str]]:
    """Writes raw bytes; every reply that comes back within half a second."""
    assert session.writer is not None
    session.writer.write(line)
    await session.writer.drain()
    replies = []
    while True:
        try:
            replies.append(await asyncio.wait_for(session._reply(), 0.5))
        except TimeoutError:
            return replies


# (RCPT line as sent, expected reply codes, recipients that must be delivered exactly so)
ADDRESS_SESSIONS: list[tuple[bytes, list[int], list[str]]] = [
    (b'RCPT TO:<"john doe"@dest.test>\r\n', [250], ['"john doe"@dest.test']),
    (b'RCPT TO:<"a\\"b"@dest.test>\r\n', [250], ['"a\\"b"@dest.test']),
    (b'RCPT TO:<"x>y"@dest.test>\r\n', [250], ['"x>y"@dest.test']),
    (b"RCPT TO:<user@[127.0.0.1]>\r\n", [250], ["user@[127.0.0.1]"]),
    (b"RCPT TO:<user@[IPv6:::1]>\r\n", [250], ["user@[IPv6:::1]"]),
    (b"RCPT TO:<@relay.test:routed@dest.test>\r\n", [250], ["routed@dest.test"]),
    (b"RCPT TO:<a\x00b@dest.test>\r\n", [501], []),
    (b"RCPT TO:<a\rb@dest.test>\r\n", [501], []),
    (b"RCPT TO:<x1@dest.test>\rRCPT TO:<x2@dest.test>\r\n", [501], []),
    (b"RCPT TO:<" + b"a" * 65 + b"@dest.test>\r\n", [553], []),
    (b"RCPT TO:<a@" + b"b" * 250 + b".test>\r\n", [553], []),
    (b"RCPT TO:<" + b"a" * 2000 + b"@dest.test>\r\n", [500], []),
    (b"RCPT TO:<\xff@dest.test>\r\n", [501], []),
    (b"RCPT TO:<\xc3\xbc@dest.test>\r\n", [553], []),
    (b"RCPT TO:<>\r\n", [501], []),
    (b"RCPT TO:<a@[999.1.1.1]>\r\n", [501], []),
    (b"RCPT TO:<a@[IPv6:zz]>\r\n", [501], []),
    (b"RCPT TO:<a@-dest.test>\r\n", [501], []),
    (b"RCPT TO:<a..b@dest.test>\r\n", [501], []),
    (b"RCPT TO:<a@dest..test>\r\n", [501], []),
    (b"RCPT TO:a b@dest.test\r\n", [501], []),
    (b"RCPT TO:<a@dest.test\r\n", [501], []),
]


@pytest.mark.parametrize(("line", "codes", "delivered"), ADDRESS_SESSIONS)
async def test_hostile_recipients_in_a_real_session(
    mta: Relay, sink: RecordingSink, line: bytes, codes: list[int], delivered: list[str]
) -> None:
    """The hostile RCPT gets a clear answer, the session goes on, and exactly the accepted
    recipients are delivered, spelt as accepted."""
    CASES["address sessions"] += 1
    session = await _session(mta.port)
    try:
        assert (await session.command("MAIL FROM:<s@src.test>"))[0] == 250
        replies = await _raw(session, line)
        assert [code for code, _ in replies] == codes, replies
        for code, text in replies:
            if code >= 400:
                assert re.match(r"^[45]\.\d\.\d+ \S|^Command line too long|^Error", text), text
        control = _rcpt("control")
        assert (await session.command(f"RCPT TO:<{control}>"))[0] == 250
        assert (await session.command("DATA"))[0] == 354
        await session.send_body(b"Subject: hostile rcpt\r\n\r\nbody\r\n")
        code, text = await session.final_reply()
        assert code == 250, text
    finally:
        await session.close()
    report = await mta.result(text.rsplit(" ", 1)[1])
    assert {r.address for r in report.recipients} == {control, *delivered}
    assert all(r.state == RecipientState.DELIVERED for r in report.recipients)
    for address in [control, *delivered]:
        assert len(_delivered_to(sink, address)) == 1, address


# ---- message bodies, relayed byte for byte ------------------------------------------------------

_HEAD = b"From: a@src.test\r\nTo: b@dest.test\r\nSubject: body test\r\n"
BODIES: dict[str, bytes] = {
    "plain": _HEAD + b"\r\nHello.\r\n",
    "no header/body separator": b"Subject: only headers\r\nX-A: b\r\n",
    "no headers at all": b"just a line of text\r\n",
    "empty": b"",
    "no final CRLF": _HEAD + b"\r\nlast line without end",
    "header without colon": b"This is not a header\r\n" + _HEAD + b"\r\nbody\r\n",
    "8-bit latin-1": _HEAD + b"\r\nGr\xfc\xdfe aus K\xf6ln\r\n",
    "8-bit invalid utf-8": _HEAD + b"\r\n\xff\xfe\xc3\x28\xa0\xa1\r\n",
    "utf-8 header": b"Subject: caf\xc3\xa9 \xf0\x9f\x93\xa7\r\n\r\nbody\r\n",
    "NUL bytes": _HEAD + b"\r\nnul\x00inside\x00\r\n",
    "998-octet line": _HEAD + b"\r\n" + b"x" * 998 + b"\r\n",
    "1001-octet line (tolerated)": _HEAD + b"\r\n" + b"x" * 1001 + b"\r\n",
    "many long lines": _HEAD + b"\r\n" + (b"y" * 990 + b"\r\n") * 200,
    "dots": _HEAD + b"\r\n.\r\n..\r\n.x\r\n...\r\n. \r\n",
    "smuggling LF.LF": _HEAD + b"\r\nfirst\n.\nMAIL FROM:<evil@x>\r\nafter\r\n",
    "smuggling CRLF.LF": _HEAD + b"\r\nfirst\r\n.\nRCPT TO:<evil@x>\r\nafter\r\n",
    "smuggling LF.CRLF": _HEAD + b"\r\nfirst\n.\r\nDATA\r\nafter\r\n",
    "bare CR": _HEAD + b"\r\none\rtwo\r\n",
    "bare LF": _HEAD + b"\r\none\ntwo\n\nthree\r\n",
    "broken MIME: boundary never closed": _HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n'
    b"Content-Type: text/plain\r\n\r\npart one\r\n--b1\r\nContent-Type: text/plain\r\n\r\n",
    "broken MIME: undeclared boundary": _HEAD + b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed\r\n\r\n--nowhere\r\nx\r\n--nowhere--\r\n",
    "broken MIME: nested garbage": _HEAD + b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="a"\r\n\r\n--a\r\n'
    b'Content-Type: multipart/alternative; boundary="a"\r\n\r\n--a--\r\n--a\r\n\r\n',
    "broken MIME: base64 lies": _HEAD + b"MIME-Version: 1.0\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n====\r\n",
    "folded 20 kB header": b"X-Long: " + b"\r\n\tfold".join([b"v" * 70] * 280) + b"\r\n"
    b"\r\nbody\r\n",
    "duplicate Message-ID": b"Message-ID: <a@x>\r\nMessage-ID: <b@x>\r\n\r\nbody\r\n",
    "Message-ID with CRLF injection": b"Message-ID: <a@x>\r\n Bcc: evil@x\r\n\r\nbody\r\n",
}


def _wire(body: bytes) -> bytes:
    """What SMTP carries: every line ends in CRLF (RFC 5321 §2.3.8: bare CR and LF are
    not sent; the outbound client writes them as CRLF), and the body ends with CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return re.sub(rb"\r\n|\r|\n", b"\r\n", body)


async def _relay_body(mta: Relay, sink: RecordingSink, body: bytes) -> None:
    rcpt = _rcpt("body")
    outcome = await mta.send(rcpt, body)
    assert outcome.accepted, outcome
    report = await mta.result(outcome.queue_id or "")
    assert report.recipients[0].state == RecipientState.DELIVERED, report
    (got,) = _delivered_to(sink, rcpt)
    # The ingest adds its Received: header on top; everything after it is the sender's.
    assert got.startswith(b"Received: "), got[:200]
    assert got.endswith(_wire(body)), (got[-300:], _wire(body)[-300:])
    trace = got[: len(got) - len(_wire(body))]
    assert outcome.queue_id in trace.decode("ascii", "replace")
    assert not trace.strip(b"\r\n").split(b"\r\n")[-1].startswith(b"\r\n")


@pytest.mark.parametrize("name", list(BODIES))
async def test_bodies_are_relayed_unmodified(mta: Relay, sink: RecordingSink, name: str) -> None:
    CASES["body table"] += 1
    await _relay_body(mta, sink, BODIES[name])


_LINE = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(st.one_of(_LINE, st.binary(max_size=60)), max_size=40))
async def test_random_bodies_are_relayed_unmodified(
    mta: Relay, sink: RecordingSink, lines: list[bytes]
) -> None:
    CASES["body property"] += 1
    await _relay_body(mta, sink, b"\r\n".join(lines))


@pytest.mark.parametrize("length", [1002, 5000, 100_000])
async def test_overlong_lines_are_refused_and_nothing_is_kept(
    mta: Relay, sink: RecordingSink, length: int
) -> None:
    """RFC 5321 §4.5.3.1.6: 1000 octets per line (the ingest tolerates 1001 before CRLF);
    longer is refused after the dot, clearly, and no trace of the message stays."""
    CASES["body table"] += 1
    before = sorted(mta.spool.glob("*.eml"))
    rcpt = _rcpt("long")
    outcome = await mta.send(rcpt, _HEAD + b"\r\n" + b"z" * length + b"\r\nend\r\n")
    assert outcome.code == 500, outcome
    assert "longer than 1000 octets" in outcome.text
    assert sorted(mta.spool.glob("*.eml")) == before
    assert not _delivered_to(sink, rcpt)


# ---- reply texts from the receiving server ------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(
    code=st.integers(100, 699),
    text=st.text(max_size=1200),
    stage=st.sampled_from([Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.GREETING]),
)
def test_any_reply_text_becomes_one_clean_line(code: int, text: str, stage: Stage) -> None:
    CASES["reply property"] += 1
    verdict = judge_reply(code, text, stage)
    assert not _CONTROL.search(verdict.text), verdict.text
    assert len(verdict.text) <= MAX_TEXT + 40
    assert _ENHANCED.match(verdict.enhanced), verdict.enhanced
    expected = {
        "2": "delivered",
        "4": "deferred",
        "5": "deferred"
        if stage.value in ("greeting", "connect", "ehlo", "tls", "auth")
        else "failed",
    }
    if str(code)[0] in expected:
        assert verdict.state.value == expected[str(code)[0]]
    else:
        assert verdict.state == RecipientState.DEFERRED  # nonsense codes never bounce


# (raw RCPT replies per attempt, final state, enhanced code, words the text must keep)
REPLY_SESSIONS: list[Any] = [
    (
        [b"550-5.1.1 first line\r\n550 5.1.1 second caf\xc3\xa9 \xe2\x80\xae\r\n"],
        RecipientState.FAILED,
        "5.1.1",
        ["first line", "second", "café"],
    ),
    (
        [b"550 5.1.1 invalid utf-8 \xff\xfe here\r\n"],
        RecipientState.FAILED,
        "5.1.1",
        ["invalid utf-8", "here"],
    ),
    ([b"550 5.1.1 abc\rdef\x00ghi\x1b[31m\r\n"], RecipientState.FAILED, "5.1.1", ["abc", "ghi"]),
    ([b"550 " + b"x" * 5000 + b"\r\n"], RecipientState.FAILED, "5.0.0", ["xxxx"]),
    ([b"550\r\n"], RecipientState.FAILED, "5.0.0", []),
    ([b"550 9.9.9 bogus enhanced code\r\n"], RecipientState.FAILED, "5.0.0", ["bogus"]),
    ([b"550 4.1.1 class mismatch\r\n"], RecipientState.FAILED, "5.0.0", ["mismatch"]),
    (
        [b"451 4.7.1 greylisted \xe2\x80\xae\x07 try later\r\n", None],
        RecipientState.DELIVERED,
        "2.0.0",
        [],
    ),
    ([b"452-4.2.2 mailbox\r\n452-\r\n452 full\r\n", None], RecipientState.DELIVERED, "2.0.0", []),
    ([b"550 5.1.1 lf only\n"], RecipientState.FAILED, "5.1.1", ["lf only"]),
]


@pytest.mark.parametrize(("replies", "state", "enhanced", "words"), REPLY_SESSIONS)
async def test_hostile_reply_texts_become_clean_statuses(
    mta: Relay,
    sink: RecordingSink,
    replies: list[bytes | None],
    state: RecipientState,
    enhanced: str,
    words: list[str],
) -> None:
    CASES["reply sessions"] += 1
    rcpt = _rcpt("reply")
    sink.rcpt_replies[rcpt] = replies
    outcome = await mta.send(rcpt, _HEAD + b"\r\nbody\r\n")
    assert outcome.accepted, outcome
    report = await asyncio.wait_for(mta.result(outcome.queue_id or ""), 60)
    (recipient,) = report.recipients
    assert recipient.state == state, recipient
    if state == RecipientState.FAILED:
        assert recipient.enhanced == enhanced
        assert not _CONTROL.search(recipient.text), recipient.text
        assert len(recipient.text) <= MAX_TEXT + 40
        for word in words:
            assert word in recipient.text, recipient.text
        await _assert_clean_report(sink, recipient.text[:20])
    else:
        assert recipient.attempts == len(replies)
        assert len(_delivered_to(sink, rcpt)) == 1


async def _assert_clean_report(sink: RecordingSink, fragment: str) -> None:
    """The failure report to the sender carries the reply text without forged lines."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for delivery in sink.deliveries:
            if "s@src.test" in delivery.rcpt_tos and fragment.encode() in delivery.data:
                report = BytesParser(policy=compat32).parsebytes(delivery.data)
                for part in report.walk():
                    if part.get_content_type() == "message/delivery-status":
                        text = part.as_bytes()
                        assert b"\r\n\r\n" in text or b"\n\n" in text
                        for line in text.splitlines():
                            assert not line.startswith((b"Bcc", b"MAIL ", b"RCPT ")), line
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no failure report mentioning {fragment!r}")


# ---- DNS answers ---------------------------------------------------------------------------------

_CHAIN = "".join(f"long{i} CNAME long{i + 1}\n" for i in range(20)) + "long20 A 127.0.0.1\n"
_HUGE = "".join(f"huge MX {i % 7} h{i}\n" for i in range(1000)) + "".join(
    f"h{i} A 127.0.{i // 250}.{i % 250 + 1}\n" for i in range(1000)
)
# Each MX name without addresses costs two lookups: 100 of them take about 3 s here.
_NONE = "".join(f"hugenone MX {i} nowhere{i}\n" for i in range(100))
BAD_ZONE = f"""
selfloop   CNAME selfloop
loopa      CNAME loopb
loopb      CNAME loopa
mxloop     MX 10 target
target     CNAME target2
target2    CNAME target
mxip4      MX 10 127.0.0.42.
mxip6      MX 10 ::1.
mxbracket  MX 10 [127.0.0.43].
mxipmixed  MX 10 127.0.0.44.
mxipmixed  MX 20 good
good       A 127.0.0.45
mxnul      MX 10 \\000.bad.test.
mxempty    MX 10 .
mxempty    MX 20 good
{_CHAIN}{_HUGE}{_NONE}
"""


class _HostileDns(DnsServer):
    """Answers `evil.bad.test` with a CNAME loop inside one NOERROR answer, as no honest
    server would: the resolver must notice, not follow it forever."""

    def answer(self, data: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(data)
        name = query.question[0].name if query.question else None
        if name != dns.name.from_text("evil.bad.test"):
            return super().answer(data, transport)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.answer.append(dns.rrset.from_text("evil.bad.test.", 60, "IN", "CNAME", "evil2"))
        response.answer.append(
            dns.rrset.from_text("evil2.bad.test.", 60, "IN", "CNAME", "evil.bad.test.")
        )
        return response.to_wire()


@pytest.fixture(scope="module")
async def bad_dns() -> AsyncIterator[DnsServer]:
    async with _HostileDns({"bad.test": BAD_ZONE}) as server:
        yield server


async def _resolve(server: DnsServer, domain: str, **transport: Any) -> ResolveResult:
    settings = {"destination": server.destination(port=2525), "dns_timeout": 2, **transport}
    acts = ResolveActivities(parse_config({"transports": {"default": settings}}))
    request = ResolveRequest(transport="default", domain=domain)
    return await ActivityEnvironment().run(acts.resolve_destination, request)


# (domain, transport settings, hosts expected as (name, addresses) or None, error code)
DNS_CASES: list[tuple[str, dict[str, Any], list[tuple[str, list[str]]] | None, str | None]] = [
    ("selfloop.bad.test", {}, None, "4.4.3"),
    ("loopa.bad.test", {}, None, "4.4.3"),
    ("mxloop.bad.test", {}, None, "4.4.3"),
    ("long0.bad.test", {}, None, "4.4.3"),
    ("evil.bad.test", {}, None, "4.4.3"),
    ("mxip4.bad.test", {}, [("127.0.0.42", ["127.0.0.42"])], None),
    ("mxip6.bad.test", {}, [("::1", ["::1"])], None),
    ("mxbracket.bad.test", {}, [("[127.0.0.43]", ["127.0.0.43"])], None),
    ("mxip6.bad.test", {"ip_version": "ipv4"}, None, "4.4.4"),
    (
        "mxipmixed.bad.test",
        {},
        [("127.0.0.44", ["127.0.0.44"]), ("good.bad.test", ["127.0.0.45"])],
        None,
    ),
    ("mxnul.bad.test", {}, None, "4.4.4"),
    ("mxempty.bad.test", {}, [("good.bad.test", ["127.0.0.45"])], None),
    ("hugenone.bad.test", {}, None, "4.4.4"),
]


@pytest.mark.parametrize(("domain", "transport", "hosts", "error"), DNS_CASES)
async def test_hostile_dns_answers(
    bad_dns: DnsServer,
    domain: str,
    transport: dict[str, Any],
    hosts: list[tuple[str, list[str]]] | None,
    error: str | None,
) -> None:
    """Loops and junk defer (never bounce, never hang); an MX naming an IP address is used."""
    CASES["dns table"] += 1
    started = time.monotonic()
    result = await _resolve(bad_dns, domain, **transport)
    assert time.monotonic() - started < 20
    if error is None:
        assert result.error is None, result.error
        assert [(h.name, h.addresses) for h in result.hosts] == hosts
        return
    assert result.error is not None, result.hosts
    assert result.error.enhanced == error, result.error
    assert not result.error.permanent
    assert domain in result.error.text, result.error.text
    assert not _CONTROL.search(result.error.text)


async def test_huge_mx_set_is_capped_and_asks_only_what_it_uses(bad_dns: DnsServer) -> None:
    """1000 MX records (TCP-sized answer): five hosts, in preference order, five lookups."""
    CASES["dns table"] += 1
    asked = len(bad_dns.queries)
    result = await _resolve(bad_dns, "huge.bad.test", ip_version="ipv4")
    assert result.error is None
    assert len(result.hosts) == 5
    assert [h.preference for h in result.hosts] == [0, 0, 0, 0, 0]
    assert any("not tried" in note for note in result.notes)
    lookups = [q for q in bad_dns.queries[asked:] if q.rdtype in ("A", "AAAA")]
    assert len(lookups) == 5
    assert any(q.transport == "tcp" for q in bad_dns.queries[asked:])

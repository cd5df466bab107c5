"""The resolve activity against a real DNS server on loopback, configured with `query=`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from temporalio.testing import ActivityEnvironment

from activities.resolve import ResolveActivities
from postflow.config import parse_config
from postflow.models import ResolveRequest, ResolveResult
from tests.dnsserver import DnsServer, Fault

ZONE = """
pref        MX 30 mx3
pref        MX 10 mx1
pref        MX 20 mx2
mx1         A 127.0.0.11
mx2         A 127.0.0.12
mx3         AAAA ::1
mx3         A 127.0.0.13
equal       MX 5 first
equal       MX 10 mx1
equal       MX 10 mx2
first       A 127.0.0.10
implicit    AAAA ::1
implicit    A 127.0.0.20
null        MX 0 .
null        A 127.0.0.30
empty       TXT "no mail here"
skip        MX 10 noaddr
skip        MX 20 mx2
noaddr      TXT "a host without addresses"
allbad      MX 10 noaddr
allbad      MX 20 gone
v6only      MX 10 mx6
mx6         AAAA ::1
alias       CNAME pref
mxalias     MX 10 mxcname
mxcname     CNAME mx1
literal     MX 10 127.0.0.40.
literal     MX 20 mx1
capped      MX 1 mx1
capped      MX 2 mx2
capped      MX 3 mx3
capped      MX 4 first
capped      MX 5 unasked
self        MX 10 mx1
self        MX 20 postflow.test.
self        MX 30 mx2
selfonly    MX 10 postflow.test.
selfonly    MX 20 mx2
"""
# Enough MX records that the answer does not fit the 512 bytes of plain UDP.
BIG = "big MX 1 mx1\nbig MX 2 mx2\n" + "".join(
    f"big MX {p} a-rather-long-host-name-for-padding-{p}.example.test.\n" for p in range(10, 40)
)
CUSTOMERS = """
example.com   MX 10 mx.provider.test.
bare.example  A 127.0.0.51
"""


@pytest.fixture
async def srv() -> AsyncIterator[DnsServer]:
    zones = {
        "example.test": ZONE + BIG,
        "customer.example.org": CUSTOMERS,
        "provider.test": "mx A 127.0.0.50\n",
        # The real example.com says something else: it must not be asked when zone= is set.
        "example.com": "@ MX 10 wrong.example.com.\nwrong A 127.0.0.99\n",
    }
    async with DnsServer(zones, hosts=["127.0.0.1", "::1"]) as server:
        yield server


def _activities(destination: str, **transport: Any) -> ResolveActivities:
    settings = {"destination": destination, "dns_timeout": 1, **transport}
    return ResolveActivities(parse_config({"transports": {"default": settings}}))


async def _resolve(target: str | ResolveActivities, domain: str, **transport: Any) -> ResolveResult:
    acts = _activities(target, **transport) if isinstance(target, str) else target
    req = ResolveRequest(transport="default", domain=domain)
    return await ActivityEnvironment().run(acts.resolve_destination, req)


def _hosts(result: ResolveResult) -> list[tuple[int, str, list[str]]]:
    assert result.error is None, result.error
    return [(h.preference, h.name, h.addresses) for h in result.hosts]


async def test_hosts_in_preference_order_with_every_address(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(port=2525), "pref.example.test")
    assert _hosts(result) == [
        (10, "mx1.example.test", ["127.0.0.11"]),
        (20, "mx2.example.test", ["127.0.0.12"]),
        (30, "mx3.example.test", ["::1", "127.0.0.13"]),
    ]
    assert {h.port for h in result.hosts} == {2525}


async def test_equal_preferences_are_shuffled_per_resolution(srv: DnsServer) -> None:
    acts = _activities(srv.destination())
    orders = set()
    for _ in range(40):
        names = [name for _, name, _ in _hosts(await _resolve(acts, "equal.example.test"))]
        assert names[0] == "first.example.test"
        orders.add(tuple(names[1:]))
    assert orders == {
        ("mx1.example.test", "mx2.example.test"),
        ("mx2.example.test", "mx1.example.test"),
    }


async def test_implicit_mx_is_the_domain_itself(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "implicit.example.test")
    assert _hosts(result) == [(0, "implicit.example.test", ["::1", "127.0.0.20"])]
    assert any("implicit MX" in n for n in result.notes)


async def test_null_mx_fails_at_once_without_address_fallback(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "null.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (True, "5.1.10")
    assert result.hosts == []
    # The domain has an A record, but RFC 7505 forbids falling back to it.
    assert srv.asked("null.example.test", "A") == []


@pytest.mark.parametrize(
    ("setting", "permanent", "enhanced"), [("bounce", True, "5.1.2"), ("defer", False, "4.1.2")]
)
async def test_nxdomain_bounces_unless_told_to_defer(
    srv: DnsServer, setting: str, permanent: bool, enhanced: str
) -> None:
    result = await _resolve(srv.destination(), "nope.example.test", nxdomain=setting)
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (permanent, enhanced)
    assert "NXDOMAIN" in result.error.text


async def test_domain_without_mx_or_address_is_permanent(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "empty.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (True, "5.1.2")
    assert "neither MX nor A/AAAA" in result.error.text


async def test_mx_target_without_addresses_is_skipped(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "skip.example.test")
    assert _hosts(result) == [(20, "mx2.example.test", ["127.0.0.12"])]
    assert any("noaddr.example.test skipped" in n for n in result.notes)


async def test_no_mx_target_with_an_address_is_temporary(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "allbad.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.4")
    assert "noaddr.example.test" in result.error.text and "gone.example.test" in result.error.text


@pytest.mark.parametrize(
    ("fault", "answer"), [(Fault.SERVFAIL, "SERVFAIL"), (Fault.REFUSED, "REFUSED")]
)
async def test_servfail_and_refused_are_temporary(
    srv: DnsServer, fault: Fault, answer: str
) -> None:
    srv.fail(fault)
    result = await _resolve(srv.destination(), "pref.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.3")
    assert f"{srv.address()} answered {answer}" in result.error.text


async def test_a_server_that_never_answers_is_a_quick_temporary_failure(srv: DnsServer) -> None:
    srv.fail(Fault.DROP)
    started = time.monotonic()
    result = await _resolve(srv.destination(), "pref.example.test", dns_timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.3")
    assert "no answer" in result.error.text
    assert 0.4 < elapsed < 2.0
    assert srv.asked("pref.example.test", "MX")


async def test_address_lookups_are_classified_like_mx_lookups(srv: DnsServer) -> None:
    # No MX, and the A query fails: temporary, never "has no address" (a bounce).
    srv.fail(Fault.SERVFAIL, "empty.example.test", "A")
    result = await _resolve(srv.destination(), "empty.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.3")
    # The only MX target's lookups fail: temporary too.
    srv.fail(Fault.SERVFAIL, "mx6.example.test")
    result = await _resolve(srv.destination(), "v6only.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.3")
    assert "SERVFAIL" in result.error.text
    # One target without addresses, the other failing: still temporary (unable to route).
    srv.fail(Fault.SERVFAIL, "mx2.example.test")
    result = await _resolve(srv.destination(), "skip.example.test")
    assert result.error is not None
    assert (result.error.permanent, result.error.enhanced) == (False, "4.4.4")
    # One target failing while another resolves: the good one is used.
    result = await _resolve(srv.destination(), "pref.example.test")
    assert [name for _, name, _ in _hosts(result)] == ["mx1.example.test", "mx3.example.test"]


async def test_next_attempt_resolves_again(srv: DnsServer) -> None:
    acts = _activities(srv.destination())
    srv.fail(Fault.SERVFAIL, times=1)
    first = await _resolve(acts, "pref.example.test")
    assert first.error is not None and not first.error.permanent
    second = await _resolve(acts, "pref.example.test")
    assert len(_hosts(second)) == 3
    assert len(srv.asked("pref.example.test", "MX")) == 2


async def test_zone_is_appended_to_the_recipient_domain_only(srv: DnsServer) -> None:
    destination = srv.destination(zone="customer.example.org")
    result = await _resolve(destination, "example.com")
    assert _hosts(result) == [(10, "mx.provider.test", ["127.0.0.50"])]
    assert srv.asked("example.com.customer.example.org", "MX")
    assert srv.asked("example.com", "MX") == []
    assert srv.asked("mx.provider.test.customer.example.org") == []


async def test_implicit_mx_with_zone_uses_the_appended_name(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(zone="customer.example.org"), "bare.example")
    assert _hosts(result) == [(0, "bare.example.customer.example.org", ["127.0.0.51"])]


async def test_query_by_host_name_is_resolved_once(
    srv: DnsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[str] = []
    real = asyncio.base_events.BaseEventLoop.getaddrinfo

    async def counting(self: asyncio.AbstractEventLoop, host: str, *args: Any, **kw: Any) -> Any:
        looked_up.append(host)
        return await real(self, host, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "getaddrinfo", counting)
    acts = _activities(f"lookup-mx:query=localhost:{srv.port}")
    for _ in range(3):
        assert len(_hosts(await _resolve(acts, "pref.example.test"))) == 3
    assert looked_up.count("localhost") == 1
    assert len(srv.asked("pref.example.test", "MX")) == 3


async def test_unresolvable_query_host_is_skipped_for_the_next(srv: DnsServer) -> None:
    destination = f"lookup-mx:query=nonexistent.invalid,{srv.address()}"
    result = await _resolve(destination, "pref.example.test")
    assert len(_hosts(result)) == 3
    assert any("nonexistent.invalid: does not resolve" in n for n in result.notes)
    alone = await _resolve("lookup-mx:query=nonexistent.invalid", "pref.example.test")
    assert alone.error is not None
    assert (alone.error.permanent, alone.error.enhanced) == (False, "4.4.3")


async def test_servers_are_tried_in_order(srv: DnsServer) -> None:
    async with DnsServer({}) as dead, DnsServer({}, hosts=["127.0.0.2"]) as broken:
        dead.fail(Fault.DROP)
        broken.fail(Fault.SERVFAIL)
        destination = f"lookup-mx:query={dead.address()},{broken.address()},{srv.address()}"
        result = await _resolve(destination, "pref.example.test", dns_timeout=1.5)
        assert len(_hosts(result)) == 3
        assert dead.asked("pref.example.test", "MX")
        assert broken.asked("pref.example.test", "MX")


async def test_dns_server_on_ipv6(srv: DnsServer) -> None:
    result = await _resolve(f"lookup-mx:query={srv.address('::1')}", "pref.example.test")
    assert len(_hosts(result)) == 3


async def test_truncated_udp_answer_is_retried_over_tcp(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "big.example.test", max_mx_hosts=2)
    assert _hosts(result) == [
        (1, "mx1.example.test", ["127.0.0.11"]),
        (2, "mx2.example.test", ["127.0.0.12"]),
    ]
    asked = srv.asked("big.example.test", "MX")
    assert [(q.transport, q.truncated) for q in asked] == [("udp", True), ("tcp", False)]


async def test_ipv6_only_host_and_ip_version(srv: DnsServer) -> None:
    assert _hosts(await _resolve(srv.destination(), "v6only.example.test")) == [
        (10, "mx6.example.test", ["::1"])
    ]
    v4 = await _resolve(srv.destination(), "v6only.example.test", ip_version="ipv4")
    assert v4.error is not None
    assert (v4.error.permanent, v4.error.enhanced) == (False, "4.4.4")
    assert "ipv4" in v4.error.text
    v6 = await _resolve(srv.destination(), "pref.example.test", ip_version="ipv6")
    assert _hosts(v6) == [(30, "mx3.example.test", ["::1"])]
    assert srv.asked("mx1.example.test", "A") == []


async def test_cname_chains_are_followed(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "alias.example.test")
    assert [name for _, name, _ in _hosts(result)] == [
        "mx1.example.test",
        "mx2.example.test",
        "mx3.example.test",
    ]
    assert _hosts(await _resolve(srv.destination(), "mxalias.example.test")) == [
        (10, "mxcname.example.test", ["127.0.0.11"])
    ]


async def test_mx_naming_an_ip_address_is_used_and_noted(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "literal.example.test")
    assert _hosts(result) == [
        (10, "127.0.0.40", ["127.0.0.40"]),
        (20, "mx1.example.test", ["127.0.0.11"]),
    ]
    assert any("is an IP address, not a host name" in n for n in result.notes)


async def test_max_mx_hosts_caps_hosts_and_lookups(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(), "capped.example.test", max_mx_hosts=3)
    assert [p for p, _, _ in _hosts(result)] == [1, 2, 3]
    assert srv.asked("first.example.test") == []
    assert srv.asked("unasked.example.test") == []


async def test_server_destination_resolves_names_and_filters_families() -> None:
    result = await _resolve("server:localhost:2526,[::1]:2527,127.0.0.9", "any.test")
    assert [(h.name, h.addresses, h.port) for h in result.hosts] == [
        ("localhost", ["127.0.0.1"], 2526),
        ("::1", ["::1"], 2527),
        ("127.0.0.9", ["127.0.0.9"], 25),
    ]
    v4 = await _resolve("server:[::1]:2527,127.0.0.9", "any.test", ip_version="ipv4")
    assert [h.name for h in v4.hosts] == ["127.0.0.9"]
    missing = await _resolve("server:nonexistent.invalid", "any.test")
    assert missing.error is not None
    assert (missing.error.permanent, missing.error.enhanced) == (False, "4.4.4")


async def test_address_literal_domain_needs_no_lookup(srv: DnsServer) -> None:
    result = await _resolve(srv.destination(port=2525), "[127.0.0.1]")
    assert [(h.name, h.addresses, h.port) for h in result.hosts] == [
        ("127.0.0.1", ["127.0.0.1"], 2525)
    ]
    assert srv.queries == []


async def test_we_are_one_of_the_mx_hosts(srv: DnsServer) -> None:
    """RFC 5321 §5.1: our own preference and every worse one are discarded; with nothing
    better left, the mail would loop back to us: a permanent 5.4.6."""
    config = {
        "smtp": {"helo_name": "postflow.test"},
        "transports": {"default": {"destination": srv.destination(), "dns_timeout": 1}},
    }
    acts = ResolveActivities(parse_config(config))
    better = await _resolve(acts, "self.example.test")
    assert _hosts(better) == [(10, "mx1.example.test", ["127.0.0.11"])]
    assert any("we are its MX at preference 20" in n for n in better.notes)
    looped = await _resolve(acts, "selfonly.example.test")
    assert looped.error is not None
    assert (looped.error.permanent, looped.error.enhanced) == (True, "5.4.6")
    assert "loops back to myself" in looped.error.text
    # Another name of ours counts too; a transport that is not us keeps every MX.
    config["smtp"]["my_hostnames"] = ["mx1.example.test"]
    mx1_is_us = await _resolve(ResolveActivities(parse_config(config)), "pref.example.test")
    assert mx1_is_us.error is not None and mx1_is_us.error.enhanced == "5.4.6"
    elsewhere = await _resolve(srv.destination(), "self.example.test")
    assert [name for _, name, _ in _hosts(elsewhere)] == ["mx1.example.test", "mx2.example.test"]
    assert not any("we are its MX" in n for n in elsewhere.notes)

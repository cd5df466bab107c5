"""postflow.mx: MX order, null MX and the meaning of DNS outcomes, without any DNS."""

from __future__ import annotations

import random
from collections import Counter
from itertools import permutations

import dns.message
import dns.resolver
import pytest

from postflow.mx import (
    DnsOutcome,
    classify,
    describe_failure,
    dns_error,
    filter_family,
    ip_literal,
    is_null_mx,
    no_address_error,
    null_mx_error,
    order_mx,
    unroutable_error,
)


def test_lower_preference_first_whatever_the_answer_order() -> None:
    records = [(30, "c"), (10, "a"), (20, "b"), (0, "z")]
    assert order_mx(records, random.Random(1)) == [(0, "z"), (10, "a"), (20, "b"), (30, "c")]


def test_seeded_shuffle_is_reproducible_and_keeps_tiers_apart() -> None:
    records = [(10, "a"), (10, "b"), (10, "c"), (20, "d"), (20, "e"), (5, "f")]
    first = order_mx(records, random.Random(42))
    assert first == order_mx(records, random.Random(42))
    assert first[0] == (5, "f")
    assert {n for _, n in first[1:4]} == {"a", "b", "c"}
    assert {n for _, n in first[4:]} == {"d", "e"}
    seen = {tuple(order_mx(records, random.Random(seed))) for seed in range(50)}
    assert len(seen) > 1


def test_equal_preferences_come_in_every_order_about_equally_often() -> None:
    """RFC 5321 §5.1 "MUST randomize": each of the 6 orders of 3 hosts about 1/6 of the time."""
    rng = random.Random(2024)
    records = [(10, "a"), (10, "b"), (10, "c"), (20, "last")]
    runs = 6000
    counts = Counter(tuple(n for _, n in order_mx(records, rng)[:3]) for _ in range(runs))
    assert set(counts) == set(permutations("abc"))
    # Chi-square with 5 degrees of freedom; 20.5 is the 0.1 % critical value.
    expected = runs / 6
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 20.5, counts
    firsts = Counter(order_mx(records, rng)[0][1] for _ in range(runs))
    assert all(abs(firsts[n] - runs / 3) < runs * 0.05 for n in "abc"), firsts


def test_unseeded_order_varies() -> None:
    records = [(10, "a"), (10, "b")]
    assert {tuple(order_mx(records)) for _ in range(200)} == {
        ((10, "a"), (10, "b")),
        ((10, "b"), (10, "a")),
    }


@pytest.mark.parametrize(
    ("records", "null"),
    [
        ([(0, ".")], True),
        ([(10, ".")], False),  # preference 0 is part of the definition (RFC 7505 §3)
        ([(0, "mx.example.com")], False),
        ([(0, "."), (10, "mx.example.com")], False),
        ([], False),
    ],
)
def test_null_mx(records: list[tuple[int, str]], null: bool) -> None:
    assert is_null_mx(records) is null


@pytest.mark.parametrize(
    ("name", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1.", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("mx1.example.com", None),
        ("192.0.2", None),
    ],
)
def test_ip_literal(name: str, address: str | None) -> None:
    assert ip_literal(name) == address


def test_filter_family_keeps_order() -> None:
    addresses = ["::1", "127.0.0.2", "2001:db8::2", "127.0.0.3"]
    assert filter_family(addresses, "any") == addresses
    assert filter_family(addresses, "ipv4") == ["127.0.0.2", "127.0.0.3"]
    assert filter_family(addresses, "ipv6") == ["::1", "2001:db8::2"]


def _errors(*answers: str) -> list[tuple]:
    return [(f"Do53:127.0.0.{i}@53", False, 53, a, None) for i, a in enumerate(answers, 1)]


def test_classify_maps_dnspython_errors_one_to_one() -> None:
    request = dns.message.make_query("example.com", "MX")
    assert classify(dns.resolver.NXDOMAIN()) == DnsOutcome.NXDOMAIN
    assert classify(dns.resolver.NoAnswer()) == DnsOutcome.NODATA
    servfail = dns.resolver.NoNameservers(request=request, errors=_errors("SERVFAIL", "REFUSED"))
    assert classify(servfail) == DnsOutcome.TEMPORARY
    timeout = dns.resolver.LifetimeTimeout(timeout=2.0, errors=_errors("Timeout"))
    assert classify(timeout) == DnsOutcome.TEMPORARY
    assert classify(dns.exception.FormError()) == DnsOutcome.TEMPORARY


def test_describe_failure_names_servers_and_answers() -> None:
    request = dns.message.make_query("example.com", "MX")
    errors = [*_errors("SERVFAIL", "REFUSED"), ("Do53:::1@5353", True, 5353, "SERVFAIL", None)]
    text = describe_failure(dns.resolver.NoNameservers(request=request, errors=errors))
    assert text == (
        "127.0.0.1:53 answered SERVFAIL; 127.0.0.2:53 answered REFUSED; "
        "[::1]:5353 answered SERVFAIL"
    )
    timeout = dns.resolver.LifetimeTimeout(timeout=2.04, errors=_errors("Timeout"))
    assert describe_failure(timeout) == "no answer from 127.0.0.1:53 after 2.0 s"


def test_dns_errors_temporary_or_permanent() -> None:
    bounce = dns_error(DnsOutcome.NXDOMAIN, "nope.test MX", "", "bounce")
    assert (bounce.permanent, bounce.enhanced) == (True, "5.1.2")
    assert "does not exist" in bounce.text
    defer = dns_error(DnsOutcome.NXDOMAIN, "nope.test MX", "", "defer")
    assert (defer.permanent, defer.enhanced) == (False, "4.1.2")
    temp = dns_error(DnsOutcome.TEMPORARY, "x.test MX", "127.0.0.1:53 answered SERVFAIL", "bounce")
    assert (temp.permanent, temp.enhanced) == (False, "4.4.3")
    assert "SERVFAIL" in temp.text
    assert (null_mx_error("x.test").permanent, null_mx_error("x.test").enhanced) == (True, "5.1.10")
    assert (no_address_error("x.test").permanent, no_address_error("x.test").enhanced) == (
        True,
        "5.1.2",
    )
    unroutable = unroutable_error("x.test", ["mx1.x.test: no address records"], "ipv4")
    assert (unroutable.permanent, unroutable.enhanced) == (False, "4.4.4")
    assert "ipv4" in unroutable.text and "mx1.x.test" in unroutable.text


def test_drop_self_keeps_only_better_preferences() -> None:
    from postflow.mx import drop_self, loop_error

    records = [(10, "a.test"), (20, "me.test"), (20, "b.test"), (30, "c.test")]
    assert drop_self(records, ["ME.test."]) == ([(10, "a.test")], 20)
    assert drop_self(records, ["other.test"]) == (records, None)
    assert drop_self([(5, "me.test"), (9, "a.test")], ["me.test"]) == ([], 5)
    error = loop_error("x.test", 5)
    assert (error.permanent, error.enhanced) == (True, "5.4.6")

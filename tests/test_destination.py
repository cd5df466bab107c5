"""The destination syntax: every form the issue names, and a clear error for each mistake."""

from __future__ import annotations

import pytest

from postflow.config import ConfigError, parse_config
from postflow.destination import (
    DestinationError,
    HostPort,
    LookupMxDestination,
    ServerDestination,
    parse_destination,
)


def _hp(host: str, port: int, is_ip: bool = False) -> HostPort:
    return HostPort(host=host, port=port, is_ip=is_ip)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lookup-mx", LookupMxDestination()),
        ("lookup-mx:zone=customer.example.org", LookupMxDestination(zone="customer.example.org")),
        ("lookup-mx:zone=Customer.Example.ORG.", LookupMxDestination(zone="customer.example.org")),
        (
            "lookup-mx:query=ns1.example.org,ns2.example.org",
            LookupMxDestination(query=[_hp("ns1.example.org", 53), _hp("ns2.example.org", 53)]),
        ),
        (
            "lookup-mx:query=127.0.0.1:5353,[::1]:5353,ns1.example.org:5353,::1,192.0.2.53",
            LookupMxDestination(
                query=[
                    _hp("127.0.0.1", 5353, True),
                    _hp("::1", 5353, True),
                    _hp("ns1.example.org", 5353),
                    _hp("::1", 53, True),
                    _hp("192.0.2.53", 53, True),
                ]
            ),
        ),
        (
            "lookup-mx:zone=customer.example.org;query=ns1.example.org,ns2.example.org",
            LookupMxDestination(
                zone="customer.example.org",
                query=[_hp("ns1.example.org", 53), _hp("ns2.example.org", 53)],
            ),
        ),
        (
            "lookup-mx: port = 2525 ; query = 127.0.0.1:5353 ; zone = c.example",
            LookupMxDestination(zone="c.example", query=[_hp("127.0.0.1", 5353, True)], port=2525),
        ),
        (
            "server:mx1.example.net:25,10.0.0.7",
            ServerDestination(hosts=[_hp("mx1.example.net", 25), _hp("10.0.0.7", 25, True)]),
        ),
        ("server:[192.0.2.7]:2525", ServerDestination(hosts=[_hp("192.0.2.7", 2525, True)])),
        ("server:[2001:db8::7]", ServerDestination(hosts=[_hp("2001:db8::7", 25, True)])),
        ("server:localhost:2526", ServerDestination(hosts=[_hp("localhost", 2526)])),
    ],
)
def test_valid_destinations(text: str, expected: object) -> None:
    assert parse_destination(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lookup-mx:", "no options"),
        ("lookup-mx:zone=", "zone '' is not a DNS name"),
        ("lookup-mx:zone=bad..name", "zone 'bad..name' is not a DNS name"),
        ("lookup-mx:zone=a.example;zone=b.example", "'zone' given twice"),
        ("lookup-mx:zones=a.example", "unknown option 'zones'"),
        ("lookup-mx:zone", "'zone' is not name=value"),
        ("lookup-mx:zone=a.example;", "stray ';'"),
        ("lookup-mx:query=", "needs at least one DNS server"),
        ("lookup-mx:query=ns1.example.org,,ns2", "query=ns1.example.org,,ns2: empty host"),
        ("lookup-mx:query=[::1:53", "missing ']'"),
        ("lookup-mx:query=127.0.0.1:0", "bad port '0'"),
        ("lookup-mx:port=0", "bad port '0'"),
        ("lookup-mx:port=65536", "bad port '65536'"),
        ("lookup-mx:port=smtp", "bad port 'smtp'"),
        ("lookup-mx;zone=a.example", "expected 'server:"),
        ("server:", "needs at least one host"),
        ("server:mx1.example.net,", "empty host"),
        ("server:[192.0.2.7]x", "unexpected 'x'"),
        ("server:[mx1.example.net]", "is not an IP address"),
        ("server:bad host", "is not a host name"),
        ("smtp:mx1.example.net", "expected 'server:"),
    ],
)
def test_bad_destinations_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(DestinationError) as info:
        parse_destination(text)
    assert message in str(info.value)


def test_config_error_names_the_transport_and_the_text() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "transports": {
                    "default": {"destination": "lookup-mx"},
                    "customers": {"destination": "lookup-mx:zone=c.example;ttl=5"},
                }
            }
        )
    (line,) = info.value.problems
    assert line.startswith("transports.customers.destination:")
    assert '"lookup-mx:zone=c.example;ttl=5"' in line
    assert "unknown option 'ttl'" in line


def test_host_port_prints_back_as_written() -> None:
    query = parse_destination("lookup-mx:query=[::1]:5353,127.0.0.1,ns1.example.org:54")
    assert isinstance(query, LookupMxDestination)
    assert [str(q) for q in query.query] == ["[::1]:5353", "127.0.0.1:53", "ns1.example.org:54"]

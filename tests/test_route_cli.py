"""`postflow route ADDRESS`, run as a command against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer, Fault

POSTFLOW = str(Path(sys.executable).with_name("postflow"))

ZONE = """
good     MX 20 mx2
good     MX 10 mx1
mx1      A 127.0.0.11
mx2      AAAA ::1
mx2      A 127.0.0.12
null     MX 0 .
dead     MX 10 nowhere
"""
CUSTOMERS = "example.com MX 5 mx1.example.test.\n"


@pytest.fixture
async def srv() -> AsyncIterator[DnsServer]:
    zones = {"example.test": ZONE, "customer.example.org": CUSTOMERS}
    async with DnsServer(zones) as server:
        yield server


def _config(tmp_path: Path, srv: DnsServer) -> Path:
    path = tmp_path / "postflow.toml"
    path.write_text(
        f"""
[spool]
path = "{tmp_path / "spool"}"

[transports.default]
destination = "{srv.destination()}"
dns_timeout = 1

[transports.customers]
destination = "lookup-mx:zone=customer.example.org;query={srv.address()};port=2525"

[[routes]]
domains = ["example.com"]
transport = "customers"
""",
        encoding="utf-8",
    )
    return path


async def _route(config: Path, address: str) -> tuple[int, str, str]:
    return await _run("--config", str(config), "route", address)


async def _run(*args: str) -> tuple[int, str, str]:
    """Runs the command while this event loop keeps the DNS server answering."""
    proc = await asyncio.create_subprocess_exec(
        POSTFLOW,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_deliverable_route_lists_hosts_in_order(srv: DnsServer, tmp_path: Path) -> None:
    code, out, err = await _route(_config(tmp_path, srv), "bob@good.example.test")
    assert code == 0, err
    lines = out.splitlines()
    assert "transport    default" in lines
    assert f"destination  {srv.destination()}" in lines
    hosts = [line.split() for line in lines if line.startswith("  ")]
    assert hosts == [
        ["10", "mx1.example.test", "port", "25", "127.0.0.11"],
        ["20", "mx2.example.test", "port", "25", "[::1],", "127.0.0.12"],
    ]
    assert lines[-1] == "result       deliverable"


async def test_routed_transport_with_zone_and_port(srv: DnsServer, tmp_path: Path) -> None:
    config = str(_config(tmp_path, srv))
    code, out, err = await _run("route", "ann@example.com", "--config", config)
    assert code == 0, err
    assert "transport    customers" in out.splitlines()
    assert "      5  mx1.example.test  port 2525  127.0.0.11" in out.splitlines()
    assert srv.asked("example.com.customer.example.org", "MX")


@pytest.mark.parametrize(
    ("domain", "code", "result"),
    [
        ("null.example.test", 2, "permanent failure 5.1.10: null.example.test: null MX"),
        ("nope.example.test", 2, "permanent failure 5.1.2: nope.example.test MX: domain does not"),
        ("dead.example.test", 1, "temporary failure 4.4.4: dead.example.test: no MX host has"),
    ],
)
async def test_failures_say_what_and_whether_permanent(
    srv: DnsServer, tmp_path: Path, domain: str, code: int, result: str
) -> None:
    got, out, err = await _route(_config(tmp_path, srv), f"x@{domain}")
    assert got == code, out + err
    assert out.splitlines()[-1].startswith(f"result       {result}"), out


async def test_servfail_is_temporary(srv: DnsServer, tmp_path: Path) -> None:
    srv.fail(Fault.SERVFAIL)
    code, out, _ = await _route(_config(tmp_path, srv), "x@good.example.test")
    assert code == 1
    assert out.splitlines()[-1] == (
        f"result       temporary failure 4.4.3: good.example.test MX: DNS failure: "
        f"{srv.address()} answered SERVFAIL"
    )


async def test_not_an_address(srv: DnsServer, tmp_path: Path) -> None:
    code, out, err = await _route(_config(tmp_path, srv), "nobody")
    assert code == 2
    assert "not a mail address" in err
    assert out == ""

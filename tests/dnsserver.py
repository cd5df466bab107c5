"""A real DNS server on loopback for tests: UDP and TCP, zones given as text, fault modes.

Built on dnspython's zone and message classes, in-process on asyncio. It answers like the
recursive resolver a mail server talks to: CNAME chains inside its zones are followed, names
that do not exist get NXDOMAIN (with the SOA), names outside every zone REFUSED. UDP answers
larger than the client allows are truncated (TC), so the client must retry over TCP. Faults
(SERVFAIL, REFUSED, never answer) apply to the whole server or to one name and type, for
the next N queries or until cleared. Every query is logged with the transport it came over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

__all__ = ["DnsServer", "Fault", "LoggedQuery"]

_SOA = (
    "@ 300 IN SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n"
    "@ 300 IN NS ns.{origin}.\n"
)
_MAX_CHAIN = 8


class Fault(StrEnum):
    SERVFAIL = "servfail"
    REFUSED = "refused"
    DROP = "drop"  # never answer: the client waits until its timeout


@dataclass
class LoggedQuery:
    name: str  # without the final dot, lower case
    rdtype: str
    transport: str  # "udp" or "tcp"
    truncated: bool = False
    fault: Fault | None = None


@dataclass
class _Rule:
    fault: Fault
    name: dns.name.Name | None
    rdtype: dns.rdatatype.RdataType | None
    remaining: int | None

    def matches(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> bool:
        return (self.name is None or self.name == name) and (
            self.rdtype is None or self.rdtype == rdtype
        )


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        wire = self.server.answer(data, "udp")
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


class DnsServer:
    """`DnsServer({"example.test": "@ MX 10 mx1\\nmx1 A 127.0.0.2"})`, on every host given.

    All hosts share one port (chosen by the system), so a name that resolves to several of
    them (`localhost` to 127.0.0.1 and ::1) reaches the same server.
    """

    def __init__(
        self, zones: dict[str, str] | None = None, hosts: Iterable[str] = ("127.0.0.1",)
    ) -> None:
        self.hosts = list(hosts)
        self.port = 0
        self.queries: list[LoggedQuery] = []
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._rules: list[_Rule] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        for origin, text in (zones or {}).items():
            self.set_zone(origin, text)

    # ---- data and faults --------------------------------------------------------------------

    def set_zone(self, origin: str, text: str) -> None:
        """Adds or replaces a zone; names in `text` are relative to `origin` unless dotted."""
        origin = origin.rstrip(".").lower()
        if " SOA " not in f" {text.upper()} ":
            text = _SOA.format(origin=origin) + text
        zone = dns.zone.from_text(text, origin=origin + ".", relativize=False)
        self._zones[zone.origin] = zone

    def fail(
        self,
        fault: Fault,
        name: str | None = None,
        rdtype: str | None = None,
        times: int | None = None,
    ) -> None:
        """From now on answer queries (for `name` and `rdtype` if given) with `fault`."""
        self._rules.append(
            _Rule(
                fault=fault,
                name=dns.name.from_text(name) if name else None,
                rdtype=dns.rdatatype.from_text(rdtype) if rdtype else None,
                remaining=times,
            )
        )

    def clear_faults(self) -> None:
        self._rules.clear()

    def asked(self, name: str, rdtype: str | None = None) -> list[LoggedQuery]:
        name = name.rstrip(".").lower()
        return [q for q in self.queries if q.name == name and rdtype in (None, q.rdtype)]

    # ---- addresses ----------------------------------------------------------------------------

    def address(self, host: str | None = None) -> str:
        """`127.0.0.1:PORT` or `[::1]:PORT`, as a query= entry."""
        host = host or self.hosts[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def destination(self, *, zone: str | None = None, port: int | None = None) -> str:
        """A `lookup-mx` destination that asks this server."""
        options = [f"query={self.address()}"]
        if zone:
            options.append(f"zone={zone}")
        if port:
            options.append(f"port={port}")
        return "lookup-mx:" + ";".join(options)

    # ---- answering ----------------------------------------------------------------------------

    def answer(self, data: bytes, transport: str) -> bytes | None:
        """The wire answer to one query, or None to stay silent."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name, rdtype = question.name, question.rdtype
        logged = LoggedQuery(
            name=name.to_text(omit_final_dot=True).lower(),
            rdtype=dns.rdatatype.to_text(rdtype),
            transport=transport,
        )
        self.queries.append(logged)
        response = dns.message.make_response(query)
        logged.fault = self._fault(name, rdtype)
        if logged.fault == Fault.DROP:
            return None
        if logged.fault is not None:
            response.set_rcode(
                dns.rcode.SERVFAIL if logged.fault == Fault.SERVFAIL else dns.rcode.REFUSED
            )
        else:
            self._resolve(response, name, rdtype)
        limit = 65535 if transport == "tcp" else (query.payload if query.edns >= 0 else 512)
        wire = response.to_wire(max_size=limit, prefer_truncation=True)
        logged.truncated = bool(dns.flags.Flag(int.from_bytes(wire[2:4], "big")) & dns.flags.TC)
        return wire

    def _fault(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> Fault | None:
        for rule in self._rules:
            if rule.matches(name, rdtype):
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                return rule.fault
        return None

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        best = None
        for origin, zone in self._zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def _resolve(
        self, response: dns.message.Message, name: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> None:
        zone = self._zone_for(name)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA | dns.flags.RA
        for _ in range(_MAX_CHAIN):
            node = zone.get_node(name)
            if node is None:
                exists = any(n.is_subdomain(name) for n in zone.nodes)  # empty non-terminal
                if not exists:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, zone)
                return
            rdataset = node.get_rdataset(dns.rdataclass.IN, rdtype)
            if rdataset is not None:
                response.answer.append(_rrset(name, rdataset))
                return
            cname = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname is None:
                self._add_soa(response, zone)
                return
            response.answer.append(_rrset(name, cname))
            name = cname[0].target
            next_zone = self._zone_for(name)
            if next_zone is None:
                return  # out of our data, as a server without recursion would leave it
            zone = next_zone
        response.set_rcode(dns.rcode.SERVFAIL)  # a CNAME loop

    @staticmethod
    def _add_soa(response: dns.message.Message, zone: dns.zone.Zone) -> None:
        soa = zone.get_rdataset(zone.origin, dns.rdatatype.SOA)
        if soa is not None:
            response.authority.append(_rrset(zone.origin, soa))

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> DnsServer:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            port = 0
            try:
                for host in self.hosts:
                    udp, _ = await loop.create_datagram_endpoint(
                        lambda: _Udp(self), local_addr=(host, port)
                    )
                    self._udp.append(udp)
                    port = port or udp.get_extra_info("sockname")[1]
                    self._tcp.append(await asyncio.start_server(self._serve_tcp, host, port))
            except OSError as exc:
                # The port chosen for the first host was taken on another: try another port.
                await self.stop()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            self.port = port
            return self
        raise OSError(errno.EADDRINUSE, f"no common free port on {self.hosts}")

    async def stop(self) -> None:
        for udp in self._udp:
            udp.close()
        for server in self._tcp:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp, self._tcp = [], []

    async def __aenter__(self) -> DnsServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                wire = self.answer(await reader.readexactly(size), "tcp")
                if wire is None:
                    await reader.read()  # never answer: hold the connection until the client quits
                    return
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _rrset(name: dns.name.Name, rdataset: object) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rdataset.rdtype)  # type: ignore[attr-defined]
    rrset.update(rdataset)  # type: ignore[arg-type]
    return rrset

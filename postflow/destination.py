"""Parses a transport's `destination` string; knows the syntax only, never resolves anything.

Forms (the seed's, plus ports):
  server:host[:port][,host[:port]...]      IP literals as [192.0.2.7]:2525 or [2001:db8::7]
  lookup-mx[:option;option...]             zone=Z  query=ns1,ns2[:port]  port=N
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "DestinationError",
    "HostPort",
    "LookupMxDestination",
    "ServerDestination",
    "parse_destination",
    "parse_host_port",
]

SMTP_PORT = 25
DNS_PORT = 53

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


class DestinationError(ValueError):
    """The text of a destination is wrong; the message says which part and why."""


class HostPort(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    is_ip: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ip and ":" in self.host else self.host
        return f"{host}:{self.port}"


class ServerDestination(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["server"] = "server"
    hosts: list[HostPort]


class LookupMxDestination(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: Literal["lookup-mx"] = "lookup-mx"
    zone: str | None = None
    query: list[HostPort] = []
    port: int = SMTP_PORT


Destination = ServerDestination | LookupMxDestination


def is_hostname(name: str) -> bool:
    name = name.rstrip(".")
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _shown(text: str) -> str:
    """Text quoted into an error message: one printable line, whatever the input held."""
    return repr(text)[1:-1]


def _port(text: str, what: str) -> int:
    # isascii(): str.isdigit() also accepts other scripts' digits ('٣' would be port 3).
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise DestinationError(f"{_shown(what)}: bad port {text!r} (1..65535)")
    return int(text)


def parse_host_port(text: str, default_port: int) -> HostPort:
    """`host`, `host:port`, `[ip]`, `[ip]:port`, a bare IPv4 or a bare IPv6 address."""
    text = text.strip()
    if not text:
        raise DestinationError("empty host")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise DestinationError(f"{text!r}: missing ']'")
        literal, rest = text[1:end], text[end + 1 :]
        try:
            ip = ipaddress.ip_address(literal)
        except ValueError:
            raise DestinationError(f"{text!r}: {literal!r} is not an IP address") from None
        if rest and not rest.startswith(":"):
            raise DestinationError(f"{text!r}: unexpected {rest!r} after ']'")
        port = _port(rest[1:], text) if rest else default_port
        return HostPort(host=str(ip), port=port, is_ip=True)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        # A bare IPv6 address cannot carry a port: that needs the [..] form.
        return HostPort(host=str(ip), port=default_port, is_ip=True)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port = text, default_port
    else:
        port = _port(port_text, text)
    try:
        ipaddress.ip_address(host)
        return HostPort(host=host, port=port, is_ip=True)
    except ValueError:
        pass
    if not is_hostname(host):
        raise DestinationError(f"{text!r}: {host!r} is not a host name")
    return HostPort(host=host.rstrip(".").lower(), port=port)


def _parse_server(spec: str) -> ServerDestination:
    if not spec.strip():
        raise DestinationError("server: needs at least one host")
    try:
        hosts = [parse_host_port(part, SMTP_PORT) for part in spec.split(",")]
    except DestinationError as exc:
        raise DestinationError(f"server:{_shown(spec)}: {exc}") from None
    return ServerDestination(hosts=hosts)


def _parse_lookup_mx(spec: str) -> LookupMxDestination:
    zone: str | None = None
    query: list[HostPort] = []
    port = SMTP_PORT
    seen: set[str] = set()
    if not spec.strip():
        raise DestinationError("lookup-mx: no options after ':' (zone=, query=, port=)")
    for option in spec.split(";"):
        name, eq, value = option.partition("=")
        name, value = name.strip(), value.strip()
        if not option.strip():
            raise DestinationError(f"lookup-mx: empty option in {spec!r} (stray ';')")
        if not eq:
            raise DestinationError(f"lookup-mx option {option!r} is not name=value")
        if name in seen:
            raise DestinationError(f"lookup-mx option {name!r} given twice")
        seen.add(name)
        if name == "zone":
            if not value or not is_hostname(value):
                raise DestinationError(f"lookup-mx zone {value!r} is not a DNS name")
            zone = value.strip(".").lower()
        elif name == "query":
            if not value:
                raise DestinationError("lookup-mx query= needs at least one DNS server")
            try:
                query = [parse_host_port(part, DNS_PORT) for part in value.split(",")]
            except DestinationError as exc:
                raise DestinationError(f"lookup-mx query={_shown(value)}: {exc}") from None
        elif name == "port":
            port = _port(value, "lookup-mx port")
        else:
            raise DestinationError(f"lookup-mx: unknown option {name!r} (known: zone, query, port)")
    return LookupMxDestination(zone=zone, query=query, port=port)


def parse_destination(text: str) -> Destination:
    text = text.strip()
    if text == "lookup-mx":
        return LookupMxDestination()
    if text.startswith("lookup-mx:"):
        return _parse_lookup_mx(text.removeprefix("lookup-mx:"))
    if text.startswith("server:"):
        return _parse_server(text.removeprefix("server:"))
    raise DestinationError(
        f"{text!r}: expected 'server:host[:port],...' or 'lookup-mx[:zone=..;query=..]'"
    )

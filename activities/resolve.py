"""Finds the hosts to try for a (transport, domain): the only module that asks DNS.

Returns hosts in the order to try them, or one error that applies to the whole group,
classified temporary or permanent here and nowhere else.
"""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.exception
import dns.resolver
from temporalio import activity

from postflow.config import Config
from postflow.destination import LookupMxDestination, ServerDestination, parse_destination
from postflow.models import DeliveryError, MxHost, ResolveRequest, ResolveResult
from postflow.mx import order_mx

__all__ = ["ResolveActivities"]


class ResolveActivities:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._resolvers: dict[str, dns.asyncresolver.Resolver] = {}

    def _resolver(self, destination: LookupMxDestination | None) -> dns.asyncresolver.Resolver:
        key = ",".join(str(q) for q in destination.query) if destination else ""
        resolver = self._resolvers.get(key)
        if resolver is None:
            if destination and destination.query:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(q.host, q.port) for q in destination.query
                ]
            else:
                resolver = dns.asyncresolver.Resolver()
            resolver.lifetime = 10.0
            self._resolvers[key] = resolver
        return resolver

    @activity.defn(name="resolve_destination")
    async def resolve_destination(self, req: ResolveRequest) -> ResolveResult:
        transport = self._config.transport(req.transport)
        destination = parse_destination(transport.destination)
        if isinstance(destination, ServerDestination):
            return await self._server(destination)
        return await self._lookup_mx(destination, req.domain)

    async def _addresses(self, resolver: dns.asyncresolver.Resolver, name: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("AAAA", "A"):
            try:
                answer = await resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            found.extend(r.address for r in answer)
        return found

    async def _server(self, destination: ServerDestination) -> ResolveResult:
        hosts: list[MxHost] = []
        notes: list[str] = []
        resolver = self._resolver(None)
        for hp in destination.hosts:
            if hp.is_ip:
                hosts.append(MxHost(name=hp.host, addresses=[hp.host], port=hp.port))
                continue
            try:
                addresses = await self._addresses(resolver, hp.host)
            except dns.exception.DNSException as exc:
                notes.append(f"{hp.host}: {exc}")
                continue
            if addresses:
                hosts.append(MxHost(name=hp.host, addresses=addresses, port=hp.port))
            else:
                notes.append(f"{hp.host}: no address records")
        if not hosts:
            return ResolveResult(
                error=DeliveryError(
                    permanent=False, enhanced="4.4.4", text="; ".join(notes) or "no host"
                ),
                notes=notes,
            )
        return ResolveResult(hosts=hosts, notes=notes)

    async def _lookup_mx(self, destination: LookupMxDestination, domain: str) -> ResolveResult:
        resolver = self._resolver(destination)
        qname = f"{domain}.{destination.zone}" if destination.zone else domain
        try:
            answer = await resolver.resolve(qname, "MX", search=False)
            records = [(r.preference, r.exchange.to_text(omit_final_dot=True)) for r in answer]
        except dns.resolver.NoAnswer:
            records = [(0, qname)]
        except dns.resolver.NXDOMAIN:
            return ResolveResult(
                error=DeliveryError(
                    permanent=True, enhanced="5.1.2", text=f"{qname}: domain does not exist"
                )
            )
        except dns.exception.DNSException as exc:
            return ResolveResult(
                error=DeliveryError(permanent=False, enhanced="4.4.3", text=f"{qname}: {exc}")
            )
        hosts: list[MxHost] = []
        for preference, name in order_mx(records):
            try:
                ipaddress.ip_address(name)
                hosts.append(
                    MxHost(
                        name=name, preference=preference, addresses=[name], port=destination.port
                    )
                )
                continue
            except ValueError:
                pass
            addresses = await self._addresses(resolver, name)
            if addresses:
                hosts.append(
                    MxHost(
                        name=name, preference=preference, addresses=addresses, port=destination.port
                    )
                )
        if not hosts:
            return ResolveResult(
                error=DeliveryError(
                    permanent=False, enhanced="4.4.4", text=f"{qname}: no MX host has an address"
                )
            )
        return ResolveResult(hosts=hosts)

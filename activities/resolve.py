"""Finds the hosts to try for a (transport, domain): the only module that asks DNS.

Returns hosts in the order to try them, or one error that applies to the whole group; what
each answer means (order, null MX, temporary or permanent) is decided in `postflow.mx`.
Answers are never cached: every attempt resolves again, so DNS fixed meanwhile is seen.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from temporalio import activity

from activities.control import ScopeCache
from postflow.config import Config, TransportSettings
from postflow.destination import (
    HostPort,
    LookupMxDestination,
    ServerDestination,
    parse_destination,
)
from postflow.models import DeliveryError, MxHost, ResolveRequest, ResolveResult
from postflow.mx import (
    ROOT,
    DnsOutcome,
    classify,
    describe_failure,
    dns_error,
    drop_self,
    filter_family,
    ip_literal,
    is_null_mx,
    loop_error,
    no_address_error,
    null_mx_error,
    order_mx,
    unroutable_error,
)

__all__ = ["ResolveActivities"]

log = activity.logger

# DeliverMessage gives this local activity 60 s; a resolution never takes longer than this.
_BUDGET_SECONDS = 50.0


@dataclass
class _Addresses:
    """The address records of one name, and why some lookups gave none."""

    found: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    temporary: bool = False
    nxdomain: bool = False

    def why(self) -> str:
        if self.failures:
            return "; ".join(self.failures)
        return "does not exist (NXDOMAIN)" if self.nxdomain else "no address records"


class ResolveActivities:
    def __init__(self, config: Config, scopes: ScopeCache | None = None) -> None:
        self._config = config
        # QueueControl's paused scopes, checked before every attempt (activities.control).
        self._scopes = scopes
        # query= host names, resolved once through the system resolver (the rule).
        self._query_hosts: dict[str, list[str]] = {}
        self._system_nameservers: list[str | dns.nameserver.Nameserver] | None = None
        # The names this MTA answers to: an MX naming one of them is us (RFC 5321 §5.1).
        self._my_names = [config.smtp.helo_name, *config.smtp.my_hostnames]

    @activity.defn(name="resolve_destination")
    async def resolve_destination(self, req: ResolveRequest) -> ResolveResult:
        if self._scopes is not None:
            paused = await self._scopes.covering(req.transport, req.domain)
            if paused:
                return ResolveResult(paused_scopes=paused)
        result = await self.resolve(req.transport, req.domain)
        if result.error is not None and self._config.delivery.soft_bounce:
            # The operators' incident switch: permanent DNS failures are retried too.
            result.error = result.error.softened()
        return result

    async def resolve(self, transport_name: str, domain: str) -> ResolveResult:
        """Never raises for DNS or network trouble: a temporary error keeps the message queued."""
        transport = self._config.transport(transport_name)
        destination = parse_destination(transport.destination)
        domain = domain.strip().rstrip(".").lower()
        budget = min(_BUDGET_SECONDS, 4 * transport.dns_timeout.total_seconds() + 5)
        try:
            async with asyncio.timeout(budget):
                if isinstance(destination, ServerDestination):
                    return await self._server(destination, transport)
                return await self._lookup_mx(destination, transport, domain)
        except TimeoutError:
            error = f"{domain}: DNS resolution took longer than {budget:.0f} s"
            return ResolveResult(error=DeliveryError(permanent=False, enhanced="4.4.3", text=error))
        except Exception as exc:  # a resolver bug must defer the mail, never lose it
            log.exception("resolving %s via %s failed", domain, transport_name)
            text = f"{domain}: internal resolver error: {type(exc).__name__}: {exc}"
            return ResolveResult(error=DeliveryError(permanent=False, enhanced="4.3.0", text=text))

    # ---- lookup-mx ------------------------------------------------------------------------

    async def _lookup_mx(
        self, destination: LookupMxDestination, transport: TransportSettings, domain: str
    ) -> ResolveResult:
        literal = _address_literal(domain)
        if literal is not None:
            # RFC 5321 §5.1 / §4.1.3: an address literal names the host; nothing to look up.
            host = MxHost(name=literal, addresses=[literal], port=destination.port)
            return ResolveResult(hosts=[host])
        # The zone is appended to the recipient domain only (issue 3); MX targets are absolute.
        qname = f"{domain}.{destination.zone}" if destination.zone else domain
        try:
            dns.name.from_text(qname)
        except dns.exception.DNSException as exc:
            error = DeliveryError(
                permanent=True, enhanced="5.1.2", text=f"{qname}: not a valid domain name: {exc}"
            )
            return ResolveResult(error=error)
        notes: list[str] = []
        resolver = await self._resolver(destination, transport, notes)
        if isinstance(resolver, DeliveryError):
            return ResolveResult(error=resolver, notes=notes)
        try:
            answer = await resolver.resolve(qname, "MX", search=False)
        except dns.exception.DNSException as exc:
            outcome = classify(exc)
            if outcome == DnsOutcome.NODATA:
                return await self._implicit_mx(resolver, destination, transport, qname, notes)
            error = dns_error(outcome, f"{qname} MX", describe_failure(exc), transport.nxdomain)
            return ResolveResult(error=error, notes=notes)
        records = [
            (r.preference, r.exchange.to_text(omit_final_dot=True).lower() or ROOT) for r in answer
        ]
        if is_null_mx(records):
            return ResolveResult(error=null_mx_error(qname), notes=notes)
        if any(name == ROOT for _, name in records):
            notes.append(f"{qname}: MX '.' among other MX records ignored (RFC 7505 §3)")
            records = [r for r in records if r[1] != ROOT]
        records, own = drop_self(records, self._my_names)
        if own is not None:
            if not records:
                return ResolveResult(error=loop_error(qname, own), notes=notes)
            notes.append(f"{qname}: we are its MX at preference {own}; only better MX used")
        return await self._mx_hosts(resolver, destination, transport, qname, records, notes)

    async def _mx_hosts(
        self,
        resolver: dns.asyncresolver.Resolver,
        destination: LookupMxDestination,
        transport: TransportSettings,
        qname: str,
        records: list[tuple[int, str]],
        notes: list[str],
    ) -> ResolveResult:
        """RFC 5321 §5.1: MX order; a target without addresses is skipped, none left is 4.4.4."""
        seen: set[str] = set()
        pending = []
        for preference, name in order_mx(records):
            if name not in seen:  # the same host at two preferences: keep the better one
                seen.add(name)
                pending.append((preference, name))
        hosts: list[MxHost] = []
        skipped: list[str] = []
        all_temporary = True
        # Only as many targets as may still be needed are looked up, concurrently.
        while pending and len(hosts) < transport.max_mx_hosts:
            batch = pending[: transport.max_mx_hosts - len(hosts)]
            pending = pending[len(batch) :]
            results = await asyncio.gather(
                *(self._target(resolver, name, transport.ip_version, notes) for _, name in batch)
            )
            for (preference, name), found in zip(batch, results, strict=True):
                if found.found:
                    hosts.append(
                        MxHost(
                            name=name,
                            preference=preference,
                            addresses=found.found,
                            port=destination.port,
                        )
                    )
                    continue
                why = found.why()
                skipped.append(f"{name}: {why}")
                notes.append(f"MX {preference} {name} skipped: {why}")
                all_temporary = all_temporary and found.temporary
        if pending:
            notes.append(f"{len(pending)} more MX host(s) not tried (max_mx_hosts)")
        if hosts:
            return ResolveResult(hosts=hosts, notes=notes)
        if all_temporary:
            # Every target failed for DNS trouble, not for lack of records (MAIL-SEMANTICS §3).
            error = dns_error(DnsOutcome.TEMPORARY, f"{qname} MX hosts", "; ".join(skipped), "")
            return ResolveResult(error=error, notes=notes)
        return ResolveResult(
            error=unroutable_error(qname, skipped, transport.ip_version), notes=notes
        )

    async def _target(
        self, resolver: dns.asyncresolver.Resolver, name: str, ip_version: str, notes: list[str]
    ) -> _Addresses:
        literal = ip_literal(name)
        if literal is not None:
            note = f"MX {name} is an IP address, not a host name (RFC 5321 §5.1); used as one"
            log.warning("misconfigured DNS: %s", note)
            notes.append(note)
            found = filter_family([literal], ip_version)
            return _Addresses(found=found, failures=[] if found else [f"not {ip_version}"])
        families = {"any": ("AAAA", "A"), "ipv6": ("AAAA",), "ipv4": ("A",)}[ip_version]
        result = await _addresses(resolver, name, families)
        if result.found and result.failures:
            notes.append(f"{name}: {'; '.join(result.failures)}")
        return result

    async def _implicit_mx(
        self,
        resolver: dns.asyncresolver.Resolver,
        destination: LookupMxDestination,
        transport: TransportSettings,
        qname: str,
        notes: list[str],
    ) -> ResolveResult:
        """RFC 5321 §5.1: no MX records, so the name itself is the host, preference 0."""
        notes.append(f"{qname}: no MX records; implicit MX (RFC 5321 §5.1)")
        # Both families are asked so that "only IPv6" is told apart from "no address at all".
        result = await _addresses(resolver, qname, ("AAAA", "A"))
        usable = filter_family(result.found, transport.ip_version)
        if usable:
            if result.failures:
                notes.append(f"{qname}: {'; '.join(result.failures)}")
            host = MxHost(name=qname, preference=0, addresses=usable, port=destination.port)
            return ResolveResult(hosts=[host], notes=notes)
        if result.temporary:
            # The A/AAAA lookups get the same classification as the MX lookup.
            error = dns_error(
                DnsOutcome.TEMPORARY, f"{qname} A/AAAA", "; ".join(result.failures), ""
            )
            return ResolveResult(error=error, notes=notes)
        if result.found:
            skipped = [f"{qname}: only {', '.join(result.found)}"]
            return ResolveResult(
                error=unroutable_error(qname, skipped, transport.ip_version), notes=notes
            )
        return ResolveResult(error=no_address_error(qname), notes=notes)

    async def _resolver(
        self, destination: LookupMxDestination, transport: TransportSettings, notes: list[str]
    ) -> dns.asyncresolver.Resolver | DeliveryError:
        """A fresh resolver without a cache: answers are per attempt."""
        servers: list[str | dns.nameserver.Nameserver] = []
        if destination.query:
            unresolved: list[str] = []
            for hp in destination.query:
                addresses = await self._query_host(hp, unresolved)
                servers.extend(dns.nameserver.Do53Nameserver(a, hp.port) for a in addresses)
            notes.extend(unresolved)
            if not servers:
                text = "no DNS server of query= resolves: " + "; ".join(unresolved)
                return DeliveryError(permanent=False, enhanced="4.4.3", text=text)
        else:
            if self._system_nameservers is None:
                try:
                    self._system_nameservers = list(dns.asyncresolver.Resolver().nameservers)
                except dns.exception.DNSException as exc:
                    text = f"no system DNS configuration: {exc}"
                    return DeliveryError(permanent=False, enhanced="4.4.3", text=text)
            servers = list(self._system_nameservers)
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = servers
        resolver.cache = None
        lifetime = transport.dns_timeout.total_seconds()
        resolver.lifetime = lifetime
        # Leave time for the next server when one does not answer at all.
        resolver.timeout = min(2.0, lifetime / len(servers))
        return resolver

    async def _query_host(self, hp: HostPort, unresolved: list[str]) -> list[str]:
        if hp.is_ip:
            return [hp.host]
        cached = self._query_hosts.get(hp.host)
        if cached is not None:
            return cached
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                hp.host, hp.port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            unresolved.append(f"DNS server {hp.host}: does not resolve: {exc}")
            return []
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._query_hosts[hp.host] = addresses
        return addresses

    # ---- server: ---------------------------------------------------------------------------

    async def _server(
        self, destination: ServerDestination, transport: TransportSettings
    ) -> ResolveResult:
        """Fixed hosts in the configured order; names through the system resolver (/etc/hosts)."""
        hosts: list[MxHost] = []
        notes: list[str] = []
        family = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
        for hp in destination.hosts:
            if hp.is_ip:
                addresses = filter_family([hp.host], transport.ip_version)
                if not addresses:
                    notes.append(f"{hp.host}: not {transport.ip_version}")
            else:
                try:
                    infos = await asyncio.get_running_loop().getaddrinfo(
                        hp.host,
                        hp.port,
                        family=family[transport.ip_version],
                        type=socket.SOCK_STREAM,
                    )
                except OSError as exc:
                    notes.append(f"{hp.host}: does not resolve: {exc}")
                    continue
                addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if addresses:
                hosts.append(MxHost(name=hp.host, addresses=addresses, port=hp.port))
        if not hosts:
            error = DeliveryError(
                permanent=False, enhanced="4.4.4", text="; ".join(notes) or "no host"
            )
            return ResolveResult(error=error, notes=notes)
        return ResolveResult(hosts=hosts, notes=notes)


async def _addresses(
    resolver: dns.asyncresolver.Resolver, name: str, families: tuple[str, ...]
) -> _Addresses:
    """AAAA and A records of `name` (CNAMEs followed by the resolver), in the order given."""
    answers = await asyncio.gather(
        *(resolver.resolve(name, rdtype, search=False) for rdtype in families),
        return_exceptions=True,
    )
    result = _Addresses()
    for rdtype, answer in zip(families, answers, strict=True):
        if isinstance(answer, dns.exception.DNSException):
            outcome = classify(answer)
            if outcome == DnsOutcome.TEMPORARY:
                result.temporary = True
                result.failures.append(f"{rdtype}: DNS failure: {describe_failure(answer)}")
            result.nxdomain = result.nxdomain or outcome == DnsOutcome.NXDOMAIN
            continue
        if isinstance(answer, BaseException):
            raise answer
        # Addresses of a multihomed host are tried "in the order presented" (RFC 5321 §5.1).
        result.found.extend(r.address for r in answer)
    return result


def _address_literal(domain: str) -> str | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    text = text[5:] if text.lower().startswith("ipv6:") else text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None

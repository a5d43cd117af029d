"""Targets from DNS: A/AAAA and SRV records, re-resolved when their TTL ends.

A module of its own so that dnspython (about 2 MB of a process's memory) is
imported only by a gateway whose configuration asks for DNS discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
from collections.abc import Iterable

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import structlog

from tollway.config.upstream_schema import DnsDiscovery
from tollway.upstream.discovery import TargetsChanged, parse_host_port
from tollway.upstream.service import Target

__all__ = ["DnsWatcher"]

log = structlog.get_logger("tollway.upstream.discovery")


# -- DNS --------------------------------------------------------------------------

# What says nothing about the records: keep the last known targets, ask again soon.
# NoNameservers covers SERVFAIL and REFUSED answers and unreachable servers (dnspython
# tries every nameserver, then gives up with it); Timeout covers silence; OSError a
# socket that could not even be opened.
_TRANSIENT: tuple[type[BaseException], ...] = (dns.exception.DNSException, OSError)
# Never ask again sooner than this, even with min_ttl 0 and records of TTL 0: a
# zero-TTL zone must not turn the watcher into a busy loop against the resolver.
_MIN_DELAY = 0.05


class _NoRecords:
    """An authoritative "nothing here" (NXDOMAIN) with its negative-caching TTL."""

    __slots__ = ("ttl",)

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl


def _nameserver(spec: str) -> dns.nameserver.Nameserver:
    """ "127.0.0.1:5353", "[::1]:53" or a bare address (port 53)."""
    text = spec.strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        host, port = parse_host_port(text)
    else:
        host, port = text, 53
    try:
        ipaddress.ip_address(host)
    except ValueError:
        # dnspython only talks to addresses; a name would need a resolver to find it.
        raise ValueError(f"nameserver {spec!r}: must be an IP address (with a port)") from None
    return dns.nameserver.Do53Nameserver(host, port)


def _sorted_unique(targets: Iterable[Target]) -> tuple[Target, ...]:
    """Sorted by (host, port) so that equal sets compare equal; one target per
    address, the largest weight winning (two SRV records naming one host:port)."""
    by_key: dict[str, Target] = {}
    for t in targets:
        old = by_key.get(t.key)
        if old is None or t.weight > old.weight:
            by_key[t.key] = t
    return tuple(sorted(by_key.values(), key=lambda t: (t.host, t.port)))


class DnsWatcher:
    """One service's targets from DNS, re-resolved when the records' TTL ends.

    A/AAAA (`config.name`): both families are asked, their addresses joined, each
    on `config.port` with `config.weight`. SRV (`config.srv`): the records of the
    lowest priority only (RFC 2782: higher priorities are fallbacks, which the
    gateway's own health checks and retries already cover), each on its own port
    with weight max(srv weight, 1); targets' addresses come from the answer's
    additional section when the server sent them, else from their own queries.

    Failures that say nothing about the records (timeouts, SERVFAIL, no reachable
    nameserver) keep the last known targets: dropping every target because the
    resolver hiccupped would turn a DNS blip into an outage. NXDOMAIN and empty
    answers are different: they are the zone's authoritative word that the name
    has no addresses (a service scaled to zero, removed from the zone), and routing
    on to addresses the operator took away would be wrong, so they empty the set.
    """

    def __init__(
        self,
        service: str,
        config: DnsDiscovery,
        on_change: TargetsChanged,
        *,
        lifetime: float = 5.0,
    ) -> None:
        self.service = service
        self.config = config
        self.targets: tuple[Target, ...] = ()
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        query = config.srv if config.srv is not None else config.name
        assert query is not None  # DnsDiscovery requires one of them
        try:
            # Absolute: a relative name would pick up the host's search domains.
            self._qname = dns.name.from_text(query)
        except dns.exception.DNSException as exc:
            raise ValueError(f"{query!r} is not a DNS name: {exc}") from None
        if config.nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(s) for s in config.nameservers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            except dns.resolver.NoResolverConfiguration:
                raise ValueError(
                    "the system names no nameserver (/etc/resolv.conf): give dns.nameservers"
                ) from None
        # lifetime bounds one whole query (all servers and retries); timeout one try.
        self._resolver.lifetime = lifetime
        self._resolver.timeout = min(2.0, lifetime)
        # Caching is ours: every resolve must see the records as they are now.
        self._resolver.cache = None

    # -- one resolution --------------------------------------------------------

    async def resolve(self) -> tuple[tuple[Target, ...], float]:
        """Ask once: (sorted targets, TTL in seconds). Raises on transient failures
        (dns.exception.DNSException other than NXDOMAIN, OSError)."""
        if self.config.srv is not None:
            return await self._resolve_srv()
        assert self.config.port is not None
        addresses, ttl = await self._addresses(self._qname)
        return (
            _sorted_unique(Target(a, self.config.port, self.config.weight) for a in addresses),
            ttl,
        )

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> dns.resolver.Answer | _NoRecords:
        try:
            return await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as exc:
            return _NoRecords(_negative_ttl(exc))

    async def _addresses(
        self, qname: dns.name.Name
    ) -> tuple[list[str], float]:
        results = await asyncio.gather(
            self._query(qname, dns.rdatatype.A),
            self._query(qname, dns.rdatatype.AAAA),
            return_exceptions=True,
        )
        addresses: list[str] = []
        ttl = math.inf
        for result in results:
            if isinstance(result, BaseException):
                raise result
            if isinstance(result, _NoRecords):
                ttl = min(ttl, result.ttl)
                continue
            # The chain's minimum: CNAMEs, the records, or the SOA of a negative answer.
            ttl = min(ttl, float(result.chaining_result.minimum_ttl))
            if result.rrset is not None:
                addresses.extend(str(rd.address) for rd in result.rrset)
        return addresses, ttl

    async def _resolve_srv(self) -> tuple[tuple[Target, ...], float]:
        answer = await self._query(self._qname, dns.rdatatype.SRV)
        if isinstance(answer, _NoRecords):
            return (), answer.ttl
        ttl = float(answer.chaining_result.minimum_ttl)
        # A lone "." target means "decidedly not available here" (RFC 2782).
        records = [
            rd
            for rd in (answer.rrset or ())
            if rd.target != dns.name.root and rd.port > 0
        ]
        if not records:
            return (), ttl
        lowest = min(rd.priority for rd in records)
        chosen = [rd for rd in records if rd.priority == lowest]
        hosts = {rd.target for rd in chosen}
        looked_up = await asyncio.gather(
            *(self._srv_target_addresses(answer.response, h) for h in hosts)
        )
        addresses = dict(zip(hosts, looked_up, strict=True))
        targets: list[Target] = []
        for rd in chosen:
            found, host_ttl = addresses[rd.target]
            ttl = min(ttl, host_ttl)
            targets.extend(Target(a, rd.port, max(rd.weight, 1)) for a in found)
        return _sorted_unique(targets), ttl

    async def _srv_target_addresses(
        self, response: dns.message.Message, host: dns.name.Name
    ) -> tuple[list[str], float]:
        glue: list[dns.rrset.RRset] = []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            with contextlib.suppress(KeyError):
                glue.append(
                    response.find_rrset(response.additional, host, dns.rdataclass.IN, rdtype)
                )
        if glue:
            return (
                [str(rd.address) for rrset in glue for rd in rrset],
                float(min(rrset.ttl for rrset in glue)),
            )
        return await self._addresses(host)

    # -- the background task ---------------------------------------------------

    def start(self) -> None:
        """Resolve now, then each time the TTL ends; needs a running event loop."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"dns-watcher:{self.service}"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _delay(self, ttl: float) -> float:
        bounded = min(max(ttl, self.config.min_ttl), self.config.max_ttl)
        return max(bounded, _MIN_DELAY)

    async def _run(self) -> None:
        first = True
        failing = False
        while True:
            try:
                targets, ttl = await self.resolve()
            except _TRANSIENT as exc:
                if not failing:
                    failing = True
                    log.warning(
                        "dns_resolve_failed",
                        service=self.service,
                        query=str(self._qname),
                        error=str(exc) or type(exc).__name__,
                        kept_targets=len(self.targets),
                    )
                delay = max(self.config.min_ttl, _MIN_DELAY)
            else:
                if failing:
                    failing = False
                    log.info("dns_resolve_recovered", service=self.service,
                             query=str(self._qname))
                if first or targets != self.targets:
                    first = False
                    self.targets = targets
                    self._notify(targets)
                delay = self._delay(ttl)
            await asyncio.sleep(delay)

    def _notify(self, targets: tuple[Target, ...]) -> None:
        try:
            self._on_change(self.service, targets)
        # Boundary: the consumer's callback. Its bug must not stop discovery for
        # good; the next change is reported again.
        except Exception:
            log.exception("targets_changed_callback_failed", service=self.service)


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> float:
    """RFC 2308: how long the zone says the name's absence holds (SOA-based)."""
    ttls: list[float] = []
    # exc.responses() is the same dict, but untyped.
    responses: dict[dns.name.Name, dns.message.QueryMessage] = exc.kwargs.get("responses", {})
    for response in responses.values():
        with contextlib.suppress(dns.exception.DNSException, AttributeError):
            ttls.append(float(response.resolve_chaining().minimum_ttl))
    return min(ttls, default=float(dns.message.NEGATIVE_TTL_WITHOUT_SOA))

"""ip-restriction: allow and deny CIDR lists on the client address.

Priority 3000: in DESIGN.md's access order the IP rules come right after
request-id and before CORS and authentication, so that a denied address costs no
auth lookup. (Kong runs its ip-restriction at 990, after auth, to support
per-consumer lists; here a consumer-level attachment is re-resolved by the pipeline.)

Deny wins over allow. With an allow list, an address not on it is refused; with only
a deny list, every other address passes. The address is `ctx.client_ip`, already
resolved through trusted proxies by the server. An address that does not parse
matches no network.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import RequestContext, Response
from tollway.plugins.base import Plugin, PluginConfig, register

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Verdicts are remembered per address: parsing and scanning the lists is a few
# microseconds, a dict hit is tens of nanoseconds. Bounded so a scan from many
# addresses cannot grow it without end.
_CACHE_SIZE = 8192


def _parse(entries: tuple[str, ...]) -> tuple[Network, ...]:
    # strict=False accepts "10.1.2.3/8" as 10.0.0.0/8: an operator writing a host
    # address with a prefix means the network around it.
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)


class IpRestrictionConfig(PluginConfig):
    allow: tuple[str, ...] = Field(default=(), description="CIDRs or addresses allowed")
    deny: tuple[str, ...] = Field(default=(), description="CIDRs or addresses denied (wins)")

    @field_validator("allow", "deny")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from exc
        return v

    @model_validator(mode="after")
    def _something(self) -> IpRestrictionConfig:
        if not self.allow and not self.deny:
            raise ValueError("set allow, deny, or both")
        return self


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; rules are
    # written in IPv4, so compare the IPv4 form.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@register
class IpRestriction(Plugin[IpRestrictionConfig]):
    name = "ip-restriction"
    priority = 3000
    Config = IpRestrictionConfig

    def __init__(self, config: IpRestrictionConfig) -> None:
        super().__init__(config)
        self._allow = _parse(config.allow)
        self._deny = _parse(config.deny)
        self._cache: dict[str, bool] = {}

    def allowed(self, ip: str) -> bool:
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._decide(ip)
            if len(self._cache) >= _CACHE_SIZE:
                # Evict the oldest entry (dicts keep insertion order).
                del self._cache[next(iter(self._cache))]
            self._cache[ip] = verdict
        return verdict

    def _decide(self, ip: str) -> bool:
        addr = _address(ip)
        if addr is None:
            return not self._allow
        if any(addr in net for net in self._deny):
            return False
        return not self._allow or any(addr in net for net in self._allow)

    def access(self, ctx: RequestContext) -> Response | None:
        if self.allowed(ctx.client_ip):
            return None
        details: dict[str, Any] = {"ip": ctx.client_ip}
        return Response.error("ip_forbidden", ctx.request_id, details=details)

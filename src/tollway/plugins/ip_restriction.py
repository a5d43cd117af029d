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

from typing import Any

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import RequestContext, Response
from tollway.plugins.addresses import check_networks, client_address, parse_networks
from tollway.plugins.base import Plugin, PluginConfig, register

# Verdicts are remembered per address: parsing and scanning the lists is a few
# microseconds, a dict hit is tens of nanoseconds. Bounded so a scan from many
# addresses cannot grow it without end.
_CACHE_SIZE = 8192


class IpRestrictionConfig(PluginConfig):
    allow: tuple[str, ...] = Field(default=(), description="CIDRs or addresses allowed")
    deny: tuple[str, ...] = Field(default=(), description="CIDRs or addresses denied (wins)")

    @field_validator("allow", "deny")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_networks(v)

    @model_validator(mode="after")
    def _something(self) -> IpRestrictionConfig:
        if not self.allow and not self.deny:
            raise ValueError("set allow, deny, or both")
        return self


@register
class IpRestriction(Plugin[IpRestrictionConfig]):
    name = "ip-restriction"
    priority = 3000
    Config = IpRestrictionConfig

    def __init__(self, config: IpRestrictionConfig) -> None:
        super().__init__(config)
        self._allow = parse_networks(config.allow)
        self._deny = parse_networks(config.deny)
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
        addr = client_address(ip)
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

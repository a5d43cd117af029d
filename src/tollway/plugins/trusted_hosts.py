"""trusted-hosts: refuse requests whose Host is not one this gateway serves.

Priority 3100, just above ip-restriction: a wrong Host (DNS rebinding, a scanner
hitting the IP, a forged Host used to poison links or caches) is refused before any
other work.

A Host not on the list is answered 403 `host_not_allowed` rather than 400: the
request is well-formed, the gateway just declines to serve that name.

Entries are exact host names, `*.suffix` (any subdomain at any depth of `suffix`,
but not `suffix` itself; list both if both are wanted), or `*` (anything).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from tollway.gateway.context import RequestContext, Response
from tollway.plugins.base import Plugin, PluginConfig, register


def _normalise(host: str) -> str:
    # DNS names are case-insensitive and "example.com." is the same name.
    return host.strip().lower().rstrip(".")


class TrustedHostsConfig(PluginConfig):
    hosts: tuple[str, ...] = Field(description="exact names, `*.suffix`, or `*`")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one host")
        for entry in v:
            name = _normalise(entry)
            if not name:
                raise ValueError("a host must not be empty")
            if not name.startswith("[") and name.count(":") == 1:
                # A port is never part of ctx.host, so an entry with one never matches.
                raise ValueError(f"{entry!r}: give the host name without a port")
            raw = entry.strip()
            if "*" in raw and raw != "*":
                suffix = raw[2:].rstrip(".") if raw.startswith("*.") else ""
                # "*." must not collapse into "*" (allow everything) by normalising.
                if not suffix or "*" in suffix:
                    raise ValueError(f"{entry!r}: a wildcard must be `*` or `*.suffix`")
        return v


@register
class TrustedHosts(Plugin[TrustedHostsConfig]):
    name = "trusted-hosts"
    priority = 3100
    Config = TrustedHostsConfig

    def __init__(self, config: TrustedHostsConfig) -> None:
        super().__init__(config)
        exact: set[str] = set()
        suffixes: list[str] = []
        self._any = False
        for entry in config.hosts:
            name = _normalise(entry)
            if name == "*":
                self._any = True
            elif name.startswith("*."):
                suffixes.append(name[1:])  # keep the dot: ".example.com"
            else:
                exact.add(name)
        self._exact = frozenset(exact)
        self._suffixes = tuple(suffixes)

    def allowed(self, host: str) -> bool:
        if self._any:
            return True
        if host.endswith("."):
            host = host.rstrip(".")
        if host in self._exact:
            return True
        return bool(self._suffixes) and host.endswith(self._suffixes)

    def access(self, ctx: RequestContext) -> Response | None:
        if self.allowed(ctx.host):
            return None
        details: dict[str, Any] = {"host": ctx.host}
        return Response.error("host_not_allowed", ctx.request_id, details=details)

"""The shape of tollway.yaml, in the decK style: services, routes, plugins, consumers.

These models validate structure and each field on its own. Cross-references (a
route naming an unknown service, a plugin config against its plugin's schema) are
checked when a snapshot is built (config/snapshot.py), with the same error paths.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from tollway.config.schema_base import (
    Duration,
    Model,
    Regex,
    Size,
    parse_duration,
    parse_size,
)
from tollway.config.upstream_schema import (
    Balancer,
    CircuitBreakerConfig,
    DnsDiscovery,
    HealthChecks,
    RetryConfig,
    RouteRetryConfig,
    check_hash_on,
)
from tollway.gateway.http11 import normalize_path

__all__ = ["Duration", "Regex", "Size", "parse_duration", "parse_size"]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$"
_CONSUMER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._~+@-]{0,319}$"
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)



class TargetConfig(Model):
    """One upstream address of a service, with its share of the traffic."""

    target: str = Field(description="host:port")
    weight: int = Field(default=100, ge=0, le=65535)
    tags: tuple[str, ...] = ()

    @field_validator("target")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError('must be "host:port"')
        return v


class PoolConfig(Model):
    """Keep-alive pool towards each target of a service."""

    max_idle: int = Field(default=64, ge=0, description="idle connections kept per target")
    idle_timeout: Duration = Field(default=60.0, description="close idle connections after")
    max_per_host: int = Field(
        default=0, ge=0, description="open connections per target at most (0: no bound)"
    )


class ServiceConfig(Model):
    name: str = Field(pattern=_NAME)
    # http://host:port[/path], or internal:<name> for in-process FastAPI upstreams.
    url: str | None = None
    targets: tuple[TargetConfig, ...] | None = None
    # Scheme and base path used with `targets` (with `url` they come from the url).
    protocol: Literal["http"] = "http"
    path: str = "/"
    connect_timeout: Duration = 5.0
    write_timeout: Duration = 60.0
    read_timeout: Duration = 60.0
    # From the first attempt to the response head, retries and backoff included.
    total_timeout: Duration | None = None
    pool: PoolConfig = PoolConfig()
    balancer: Balancer = "round_robin"
    # The key of consistent_hash: header:<name>, cookie:<name>, consumer or ip.
    hash_on: str | None = None
    healthchecks: HealthChecks = HealthChecks()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    retries: RetryConfig = RetryConfig()
    # Targets from DNS instead of (or before any) url/targets.
    dns: DnsDiscovery | None = None
    # Targets may register through the admin API (POST /upstreams/{name}/targets).
    registration: bool = False
    tags: tuple[str, ...] = ()

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, v: str | None) -> str | None:
        return check_hash_on(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if v.startswith("internal:"):
            if not re.match(_NAME, v.removeprefix("internal:")):
                raise ValueError("internal upstream name must be letters, digits, . _ ~ -")
            return v
        parts = urlsplit(v)
        if parts.scheme != "http":
            raise ValueError('must be an http:// URL or "internal:<name>"')
        if not parts.hostname:
            raise ValueError("must name a host")
        try:
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError as exc:
            raise ValueError("port must be a number from 1 to 65535") from exc
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError('must start with "/"')
        return v

    @model_validator(mode="after")
    def _one_destination(self) -> ServiceConfig:
        sources = (self.url is not None) + (self.targets is not None) + (self.dns is not None)
        if sources > 1:
            raise ValueError("give one of url, targets or dns")
        if sources == 0 and not self.registration:
            raise ValueError("give one of url, targets or dns (or registration: true)")
        if self.targets is not None and not self.targets:
            raise ValueError("targets must not be empty")
        if self.balancer == "consistent_hash" and self.hash_on is None:
            raise ValueError("balancer consistent_hash needs hash_on")
        if self.balancer != "consistent_hash" and self.hash_on is not None:
            raise ValueError("hash_on is only used by balancer consistent_hash")
        return self


class HeaderMatch(Model):
    """A header condition: the header equals one of `values` (case-insensitive)."""

    name: str
    values: tuple[str, ...]


class RewriteConfig(Model):
    """Rewrite the forwarded path: a regex over the path after strip_path."""

    pattern: Regex
    replacement: str


class RouteConfig(Model):
    name: str = Field(pattern=_NAME)
    service: str
    # "/a/b" prefix by whole segments; "=/a/b" exact; "/users/{id}" templates
    # ({id} is one segment); "~^/regex$" a regular expression.
    paths: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    headers: tuple[HeaderMatch, ...] = ()
    strip_path: bool = True
    preserve_host: bool = False
    rewrite: RewriteConfig | None = None
    # Break ties between routes of equal specificity: higher wins.
    priority: int = 0
    connect_timeout: Duration | None = None
    write_timeout: Duration | None = None
    read_timeout: Duration | None = None
    total_timeout: Duration | None = None
    retries: RouteRetryConfig | None = None
    tags: tuple[str, ...] = ()

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, p in enumerate(v):
            if p.startswith("~"):
                try:
                    re.compile(p[1:])
                except re.error as exc:
                    raise ValueError(f"paths[{i}]: invalid regex: {exc}") from exc
            elif not p.removeprefix("=").startswith("/"):
                raise ValueError(f'paths[{i}]: must start with "/"')
            else:
                # Requests are routed on their normalized path: a path written
                # any other way could never match.
                literal = p.removeprefix("=")
                normal = normalize_path(literal)
                if normal != literal:
                    raise ValueError(
                        f'paths[{i}]: requests are matched normalized; write "'
                        f'{p[: len(p) - len(literal)]}{normal}"'
                    )
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        upper = tuple(m.upper() for m in v)
        for i, m in enumerate(upper):
            if m not in HTTP_METHODS:
                raise ValueError(f"methods[{i}]: unknown method {m!r}")
        return upper

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, h in enumerate(v):
            bare = h.removeprefix("*.").removesuffix(".*")
            if not bare or "*" in bare or "/" in h:
                raise ValueError(
                    f"hosts[{i}]: must be a host name, *.suffix or prefix.* wildcard"
                )
            if (":" in h and not h.startswith("[")) or (h.startswith("[") and not h.endswith("]")):
                raise ValueError(f"hosts[{i}]: no port here: routes match the host name alone")
        return tuple(h.lower() for h in v)

    @model_validator(mode="after")
    def _matches_something(self) -> RouteConfig:
        if not (self.paths or self.hosts or self.methods or self.headers):
            raise ValueError("a route needs at least one of paths, hosts, methods, headers")
        return self


class ConsumerConfig(Model):
    """A consumer named in the file so that plugins can be attached to it."""

    # An email is a valid username: API-key consumers are known by their email.
    username: str = Field(pattern=_CONSUMER_NAME)
    id: str | None = None
    tags: tuple[str, ...] = ()


class PluginEntry(Model):
    name: str
    enabled: bool = True
    # At most one of these: none means global.
    service: str | None = None
    route: str | None = None
    consumer: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_scope(self) -> PluginEntry:
        if sum(x is not None for x in (self.service, self.route, self.consumer)) > 1:
            raise ValueError("attach a plugin to at most one of service, route, consumer")
        return self


def _cidr(v: str) -> str:
    try:
        ipaddress.ip_network(v, strict=False)
    except ValueError as exc:
        raise ValueError(f"not an IP address or CIDR: {v!r}") from exc
    return v


Cidr = Annotated[str, BeforeValidator(lambda v: _cidr(str(v)))]


class GatewayConfig(Model):
    format_version: str = Field(default="1", alias="_format_version")
    # Peers whose X-Forwarded-For/Forwarded we believe (and extend rather than overwrite).
    trusted_proxies: tuple[Cidr, ...] = ()
    services: tuple[ServiceConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    consumers: tuple[ConsumerConfig, ...] = ()
    plugins: tuple[PluginEntry, ...] = ()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

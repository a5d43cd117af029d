"""A service of one snapshot: where its requests go and with which timeouts.

Balancing, health and breakers are the upstreams issue; until then a service with
several targets takes them in weighted round robin order. Targets are identified
by (host, port) so that the keep-alive pools outlive config reloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from tollway.config.schema import PoolConfig, ServiceConfig


class Timeouts(NamedTuple):
    """Seconds; a route's own values win over its service's."""

    connect: float
    write: float
    read: float


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    weight: int = 100
    # Unix socket path for internal upstreams; host/port are then nominal.
    unix_path: str | None = None

    # Derived once: both are read on every request.
    key: str = field(init=False, compare=False)
    # The Host header value for this target.
    authority: bytes = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.unix_path or f"{self.host}:{self.port}")
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = "localhost" if self.unix_path else (
            host if self.port == 80 else f"{host}:{self.port}"
        )
        object.__setattr__(self, "authority", authority.encode())


@dataclass(eq=False, slots=True)
class Service:
    name: str
    config: ServiceConfig
    targets: tuple[Target, ...]
    base_path: str
    pool: PoolConfig
    connect_timeout: float
    write_timeout: float
    read_timeout: float
    _rr: list[Target] = field(default_factory=list)
    _next: int = 0

    @classmethod
    def from_config(
        cls, config: ServiceConfig, internal_sockets: dict[str, str] | None = None
    ) -> Service:
        if config.url is not None and config.url.startswith("internal:"):
            name = config.url.removeprefix("internal:")
            path = (internal_sockets or {}).get(name)
            if path is None:
                raise ValueError(f"no internal upstream named {name!r}")
            targets: tuple[Target, ...] = (Target("localhost", 0, 100, path),)
            base = "/"
        elif config.url is not None:
            parts = urlsplit(config.url)
            assert parts.hostname is not None  # schema checked it
            targets = (Target(parts.hostname, parts.port or 80),)
            base = parts.path or "/"
        else:
            assert config.targets is not None
            targets = tuple(
                Target(t.target.rpartition(":")[0].strip("[]"), int(t.target.rpartition(":")[2]),
                       t.weight)
                for t in config.targets
            )
            base = config.path
        rr: list[Target] = []
        # Interleave by weight (a coarse weighted round robin; smooth WRR and the
        # other balancers come with the upstreams issue).
        weights = [max(t.weight // 10, 0) for t in targets]
        for turn in range(max(weights, default=0)):
            rr.extend(t for t, w in zip(targets, weights, strict=True) if w > turn)
        return cls(
            name=config.name,
            config=config,
            targets=targets,
            base_path=base,
            pool=config.pool,
            connect_timeout=config.connect_timeout,
            write_timeout=config.write_timeout,
            read_timeout=config.read_timeout,
            _rr=rr or list(targets),
        )

    def timeouts(
        self, connect: float | None = None, write: float | None = None,
        read: float | None = None,
    ) -> Timeouts:
        """This service's timeouts, with any of them overridden (by a route)."""
        return Timeouts(
            self.connect_timeout if connect is None else connect,
            self.write_timeout if write is None else write,
            self.read_timeout if read is None else read,
        )

    def pick(self) -> Target:
        rr = self._rr
        target = rr[self._next % len(rr)]
        self._next += 1
        return target

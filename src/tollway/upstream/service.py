"""A service of one snapshot: its configured targets, base path and timeouts.

Which target a request goes to is its cluster's business (upstream/cluster.py: the
live state that outlives snapshots); `cluster` is bound when the snapshot is applied
to a data plane. Targets are identified by (host, port) so that the keep-alive pools
and the clusters' per-target state outlive config reloads.

A `TOLLWAY_SERVICE_<NAME>_URL` environment variable, when set, replaces the file's
url or targets (services that register through their environment, seed 001).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from tollway.config.schema import PoolConfig, ServiceConfig

if TYPE_CHECKING:
    from tollway.upstream.cluster import Cluster


class Timeouts(NamedTuple):
    """Seconds; a route's own values win over its service's."""

    connect: float
    write: float
    read: float
    # From the first attempt to the response head, retries included; None: unbounded.
    total: float | None = None


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
    # From the file (or its environment override); DNS and registrations add theirs
    # in the cluster.
    targets: tuple[Target, ...]
    base_path: str
    pool: PoolConfig
    connect_timeout: float
    write_timeout: float
    read_timeout: float
    total_timeout: float | None = None
    # True when TOLLWAY_SERVICE_<NAME>_URL gave the targets (DNS is then not used).
    from_env: bool = False
    cluster: Cluster | None = None

    @classmethod
    def from_config(
        cls,
        config: ServiceConfig,
        internal_sockets: dict[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Service:
        from tollway.upstream.discovery import env_targets, env_var_name

        targets: tuple[Target, ...] = ()
        base = config.path
        env = os.environ if environ is None else environ
        from_env = env_targets(config.name, env)
        if from_env is not None:
            targets, env_base = from_env
            # Bare host:port entries carry no path: the file's `path` stays.
            if "://" in env.get(env_var_name(config.name), ""):
                base = env_base
        elif config.url is not None and config.url.startswith("internal:"):
            name = config.url.removeprefix("internal:")
            path = (internal_sockets or {}).get(name)
            if path is None:
                raise ValueError(f"no internal upstream named {name!r}")
            targets = (Target("localhost", 0, 100, path),)
            base = "/"
        elif config.url is not None:
            parts = urlsplit(config.url)
            assert parts.hostname is not None  # schema checked it
            targets = (Target(parts.hostname, parts.port or 80),)
            base = parts.path or "/"
        elif config.targets is not None:
            targets = tuple(
                Target(t.target.rpartition(":")[0].strip("[]"), int(t.target.rpartition(":")[2]),
                       t.weight)
                for t in config.targets
            )
        return cls(
            name=config.name,
            config=config,
            targets=targets,
            base_path=base,
            pool=config.pool,
            connect_timeout=config.connect_timeout,
            write_timeout=config.write_timeout,
            read_timeout=config.read_timeout,
            total_timeout=config.total_timeout,
            from_env=from_env is not None,
        )

    def timeouts(
        self, connect: float | None = None, write: float | None = None,
        read: float | None = None, total: float | None = None,
    ) -> Timeouts:
        """This service's timeouts, with any of them overridden (by a route)."""
        return Timeouts(
            self.connect_timeout if connect is None else connect,
            self.write_timeout if write is None else write,
            self.read_timeout if read is None else read,
            self.total_timeout if total is None else total,
        )

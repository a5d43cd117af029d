"""A validated config compiled into what the data plane reads: an immutable snapshot.

Built off the hot path (at start and on reload); requests hold the snapshot they
started with, so a swap never changes a request mid-flight. Plugin instances are
made once per attachment and shared by every route they apply to; chains with the
same plugins are shared too, so 10,000 routes under one global plugin cost one
plugin and one chain.

Precedence per plugin name: consumer > route > service > global (Kong's order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollway.config.errors import ConfigError, ConfigIssue
from tollway.config.loader import check_references
from tollway.config.schema import GatewayConfig, PluginEntry
from tollway.gateway.forwarded import TrustedProxies
from tollway.gateway.pipeline import Chain
from tollway.gateway.router import Route, Router
from tollway.plugins.base import Plugin, load_builtin_plugins
from tollway.upstream.service import Service

if TYPE_CHECKING:
    from tollway.runtime import Runtime


@dataclass(frozen=True, eq=False)
class Snapshot:
    config: GatewayConfig
    generation: int
    services: dict[str, Service]
    routes: tuple[Route, ...]
    router: Router
    global_chain: Chain
    trusted_proxies: TrustedProxies
    plugins: tuple[Plugin[Any], ...]
    loaded_at: float = field(default_factory=time.time)
    source: str | None = None

    def close(self) -> None:
        """Release plugin resources once no request uses this snapshot any more."""
        for plugin in self.plugins:
            plugin.close()

    def summary(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "loaded_at": self.loaded_at,
            "source": self.source,
            "services": len(self.services),
            "routes": len(self.routes),
            "plugins": len(self.plugins),
        }


def build_snapshot(
    config: GatewayConfig,
    generation: int = 1,
    internal_sockets: dict[str, str] | None = None,
    source: str | None = None,
    runtime: Runtime | None = None,
) -> Snapshot:
    """Compile a config; raises ConfigError naming every problem found.

    A config from the loader was checked already; the same checks run again here
    (they are cheap) so that a config built in code gets the same errors.
    """
    issues = check_references(config.model_dump(mode="json", by_alias=True))
    registry = load_builtin_plugins()
    services: dict[str, Service] = {}
    for i, svc in enumerate(config.services):
        try:
            services[svc.name] = Service.from_config(svc, internal_sockets)
        except ValueError as exc:
            issues.append(ConfigIssue(f"services[{i}].url", str(exc)))
    if issues:
        raise ConfigError(issues, source)

    # One plugin instance per attachment.
    instances: list[tuple[PluginEntry, Plugin[Any]]] = []
    for i, entry in enumerate(config.plugins):
        cls = registry[entry.name]
        try:
            plugin = cls(cls.Config.model_validate(entry.config))
        except (ValueError, OSError) as exc:  # pydantic's ValidationError; files
            issues.append(ConfigIssue(f"plugins[{i}].config", str(exc)))
            continue
        if entry.enabled:
            if runtime is not None:
                try:
                    plugin.bind(runtime)
                except ValueError as exc:  # a plugin refusing this process's settings
                    issues.append(ConfigIssue(f"plugins[{i}]", str(exc)))
                    continue
            instances.append((entry, plugin))
    if issues:
        raise ConfigError(issues, source)

    scoped: dict[tuple[str, str], dict[str, Plugin[Any]]] = {}
    for entry, plugin in instances:
        if entry.route is not None:
            scope = ("route", entry.route)
        elif entry.service is not None:
            scope = ("service", entry.service)
        elif entry.consumer is not None:
            scope = ("consumer", entry.consumer)
        else:
            scope = ("global", "")
        scoped.setdefault(scope, {})[entry.name] = plugin

    chains: dict[tuple[int, ...], Chain] = {}

    def chain_of(plugins: dict[str, Plugin[Any]], consumers: dict[str, Chain]) -> Chain:
        key = tuple(sorted(id(p) for p in plugins.values()))
        if consumers:
            key += tuple(sorted(id(c) for c in consumers.values()))
        chain = chains.get(key)
        if chain is None:
            chain = chains[key] = Chain(plugins.values(), consumers)
        return chain

    global_plugins = scoped.get(("global", ""), {})
    # A plugin names its consumer by username or by id; at request time the consumer
    # is looked up by id, username and email (pipeline.consumer_keys). Both names of
    # a declared consumer lead to one merged set of plugins.
    names_of: dict[str, tuple[str, ...]] = {}
    for c in config.consumers:
        names = (c.username,) if c.id is None else (c.username, c.id)
        for name in names:
            names_of[name] = names
    consumer_scopes: dict[tuple[str, ...], dict[str, Plugin[Any]]] = {}
    for (kind, name), plugins in scoped.items():
        if kind == "consumer":
            consumer_scopes.setdefault(names_of.get(name, (name,)), {}).update(plugins)

    def with_consumers(base: dict[str, Plugin[Any]]) -> dict[str, Chain]:
        by_consumer: dict[str, Chain] = {}
        for names, plugins in consumer_scopes.items():
            chain = chain_of({**base, **plugins}, {})
            for name in names:
                by_consumer[name] = chain
        return by_consumer

    global_chain = chain_of(global_plugins, with_consumers(global_plugins))
    routes: list[Route] = []
    for i, rc in enumerate(config.routes):
        service = services[rc.service]
        merged = {
            **global_plugins,
            **scoped.get(("service", rc.service), {}),
            **scoped.get(("route", rc.name), {}),
        }
        route = Route(
            name=rc.name,
            config=rc,
            index=i,
            service=service,
            timeouts=service.timeouts(
                rc.connect_timeout, rc.write_timeout, rc.read_timeout, rc.total_timeout
            ),
        )
        route.chain = chain_of(merged, with_consumers(merged))
        routes.append(route)

    return Snapshot(
        config=config,
        generation=generation,
        services=services,
        routes=tuple(routes),
        router=Router(routes),
        global_chain=global_chain,
        trusted_proxies=TrustedProxies(config.trusted_proxies),
        plugins=tuple(p for _, p in instances),
        source=source,
    )

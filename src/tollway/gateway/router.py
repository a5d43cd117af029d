"""Routes compiled once per config snapshot, and the matcher that picks one.

Path syntax, host wildcards and the specificity order are documented in
docs/routing.md; the trie itself lives in routing_trie.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollway.config.schema import HTTP_METHODS, RouteConfig
from tollway.gateway.context import Headers
from tollway.gateway.routing_trie import (
    NO_PATH,
    Entry,
    PathPattern,
    Table,
    headers_match,
    parse_path,
)

if TYPE_CHECKING:
    from tollway.gateway.pipeline import Chain
    from tollway.upstream.service import Service, Timeouts


@dataclass(eq=False, slots=True)
class Route:
    """A route of one snapshot: its config, the service it forwards to, its plugins."""

    name: str
    config: RouteConfig
    # Declaration order in the file: the last tie-breaker, so matching is deterministic.
    index: int
    service: Service | None = None
    chain: Chain | None = None
    # Resolved when the snapshot is built: the route's own, else its service's.
    timeouts: Timeouts | None = None
    # Free for the matcher's compiled form of this route.
    compiled: Any = field(default=None)


@dataclass(slots=True)
class RouteMatch:
    route: Route
    # The path to send upstream: service base path + (path after strip_path/rewrite).
    # Raw (percent-encoding kept), without query string.
    upstream_path: str
    path_params: dict[str, str]


class Router:
    """Every route of a snapshot, compiled once into host buckets of segment tries.

    A request touches one dict lookup for its exact host, a few for wildcard hosts
    (one per dot in the host, only if wildcard routes exist), and one trie walk per
    bucket tried; it never scans the route list. Specificity order: docs/routing.md.
    """

    __slots__ = ("_any", "_cache", "_cacheable", "_exact", "_prefix_wild", "_suffix_wild")

    def __init__(self, routes: Sequence[Route]) -> None:
        exact: dict[str, list[Entry]] = {}
        suffix: dict[str, list[Entry]] = {}
        prefix: dict[str, list[Entry]] = {}
        anyhost: list[Entry] = []
        for route in routes:
            cfg = route.config
            patterns = [parse_path(p) for p in cfg.paths] or [PathPattern(NO_PATH)]
            methods = frozenset(cfg.methods) or None
            conds = tuple(
                (h.name.lower().encode(),
                 frozenset(v.strip().lower().encode() for v in h.values))
                for h in cfg.headers
            )
            rewrite = re.compile(cfg.rewrite.pattern) if cfg.rewrite else None
            route.compiled = _Compiled(rewrite, cfg.rewrite.replacement if cfg.rewrite else "")
            # Rows 5-9 of the specificity table; rows 1-4 come from which host bucket
            # and which trie node an entry sits in, so they need no per-entry key.
            entries = [
                Entry(
                    route,
                    pattern,
                    methods,
                    conds,
                    (not pattern.needs_more, methods is None, -len(conds), -cfg.priority,
                     route.index, path_index),
                )
                for path_index, pattern in enumerate(patterns)
            ]
            if not cfg.hosts:
                anyhost.extend(entries)
            for host in dict.fromkeys(cfg.hosts):
                if host.startswith("*."):
                    suffix.setdefault(host[1:], []).extend(entries)
                elif host.endswith(".*"):
                    prefix.setdefault(host[:-1], []).extend(entries)
                else:
                    exact.setdefault(host, []).extend(entries)
        self._exact = {h: Table(e) for h, e in exact.items()}
        self._suffix_wild = {h: Table(e) for h, e in suffix.items()}
        self._prefix_wild = {h: Table(e) for h, e in prefix.items()}
        self._any = Table(anyhost)
        # Most traffic repeats a few (method, host, path) triples: remember their
        # answer. Only when no route has header conditions (the answer would then
        # depend on headers too). Bounded: emptied when full, so a flood of unique
        # paths costs a rebuild now and then, never unbounded memory.
        self._cacheable = not any(route.config.headers for route in routes)
        self._cache: dict[tuple[str, str, str], RouteMatch | None] = {}

    def _tables(self, host: str) -> list[Table]:
        """The host buckets that apply to `host`, most specific first."""
        exact = self._exact.get(host)
        if not (self._suffix_wild or self._prefix_wild):
            return [self._any] if exact is None else [exact, self._any]
        wild: list[tuple[int, int, Table]] = []
        suffix, prefix = self._suffix_wild, self._prefix_wild
        dot = host.find(".")
        while dot != -1:
            # "*.example.com" needs a label before ".example.com"; "example.*"
            # needs something after "example.".
            if suffix and dot > 0 and (table := suffix.get(host[dot:])) is not None:
                wild.append((dot - len(host), 0, table))
            if (prefix and dot + 1 < len(host)
                    and (table := prefix.get(host[:dot + 1])) is not None):
                wild.append((-dot - 1, 1, table))
            dot = host.find(".", dot + 1)
        wild.sort(key=_wild_order)
        tables = [] if exact is None else [exact]
        tables.extend(t for _, _, t in wild)
        tables.append(self._any)
        return tables

    def match(
        self, method: str, host: str, path: str, headers: Headers
    ) -> RouteMatch | None:
        """The most specific route for this request, or None.

        `host` is lower-case without port; `path` is the raw path without query.
        `service_path` for upstream_path comes from `route.service.base_path`.
        The returned match may be shared between requests: do not mutate it.
        """
        if self._cacheable:
            key = (method, host, path)
            try:
                return self._cache[key]
            except KeyError:
                found = self._match(method, host, path, headers)
                cache = self._cache
                if len(cache) >= CACHE_SIZE:
                    cache.clear()
                cache[key] = found
                return found
        return self._match(method, host, path, headers)

    def _match(
        self, method: str, host: str, path: str, headers: Headers
    ) -> RouteMatch | None:
        for table in self._tables(host):
            for entry, end, found in table.candidates(path):
                if entry.accepts(method, headers):
                    return _route_match(entry, path, end, found)
        return None

    def methods_for(self, host: str, path: str, headers: Headers) -> frozenset[str]:
        """Methods that would match if the method differed (for 405 + Allow)."""
        methods: set[str] = set()
        for table in self._tables(host):
            for entry, _, _ in table.candidates(path):
                if entry.headers and not headers_match(entry.headers, headers):
                    continue
                if entry.methods is None:
                    return HTTP_METHODS
                methods |= entry.methods
        return frozenset(methods)


CACHE_SIZE = 8192


def _wild_order(item: tuple[int, int, Table]) -> tuple[int, int]:
    return item[0], item[1]


@dataclass(frozen=True, slots=True)
class _Compiled:
    rewrite: re.Pattern[str] | None
    replacement: str


def _route_match(
    entry: Entry, path: str, end: int, found: list[str] | re.Match[str] | None
) -> RouteMatch:
    route = entry.route
    if isinstance(found, list):
        params = {name: found[i] for i, name in entry.path.params}
    elif found is not None:
        params = {k: v for k, v in found.groupdict().items() if v is not None}
    else:
        params = {}
    tail = path[end:] if route.config.strip_path else path
    base = route.service.base_path if route.service is not None else "/"
    return RouteMatch(route, upstream_path(base, tail, route.compiled), params)


def upstream_path(base: str, tail: str, compiled: _Compiled) -> str:
    """Join the service base path and what is left of the request path (Kong's v0).

    `tail` is "" when strip_path consumed the whole path: the upstream then gets the
    base path untouched ("/v2"), while a tail of "/" keeps the client's trailing
    slash ("/v2/"). Otherwise exactly one slash separates base and tail.
    """
    forwarded = tail if tail.startswith("/") else "/" + tail
    if compiled.rewrite is not None:
        forwarded = compiled.rewrite.sub(compiled.replacement, forwarded, count=1)
        if not forwarded.startswith("/"):
            forwarded = "/" + forwarded
    if base == "/":
        return forwarded
    if forwarded == "/" and tail == "":
        return base
    return base.rstrip("/") + forwarded

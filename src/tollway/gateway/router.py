"""Routes compiled once per config snapshot, and the matcher that picks one.

INTERFACE (implementation pending): see the docstrings; the matcher must not scan
every route per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollway.config.schema import RouteConfig
from tollway.gateway.context import Headers

if TYPE_CHECKING:
    from tollway.gateway.pipeline import Chain
    from tollway.upstream.service import Service


@dataclass(eq=False, slots=True)
class Route:
    """A route of one snapshot: its config, the service it forwards to, its plugins."""

    name: str
    config: RouteConfig
    # Declaration order in the file: the last tie-breaker, so matching is deterministic.
    index: int
    service: Service | None = None
    chain: Chain | None = None
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
    def __init__(self, routes: Sequence[Route]) -> None:
        raise NotImplementedError

    def match(
        self, method: str, host: str, path: str, headers: Headers
    ) -> RouteMatch | None:
        """The most specific route for this request, or None.

        `host` is lower-case without port; `path` is the raw path without query.
        `service_path` for upstream_path comes from `route.service.base_path`.
        """
        raise NotImplementedError

    def methods_for(self, host: str, path: str, headers: Headers) -> frozenset[str]:
        """Methods that would match if the method differed (for 405 + Allow)."""
        raise NotImplementedError

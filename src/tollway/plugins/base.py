"""The plugin interface: a name, a priority, a pydantic config schema, phase hooks.

A plugin subclasses `Plugin`, sets `name`, `priority` and `Config`, and overrides
only the hooks it needs; the pipeline calls only overridden hooks, so an unused
phase costs nothing. Higher priority runs first in the access phase and in the
response phases (Kong's convention), so request-id (high) runs before auth and
limits, and its response header is set before the access log reads it.

Phases, in order:
- access(ctx): before the upstream is called. Return None to go on, or a
  `Response` to answer at once. May return an awaitable (Redis, database); the
  pipeline only leaves the synchronous fast path when one does. A compiled engine
  may return a `Deferred` instead (context.py): one future and a resolve() the
  data plane calls from the future's callback, with no task.
- response_headers(ctx, head): mutate the status/headers about to go to the client,
  for upstream and gateway-made responses alike (see `raw_response` for the
  plugins whose edits may skip parsing the upstream's head).
- body_filter(ctx, head): return a `BodyFilter` to rewrite the response body
  (gzip), or None. Called after response_headers. A filter makes the body length
  unknown: the server re-frames the body (chunked, or close on HTTP/1.0).
- log(ctx): after the last byte went out, off the response path. Never raise.

Plugins keep per-request state only in `ctx.vars`, keyed by their name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from tollway.gateway.context import AccessResult, RequestContext, ResponseHead

if TYPE_CHECKING:
    from tollway.runtime import Runtime


class PluginConfig(BaseModel):
    """Base of every plugin's config schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ConfigT = TypeVar("ConfigT", bound=PluginConfig)

class BodyFilter:
    """Rewrites a response body chunk by chunk."""

    def feed(self, chunk: bytes) -> bytes:
        raise NotImplementedError

    def finish(self) -> bytes:
        return b""


class Plugin(Generic[ConfigT]):
    name: ClassVar[str]
    priority: ClassVar[int]
    Config: ClassVar[type[PluginConfig]]
    # Further access hooks as (method name, priority), for a plugin that must act at
    # two points of the access phase; each is called like `access`.
    extra_access: ClassVar[tuple[tuple[str, int], ...]] = ()
    # True for a plugin whose response_headers hook is only a fast-path-friendly
    # edit that its access hook also records as data (ctx.raw_edit: drop some
    # header names, add some lines). The upstream's head may then go out as bytes,
    # without being parsed, with those edits applied; the hook still runs on
    # every head that is parsed (the gateway's own responses, other plugins).
    raw_response: ClassVar[bool] = False

    def __init__(self, config: ConfigT) -> None:
        self.config = config

    def bind(self, runtime: Runtime) -> None:
        """Receive the process's shared services (database, key cache, usage queue).

        Called once per instance when a running gateway builds a snapshot; never
        for `tollway check`, so a plugin must not need it to validate its config.
        """
        return None

    def access(self, ctx: RequestContext) -> AccessResult:
        return None

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        return None

    def body_filter(self, ctx: RequestContext, head: ResponseHead) -> BodyFilter | None:
        return None

    def log(self, ctx: RequestContext) -> None:
        return None

    def close(self) -> None:
        """Release resources when the config snapshot that built it is retired."""
        return None

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Plugin, hook)


PLUGINS: dict[str, type[Plugin[Any]]] = {}


def register(cls: type[Plugin[Any]]) -> type[Plugin[Any]]:
    """Class decorator: make a plugin known to the config loader by its name."""
    if cls.name in PLUGINS and PLUGINS[cls.name] is not cls:
        raise ValueError(f"plugin {cls.name!r} registered twice")
    PLUGINS[cls.name] = cls
    return cls


def load_builtin_plugins() -> dict[str, type[Plugin[Any]]]:
    """Import the bundled plugins so that they register; returns the registry."""
    import tollway.plugins.builtin  # noqa: F401  (the import registers them)

    return PLUGINS

"""The plugin chain of a route: hooks in priority order, run on a sync fast path.

A chain is built once per snapshot (config/snapshot.py) from the attachments that
apply to a route, the most specific attachment of each plugin winning. The access
phase stays synchronous until a hook returns an awaitable; only then does the
request continue in a coroutine, so a route whose plugins never wait pays for no
task.

Consumer attachments (Kong's "consumer > route > service > global") are known only
once an auth plugin sets `ctx.consumer`; the chain then switches to the consumer's
variant for the hooks that remain.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from tollway.gateway.context import AccessResult, Deferred, RequestContext, Response, ResponseHead
from tollway.plugins.base import BodyFilter, Plugin

log = structlog.get_logger("tollway.pipeline")

AccessHook = Callable[[RequestContext], Any]


def consumer_keys(consumer: Any) -> tuple[str, ...]:
    """The names a consumer can be attached by in the config: id and username."""
    keys: list[str] = []
    for attr in ("id", "username", "email"):
        value = getattr(consumer, attr, None)
        if value is not None:
            keys.append(str(value))
    return tuple(keys)


class FilterChain:
    """Body filters in order: each one's output is the next one's input."""

    __slots__ = ("_filters",)

    def __init__(self, filters: list[BodyFilter]) -> None:
        self._filters = filters

    def feed(self, data: bytes) -> bytes:
        for f in self._filters:
            data = f.feed(data)
            if not data:
                return b""
        return data

    def finish(self) -> bytes:
        """What the filters still hold at the end of the body, flushed through."""
        tail = b""
        for f in self._filters:
            tail = (f.feed(tail) if tail else b"") + f.finish()
        return tail


class Chain:
    __slots__ = (
        "_tails",
        "access_hooks",
        "body_filter_hooks",
        "by_consumer",
        "log_hooks",
        "plugins",
        "raw_safe",
        "response_hooks",
    )

    def __init__(
        self, plugins: Iterable[Plugin[Any]], by_consumer: dict[str, Chain] | None = None
    ) -> None:
        self.plugins: tuple[Plugin[Any], ...] = tuple(
            sorted(plugins, key=lambda p: -type(p).priority)
        )
        # (priority, hook) so that a switch to a consumer chain resumes at the
        # right place.
        hooks: list[tuple[int, AccessHook]] = [
            (type(p).priority, p.access) for p in self.plugins if type(p).overrides("access")
        ]
        # A plugin may run a second access hook at another priority (abuse-detection
        # refuses a banned IP before key-auth, and a banned consumer after it).
        hooks += [
            (priority, getattr(p, method))
            for p in self.plugins
            for method, priority in type(p).extra_access
        ]
        hooks.sort(key=lambda h: -h[0])  # stable: equal priorities keep plugin order
        self.access_hooks: tuple[tuple[int, AccessHook], ...] = tuple(hooks)
        self.response_hooks = tuple(
            p.response_headers for p in self.plugins if type(p).overrides("response_headers")
        )
        # True when every response hook belongs to a raw-safe plugin (base.Plugin
        # `raw_response`): the upstream's head may then go out as bytes, with the
        # edits those plugins recorded in the access phase.
        self.raw_safe = all(
            type(p).raw_response for p in self.plugins if type(p).overrides("response_headers")
        )
        self.body_filter_hooks = tuple(
            p.body_filter for p in self.plugins if type(p).overrides("body_filter")
        )
        self.log_hooks = tuple(p.log for p in self.plugins if type(p).overrides("log"))
        self.by_consumer: dict[str, Chain] = by_consumer or {}
        # Tails of this chain's access hooks, built on first use: ("below", priority)
        # after a consumer switch, ("at", index) to resume after an await.
        self._tails: dict[tuple[str, int], Chain] = {}

    def __len__(self) -> int:
        return len(self.plugins)

    # ---- access -----------------------------------------------------------------

    def run_access(self, ctx: RequestContext) -> AccessResult:
        """Run the access hooks. None: go on; Response: answer it; a Deferred or an
        awaitable: wait for it."""
        hooks = self.access_hooks
        for i, (priority, hook) in enumerate(hooks):
            result = hook(ctx)
            if result is None:
                if ctx.consumer is not None and self.by_consumer:
                    rest = self._consumer_tail(ctx, priority)
                    if rest is not None:
                        return rest.run_access(ctx)
                continue
            if isinstance(result, Response):
                return result
            if isinstance(result, Deferred):
                if i + 1 == len(hooks) and not self.by_consumer:
                    # Nothing runs after it: the caller waits on the future itself.
                    return result
                return self._continue_async(ctx, settle(result), priority, i + 1)
            if inspect.isawaitable(result):
                return self._continue_async(ctx, result, priority, i + 1)
            raise TypeError(f"access hook returned {type(result).__name__}")
        return None

    async def _continue_async(
        self, ctx: RequestContext, pending: Awaitable[Response | None], priority: int, start: int
    ) -> Response | None:
        result = await pending
        if result is not None:
            return result
        if ctx.consumer is not None and self.by_consumer:
            rest = self._consumer_tail(ctx, priority)
            if rest is not None:
                return await _resolve(rest.run_access(ctx))
        tail = self._tails.get(("at", start))
        if tail is None:
            hooks = self.access_hooks[start:]
            tail = self._tails[("at", start)] = Chain._with_access(hooks, self.by_consumer)
        return await _resolve(tail.run_access(ctx))

    def _consumer_tail(self, ctx: RequestContext, after_priority: int) -> Chain | None:
        """The consumer's chain, limited to the access hooks still to run."""
        for key in consumer_keys(ctx.consumer):
            chain = self.by_consumer.get(key)
            if chain is not None:
                ctx.vars["_chain"] = chain
                tail = chain._tails.get(("below", after_priority))
                if tail is None:
                    hooks = tuple((p, h) for p, h in chain.access_hooks if p < after_priority)
                    tail = chain._tails[("below", after_priority)] = Chain._with_access(hooks, {})
                return tail
        return None

    @classmethod
    def _with_access(
        cls, hooks: tuple[tuple[int, AccessHook], ...], by_consumer: dict[str, Chain]
    ) -> Chain:
        chain = cls((), by_consumer)
        chain.access_hooks = hooks
        return chain

    # ---- response ---------------------------------------------------------------

    def run_response_headers(
        self, ctx: RequestContext, head: ResponseHead
    ) -> FilterChain | None:
        """Run response-header hooks; returns the body filters this response needs."""
        for hook in self.response_hooks:
            try:
                hook(ctx, head)
            except Exception:  # a plugin bug must not break the response
                log.exception("response_headers hook failed", request_id=ctx.request_id)
        filters: list[BodyFilter] | None = None
        for make in self.body_filter_hooks:
            try:
                f = make(ctx, head)
            except Exception:
                log.exception("body_filter hook failed", request_id=ctx.request_id)
                continue
            if f is not None:
                if filters is None:
                    filters = []
                filters.append(f)
        return None if filters is None else FilterChain(filters)

    def run_log(self, ctx: RequestContext) -> None:
        for hook in self.log_hooks:
            try:
                hook(ctx)
            except Exception:  # the log phase never fails a request
                log.exception("log hook failed", request_id=ctx.request_id)

    def close(self) -> None:
        for plugin in self.plugins:
            plugin.close()


async def _resolve(value: AccessResult) -> Response | None:
    if value is None or isinstance(value, Response):
        return value
    if isinstance(value, Deferred):
        return await settle(value)
    return await value


async def settle(deferred: Deferred) -> Response | None:
    """A Deferred waited on in a coroutine (when hooks still follow it)."""
    # Waited on without raising its failure: resolve() reads that from the future.
    await asyncio.wait((deferred.future,))
    return await _resolve(deferred.resolve())


def active_chain(ctx: RequestContext, default: Chain) -> Chain:
    """The chain whose response/log hooks apply: the consumer's once switched."""
    chain = ctx.vars.get("_chain")
    return chain if chain is not None else default


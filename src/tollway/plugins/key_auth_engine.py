"""key-auth's per-request work, compiled with mypyc (the plugin is `key_auth.py`).

The plugin module keeps the pydantic schema, which mypyc cannot hold as native
classes; this module holds what runs on every request: the header scan, the warm
cache hit, the refusals and the usage event of the log phase. The plugin hands the
pipeline this engine's bound methods, so no interpreted frame runs per request.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from tollway.gateway.context import RequestContext, Response
from tollway.identity.keys import KeyLookup
from tollway.identity.resolver import KeyResolver, KeyStoreUnavailable, ResolvedKey
from tollway.usage.events import UsageEvent

if TYPE_CHECKING:
    from tollway.usage.recorder import UsageRecorder

KEY_PREFIX = b"tw_"

Headers = list[tuple[bytes, bytes]]


def take_query_param(query: bytes, name: bytes) -> tuple[bytes | None, bytes]:
    """(first value of `name`, percent-decoded; the query without any `name`)."""
    value: bytes | None = None
    kept: list[bytes] = []
    for part in query.split(b"&"):
        key, eq, val = part.partition(b"=")
        if key == name:
            if value is None and eq:
                value = unquote_to_bytes(val) if b"%" in val else val
            continue
        kept.append(part)
    return value, b"&".join(kept)


class KeyAuthEngine:
    """One key-auth configuration, compiled: `access` and `log` are the hooks."""

    def __init__(
        self,
        *,
        key_names: frozenset[bytes],
        hide: bool,
        query_name: bytes | None,
        forward_names: tuple[bytes | None, bytes | None, bytes | None],
        watch: frozenset[bytes],
        missing_challenge: Headers,
        invalid_challenge: Headers,
        log_usage: bool,
    ) -> None:
        self.resolver: KeyResolver | None = None
        self.usage: UsageRecorder | None = None
        self._key_names = key_names
        self._hide = hide
        self._query_name = query_name
        self._query_marker = query_name + b"=" if query_name else b""
        self._forward_names = forward_names
        self._forwards = any(n is not None for n in forward_names)
        # Key of this configuration's memo in each cache entry: a string, whose hash
        # is cached (a tuple's is recomputed on every lookup).
        self._forward_key = "|".join("" if n is None else n.decode("ascii") for n in forward_names)
        self._watch = watch
        self._missing_challenge = missing_challenge
        self._invalid_challenge = invalid_challenge
        self._log_usage = log_usage

    # ---- access ----------------------------------------------------------------------

    def access(self, ctx: RequestContext) -> Response | Awaitable[Response | None] | None:
        raw: bytes | None = None
        bearer: bytes | None = None
        # The exact header pairs to remove before forwarding (removed only once the
        # key is accepted): list.remove finds them by identity, in C.
        remove: Headers | None = None
        watch = self._watch
        for pair in ctx.headers:
            name = pair[0]
            if name not in watch:
                continue
            drop = True
            if name in self._key_names:
                if raw is None and pair[1]:
                    raw = pair[1]
                drop = self._hide
            elif name == b"authorization":
                value = pair[1]
                drop = False
                if value[:7].lower() == b"bearer ":
                    token = value[7:].strip()
                    if token.startswith(KEY_PREFIX):
                        if bearer is None:
                            bearer = token
                        drop = self._hide
            if drop:
                if remove is None:
                    remove = [pair]
                else:
                    remove.append(pair)
        new_query: bytes | None = None
        query_name = self._query_name
        if query_name is not None and self._query_marker in ctx.query:
            from_query, new_query = take_query_param(ctx.query, query_name)
            if raw is None and bearer is None:
                raw = from_query
        if raw is None:
            raw = bearer
        if not raw:
            return Response.error(
                "missing_api_key", ctx.request_id, headers=self._missing_challenge
            )
        resolver = self.resolver
        if resolver is None:  # never bound: not a running gateway
            return self._unavailable(ctx)
        # The warm path, inlined: KeyResolver.resolve's first branch (an entry
        # answers as it is while clock() < valid_until) and _admit's checks. Anything
        # else (a miss, a refusal, a stale entry, a scoped key) takes the general
        # path below.
        entry = resolver.cache.get(raw)
        if entry is not None and entry.error is None and entry.all_routes:
            now = resolver.clock()
            if now < entry.valid_until:
                resolver.used[entry.key_ref] = now
                self._let_through(ctx, entry, remove, new_query)
                return None
        try:
            result = resolver.resolve(raw)
        except KeyStoreUnavailable:
            return self._unavailable(ctx)
        if isinstance(result, ResolvedKey):
            return self._admit(ctx, result, remove, new_query)
        return self._admit_later(ctx, result, remove, new_query)

    async def _admit_later(
        self,
        ctx: RequestContext,
        pending: Awaitable[ResolvedKey],
        remove: Headers | None,
        new_query: bytes | None,
    ) -> Response | None:
        try:
            entry = await pending
        except KeyStoreUnavailable:
            return self._unavailable(ctx)
        return self._admit(ctx, entry, remove, new_query)

    def _admit(
        self,
        ctx: RequestContext,
        entry: ResolvedKey,
        remove: Headers | None,
        new_query: bytes | None,
    ) -> Response | None:
        error = entry.error
        if error is not None:
            if error == "invalid_api_key":
                return Response.error(error, ctx.request_id, headers=self._invalid_challenge)
            return Response.error(error, ctx.request_id)
        route = ctx.route
        if (
            not entry.all_routes
            and route is not None
            and not entry.allows(route.name, route.config.tags)
        ):
            return Response.error(
                "insufficient_scope", ctx.request_id, details={"route": route.name}
            )
        self._let_through(ctx, entry, remove, new_query)
        return None

    def _let_through(
        self,
        ctx: RequestContext,
        entry: ResolvedKey,
        remove: Headers | None,
        new_query: bytes | None,
    ) -> None:
        """Let the request through as the key's consumer: credentials out, identity in."""
        headers = ctx.headers
        if remove is not None:
            for pair in remove:
                headers.remove(pair)
        if new_query is not None:
            ctx.query = new_query
        if self._forwards:
            forward = entry.forward.get(self._forward_key)
            headers.extend(forward if forward is not None else self._forward(entry))
        ctx.consumer = entry.consumer
        ctx.credential = entry.lookup

    def _forward(self, entry: ResolvedKey) -> Headers:
        """The identity headers to forward for this entry, memoized on it."""
        forward: Headers = []
        for name, value in zip(self._forward_names, entry.header_values, strict=True):
            if name is not None:
                forward.append((name, value))
        entry.forward[self._forward_key] = forward
        return forward

    def _unavailable(self, ctx: RequestContext) -> Response:
        return Response.error(
            "auth_unavailable",
            ctx.request_id,
            "API keys cannot be checked right now; retry shortly",
            headers=[(b"retry-after", b"1")],
        )

    # ---- log -------------------------------------------------------------------------

    def log(self, ctx: RequestContext) -> None:
        credential = ctx.credential
        usage = self.usage
        # Only what this plugin authenticated: another auth plugin logs its own.
        if not isinstance(credential, KeyLookup) or usage is None or not self._log_usage:
            return
        route = ctx.route
        upstream_at = ctx.upstream_headers_at
        usage.record(
            UsageEvent(
                ctx.started_at,
                credential.consumer_id,
                credential.key_id,
                route.name if route is not None else None,
                ctx.method,
                ctx.path,
                ctx.status,
                (upstream_at - ctx.upstream_start) * 1000.0 if upstream_at else None,
                (ctx.finished_at - ctx.start) * 1000.0,
                ctx.bytes_in,
                ctx.bytes_out,
                ctx.request_id,
                ctx.client_ip,
            )
        )

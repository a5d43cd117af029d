"""key-auth: authenticate callers by API key, and log their usage.

Priority 1250, Kong's key-auth figure: after request-id, ip/host rules, CORS (so a
preflight is answered without a key), size limits, parameter-pollution and
security-headers; before request-transformer (801), so that no header a
transformer adds can be mistaken for the client's credential, and before the
limits of later issues, which need to know the consumer.

Where the key is read (each source switchable): the `key_names` headers
(X-API-Key), `Authorization: Bearer tw_...` (a Bearer token of another shape is
left alone for other auth plugins and the upstream), and the `api_key` query
parameter. Header beats Bearer beats query when several are sent. What carried
the key is removed before forwarding: always the query parameter (URLs end up in
upstream access logs), the headers unless `hide_credentials` is off.

Answers: no key 401 missing_api_key; unknown, badly formed, or a rotated-out
secret past its grace 401 invalid_api_key (both with WWW-Authenticate);
disabled or revoked key or disabled consumer 403 key_disabled; expired key 403
key_expired; a key whose scopes do not include the route (by name, or `tag:<t>`
for a route tag) 403 insufficient_scope; a key not in the cache while the
database is down 503 auth_unavailable (Retry-After).

On success it sets `ctx.consumer` (id, email, username = email) and
`ctx.credential` (the KeyLookup), and forwards X-Consumer-ID, X-Consumer-Email and
X-Key-ID (names configurable, null turns one off). Identity headers sent by the
client are always removed, forwarded or not (Kong's X-Consumer-Username,
X-Credential-Identifier and X-Anonymous-Consumer too), so an upstream can trust
them whatever the configuration.

The warm path is a header scan, one dict lookup in the resolver, one clock read
and a few attribute checks; it never awaits. The log hook turns every request
that this plugin authenticated into a UsageEvent for the usage recorder.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import RequestContext, Response
from tollway.identity.keys import KeyLookup
from tollway.identity.resolver import KeyResolver, KeyStoreUnavailable, ResolvedKey
from tollway.plugins.base import AccessResult, Plugin, PluginConfig, register
from tollway.usage.events import UsageEvent

if TYPE_CHECKING:
    from tollway.runtime import Runtime
    from tollway.usage.recorder import UsageRecorder

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9._~-]+$")

# Identity headers an upstream might trust: never let a client send them through.
SPOOFABLE = (
    "x-consumer-id",
    "x-consumer-email",
    "x-key-id",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-credential-identifier",
    "x-anonymous-consumer",
)
KEY_PREFIX = b"tw_"


def _header_name(value: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


class KeyAuthConfig(PluginConfig):
    key_names: tuple[str, ...] = Field(
        default=("X-API-Key",), description="headers the key is read from"
    )
    key_in_header: bool = Field(default=True, description="read the key_names headers")
    key_in_authorization: bool = Field(
        default=True, description="read `Authorization: Bearer tw_...`"
    )
    key_in_query: bool = Field(default=True, description="read the query_param parameter")
    query_param: str = Field(default="api_key", description="query parameter holding the key")
    hide_credentials: bool = Field(
        default=True,
        description="remove the key's header before forwarding (the query parameter "
        "is removed whatever this says)",
    )
    consumer_id_header: str | None = Field(
        default="X-Consumer-ID", description="forward the consumer id (null: do not)"
    )
    consumer_email_header: str | None = Field(
        default="X-Consumer-Email", description="forward the consumer email (null: do not)"
    )
    key_id_header: str | None = Field(
        default="X-Key-ID", description="forward the key id (null: do not)"
    )
    realm: str = Field(default="tollway", description="realm of the WWW-Authenticate challenge")
    log_usage: bool = Field(
        default=True, description="write a usage record for each authenticated request"
    )

    @field_validator("key_names")
    @classmethod
    def _key_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            _header_name(name)
            if name.lower() == "authorization":
                raise ValueError("Authorization is read through key_in_authorization")
        return v

    @field_validator("consumer_id_header", "consumer_email_header", "key_id_header")
    @classmethod
    def _forward_name(cls, v: str | None) -> str | None:
        return None if v is None else _header_name(v)

    @field_validator("query_param")
    @classmethod
    def _query_param(cls, v: str) -> str:
        if not _QUERY_NAME.match(v):
            raise ValueError("must be a plain query parameter name (letters, digits, ._~-)")
        return v

    @field_validator("realm")
    @classmethod
    def _realm(cls, v: str) -> str:
        if not v.isascii() or not v.isprintable() or '"' in v or "\\" in v:
            raise ValueError("must be printable ASCII without quotes or backslashes")
        return v

    @model_validator(mode="after")
    def _some_source(self) -> KeyAuthConfig:
        header = self.key_in_header and bool(self.key_names)
        if not (header or self.key_in_authorization or self.key_in_query):
            raise ValueError("enable at least one key source")
        forwarded = [
            n.lower()
            for n in (self.consumer_id_header, self.consumer_email_header, self.key_id_header)
            if n is not None
        ]
        if len(set(forwarded)) != len(forwarded):
            raise ValueError("the forwarded headers need distinct names")
        if set(forwarded) & {n.lower() for n in self.key_names}:
            raise ValueError("a forwarded header cannot also be a key header")
        return self


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


@register
class KeyAuth(Plugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 1250
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig) -> None:
        super().__init__(config)
        self._resolver: KeyResolver | None = None
        self._usage: UsageRecorder | None = None
        key_names = (
            frozenset(n.lower().encode() for n in config.key_names)
            if config.key_in_header
            else frozenset()
        )
        self._key_names = key_names
        self._bearer = config.key_in_authorization
        self._hide = config.hide_credentials
        forward = (config.consumer_id_header, config.consumer_email_header, config.key_id_header)
        self._forward_names = tuple(
            None if n is None else n.lower().encode("ascii") for n in forward
        )
        self._forwards = any(n is not None for n in self._forward_names)
        # Key of this configuration's memo in each cache entry: a string, whose hash
        # is cached (a tuple's is recomputed on every lookup).
        self._forward_key = "|".join(
            "" if n is None else n.decode("ascii") for n in self._forward_names
        )
        spoof = frozenset(n.encode() for n in SPOOFABLE) | frozenset(
            n for n in self._forward_names if n is not None
        )
        # Every header the scan must look at: spoofable ones (always removed), the
        # key headers and Authorization (removed when they carry the key and
        # hide_credentials is on).
        self._watch = spoof | key_names | (
            {b"authorization"} if self._bearer else frozenset()
        )
        self._query_name = config.query_param.encode() if config.key_in_query else None
        self._query_marker = self._query_name + b"=" if self._query_name else b""
        realm = config.realm.encode()
        if self._bearer:
            missing = b'Bearer realm="' + realm + b'"'
            invalid = missing + b', error="invalid_token"'
        else:
            missing = invalid = b'Key realm="' + realm + b'"'
        self._missing_challenge = [(b"www-authenticate", missing)]
        self._invalid_challenge = [(b"www-authenticate", invalid)]
        self._log_usage = config.log_usage

    def __new__(cls, config: KeyAuthConfig) -> KeyAuth:
        # The pipeline calls only the hooks a plugin's class overrides: without
        # usage logging the log phase has nothing to do, so such an instance is of
        # a subclass that has no log hook at all.
        kind = _KeyAuthWithoutUsage if cls is KeyAuth and not config.log_usage else cls
        return super().__new__(kind)

    def bind(self, runtime: Runtime) -> None:
        self._resolver = runtime.keys
        self._usage = runtime.usage

    # ---- access ----------------------------------------------------------------------

    def access(self, ctx: RequestContext) -> AccessResult:
        raw: bytes | None = None
        bearer: bytes | None = None
        # The exact header pairs to remove before forwarding (removed only once the
        # key is accepted): list.remove finds them by identity, in C, which is
        # cheaper than rebuilding the list in Python.
        remove: list[tuple[bytes, bytes]] | None = None
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
        if self._query_marker and self._query_marker in ctx.query:
            assert self._query_name is not None
            from_query, new_query = take_query_param(ctx.query, self._query_name)
            if raw is None and bearer is None:
                raw = from_query
        if raw is None:
            raw = bearer
        if not raw:
            return Response.error(
                "missing_api_key", ctx.request_id, headers=self._missing_challenge
            )
        resolver = self._resolver
        if resolver is None:  # never bound: not a running gateway
            return self._unavailable(ctx)
        # The warm path, inlined: KeyResolver.resolve's first branch (an entry
        # answers as it is while clock() < valid_until) and _admit's checks. Skipping
        # those two calls saves about a third of this plugin's cost per request.
        # Anything else (a miss, a refusal, a stale entry, a scoped key) takes the
        # general path below.
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
        if result.__class__ is ResolvedKey:
            return self._admit(ctx, result, remove, new_query)
        return self._admit_later(ctx, result, remove, new_query)  # type: ignore[arg-type]

    async def _admit_later(
        self,
        ctx: RequestContext,
        pending: Awaitable[ResolvedKey],
        remove: list[tuple[bytes, bytes]] | None,
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
        remove: list[tuple[bytes, bytes]] | None,
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
        remove: list[tuple[bytes, bytes]] | None,
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
            headers.extend(entry.forward.get(self._forward_key) or self._forward(entry))
        ctx.consumer = entry.consumer
        ctx.credential = entry.lookup

    def _forward(self, entry: ResolvedKey) -> list[tuple[bytes, bytes]]:
        """The identity headers to forward for this entry, memoized on it."""
        forward = entry.forward[self._forward_key] = [
            (name, value)
            for name, value in zip(self._forward_names, entry.header_values, strict=True)
            if name is not None
        ]
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
        usage = self._usage
        # Only what this plugin authenticated: another auth plugin logs its own.
        if credential.__class__ is not KeyLookup or usage is None or not self._log_usage:
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


class _KeyAuthWithoutUsage(KeyAuth):
    """key-auth with `log_usage: false` (not registered: KeyAuth picks it)."""

    log = Plugin.log

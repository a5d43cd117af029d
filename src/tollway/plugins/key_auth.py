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
that this plugin authenticated into a UsageEvent for the usage recorder. Both run
compiled, in `key_auth_engine.py`; this module holds the schema and builds the
engine.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import AccessResult, RequestContext
from tollway.plugins.base import Plugin, PluginConfig, register
from tollway.plugins.key_auth_engine import KEY_PREFIX, KeyAuthEngine, take_query_param

if TYPE_CHECKING:
    from tollway.runtime import Runtime

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

__all__ = ["KEY_PREFIX", "SPOOFABLE", "KeyAuth", "KeyAuthConfig", "take_query_param"]


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


@register
class KeyAuth(Plugin[KeyAuthConfig]):
    name = "key-auth"
    priority = 1250
    Config = KeyAuthConfig

    def __init__(self, config: KeyAuthConfig) -> None:
        super().__init__(config)
        key_names = (
            frozenset(n.lower().encode() for n in config.key_names)
            if config.key_in_header
            else frozenset()
        )
        bearer = config.key_in_authorization
        forward = (config.consumer_id_header, config.consumer_email_header, config.key_id_header)
        id_name, email_name, key_name = (
            None if n is None else n.lower().encode("ascii") for n in forward
        )
        forward_names = (id_name, email_name, key_name)
        spoof = frozenset(n.encode() for n in SPOOFABLE) | frozenset(
            n for n in forward_names if n is not None
        )
        realm = config.realm.encode()
        if bearer:
            missing = b'Bearer realm="' + realm + b'"'
            invalid = missing + b', error="invalid_token"'
        else:
            missing = invalid = b'Key realm="' + realm + b'"'
        self._engine = KeyAuthEngine(
            key_names=key_names,
            hide=config.hide_credentials,
            query_name=config.query_param.encode() if config.key_in_query else None,
            forward_names=forward_names,
            # Every header the scan must look at: spoofable ones (always removed), the
            # key headers and Authorization (removed when they carry the key and
            # hide_credentials is on).
            watch=spoof | key_names | ({b"authorization"} if bearer else frozenset()),
            missing_challenge=[(b"www-authenticate", missing)],
            invalid_challenge=[(b"www-authenticate", invalid)],
            log_usage=config.log_usage,
        )
        # The pipeline calls the compiled engine itself, without an interpreted frame
        # in between (the class still defines the hooks: that is what it looks for).
        self.access = self._engine.access  # type: ignore[method-assign]
        if config.log_usage:
            self.log = self._engine.log  # type: ignore[method-assign]

    def __new__(cls, config: KeyAuthConfig) -> KeyAuth:
        # The pipeline calls only the hooks a plugin's class overrides: without
        # usage logging the log phase has nothing to do, so such an instance is of
        # a subclass that has no log hook at all.
        kind = _KeyAuthWithoutUsage if cls is KeyAuth and not config.log_usage else cls
        return super().__new__(kind)

    def bind(self, runtime: Runtime) -> None:
        self._engine.resolver = runtime.keys
        self._engine.usage = runtime.usage

    def access(self, ctx: RequestContext) -> AccessResult:
        return self._engine.access(ctx)

    def log(self, ctx: RequestContext) -> None:
        self._engine.log(ctx)


class _KeyAuthWithoutUsage(KeyAuth):
    """key-auth with `log_usage: false` (not registered: KeyAuth picks it)."""

    log = Plugin.log

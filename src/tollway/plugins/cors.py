"""cors: answer preflights, add CORS headers, refuse unlisted origins on writes.

Priority 2000 (Kong's cors value): after request-id and the IP/host rules, before
size limits and authentication, so that a browser's preflight (which never carries
credentials) is answered before an auth plugin would refuse it.

`strict` is seed 000's production origin check. CORS alone only stops a browser
from *reading* a cross-origin answer; a form post or fetch with an unsafe method
still reaches the upstream and has its side effects. With `strict`, a request that
carries an Origin not on the list and an unsafe method is refused with 403
`origin_not_allowed`; safe methods pass, just without CORS headers.

`*` with `credentials: true` echoes the caller's Origin (browsers refuse `*` with
credentials), which lets every site make credentialed calls: list the origins
instead unless that is really meant.

Regex entries (prefix `~`) must match the whole origin (unlike Kong, which searches),
so `~https://.*\\.example\\.com` cannot be satisfied by `https://example.com.evil`.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from tollway.gateway.context import (
    Headers,
    RequestContext,
    Response,
    ResponseHead,
    header_add_vary,
)
from tollway.plugins.base import Plugin, PluginConfig, register

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TOKEN_LIST = re.compile(
    r"^\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:\s*,\s*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*\s*$"
)
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_ACAO = b"access-control-allow-origin"
_ACAC = b"access-control-allow-credentials"
_ACAM = b"access-control-allow-methods"
_ACAH = b"access-control-allow-headers"
_ACEH = b"access-control-expose-headers"
_ACMA = b"access-control-max-age"
_ACRM = b"access-control-request-method"
_ACRH = b"access-control-request-headers"
_VARS_KEY = "cors"


def _normalise_origin(origin: str) -> str:
    # Browsers send scheme and host lower-case and never a trailing slash; configs
    # are typed by humans, so normalise them to what will be compared.
    return origin.strip().rstrip("/").lower()


class CorsConfig(PluginConfig):
    origins: tuple[str, ...] = Field(
        default=("*",), description="exact origins, `*`, or regexes prefixed with `~`"
    )
    methods: tuple[str, ...] = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS")
    headers: tuple[str, ...] | None = Field(
        default=None,
        description="allowed request headers; unset: reflect Access-Control-Request-Headers",
    )
    exposed_headers: tuple[str, ...] = ()
    credentials: bool = False
    max_age: int | None = Field(default=None, ge=0, description="seconds a preflight is cached")
    preflight_continue: bool = Field(
        default=False, description="pass preflights to the upstream instead of answering them"
    )
    strict: bool = Field(
        default=True, description="refuse unsafe methods from origins not on the list (403)"
    )

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one origin (or `*`)")
        for entry in v:
            if entry.startswith("~"):
                try:
                    re.compile(entry[1:])
                except re.error as exc:
                    raise ValueError(f"{entry!r} is not a valid regex: {exc}") from exc
            elif not entry.strip() or any(c.isspace() for c in entry.strip()):
                raise ValueError(f"{entry!r} is not an origin (scheme://host[:port])")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for m in v:
            if not _TOKEN.match(m):
                raise ValueError(f"{m!r} is not an HTTP method")
        return tuple(m.upper() for m in v)

    @field_validator("headers", "exposed_headers")
    @classmethod
    def _header_names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for h in v or ():
            if h != "*" and not _TOKEN.match(h):
                raise ValueError(f"{h!r} is not a header name")
        return v


@register
class Cors(Plugin[CorsConfig]):
    name = "cors"
    priority = 2000
    Config = CorsConfig

    def __init__(self, config: CorsConfig) -> None:
        super().__init__(config)
        self._any = False
        exact: set[str] = set()
        regexes: list[re.Pattern[str]] = []
        for entry in config.origins:
            if entry == "*":
                self._any = True
            elif entry.startswith("~"):
                regexes.append(re.compile(entry[1:], re.IGNORECASE))
            else:
                exact.add(_normalise_origin(entry))
        self._exact = frozenset(exact)
        self._regexes = tuple(regexes)
        # `*` cannot be combined with credentials (browsers reject it), so in that
        # case the origin is echoed; the answer then depends on Origin -> Vary.
        self._star = self._any and not config.credentials
        self._methods = ", ".join(config.methods).encode()
        self._allow_headers = None if config.headers is None else ", ".join(config.headers).encode()
        self._exposed = ", ".join(config.exposed_headers).encode()
        self._max_age = None if config.max_age is None else str(config.max_age).encode()

    def _allowed(self, raw: bytes) -> str | None:
        """The origin as text if it may use CORS, else None (also when malformed)."""
        try:
            origin = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not origin or not origin.isprintable():
            return None
        if self._any:
            return origin
        lowered = origin.lower()
        if lowered in self._exact:
            return origin
        for rx in self._regexes:
            if rx.fullmatch(origin):
                return origin
        return None

    def _common(self, origin: str) -> Headers:
        out: Headers = []
        if self._star:
            out.append((_ACAO, b"*"))
        else:
            out.append((_ACAO, origin.encode("ascii")))
            out.append((b"vary", b"Origin"))
        if self.config.credentials:
            out.append((_ACAC, b"true"))
        return out

    def _preflight_headers(self, ctx: RequestContext, origin: str) -> Headers:
        out = self._common(origin)
        out.append((_ACAM, self._methods))
        if self._allow_headers is not None:
            if self._allow_headers:
                out.append((_ACAH, self._allow_headers))
        else:
            requested = ctx.header(_ACRH)
            # Reflect only a well-formed token list: anything else is dropped
            # rather than echoed into a response header.
            if requested is not None and _TOKEN_LIST.match(requested.decode("latin-1")):
                out.append((_ACAH, requested.strip()))
            out.append((b"vary", b"Access-Control-Request-Headers"))
        if self._max_age is not None:
            out.append((_ACMA, self._max_age))
        return out

    def access(self, ctx: RequestContext) -> Response | None:
        raw_origin = ctx.header(b"origin")
        if raw_origin is None:
            return None
        origin = self._allowed(raw_origin)
        if ctx.method == "OPTIONS" and ctx.header(_ACRM) is not None:
            if origin is None:
                if self.config.strict:
                    return self._refuse(ctx, raw_origin)
                if self.config.preflight_continue:
                    return None
                return Response(204, [(b"vary", b"Origin")])
            headers = self._preflight_headers(ctx, origin)
            ctx.vars[_VARS_KEY] = headers
            if self.config.preflight_continue:
                return None
            return Response(204, list(headers))
        if origin is None:
            if self.config.strict and ctx.method not in _SAFE_METHODS:
                return self._refuse(ctx, raw_origin)
            return None
        headers = self._common(origin)
        if self._exposed:
            headers.append((_ACEH, self._exposed))
        ctx.vars[_VARS_KEY] = headers
        return None

    def _refuse(self, ctx: RequestContext, raw_origin: bytes) -> Response:
        details: dict[str, Any] = {"origin": raw_origin.decode("latin-1")}
        return Response.error("origin_not_allowed", ctx.request_id, details=details)

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        headers: Headers | None = ctx.vars.get(_VARS_KEY)
        if headers is None:
            # The gateway's origin list is the policy: an upstream's own CORS grant
            # must not open the door to an origin the gateway did not allow.
            if any(name.startswith(b"access-control-") for name, _ in head.headers):
                head.headers[:] = [
                    h for h in head.headers if not h[0].startswith(b"access-control-")
                ]
            if not self._star:
                # The answer would differ for another Origin: caches must know.
                header_add_vary(head.headers, b"Origin")
            return
        # Ours replace any the upstream set: one pass, not one rebuild per header.
        ours = {name for name, _ in headers if name != b"vary"}
        head.headers[:] = [h for h in head.headers if h[0] not in ours]
        for name, value in headers:
            if name == b"vary":
                header_add_vary(head.headers, value)
            else:
                head.headers.append((name, value))

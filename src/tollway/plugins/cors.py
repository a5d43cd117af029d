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

The hooks run compiled, in cors_engine.py; this module holds the schema.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tollway.gateway.context import RequestContext, Response, ResponseHead
from tollway.plugins.base import Plugin, PluginConfig, register
from tollway.plugins.cors_engine import CorsEngine

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


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
    raw_response = True  # its engine records its response edits in access
    Config = CorsConfig

    def __init__(self, config: CorsConfig) -> None:
        super().__init__(config)
        any_origin = False
        exact: set[str] = set()
        regexes: list[re.Pattern[str]] = []
        for entry in config.origins:
            if entry == "*":
                any_origin = True
            elif entry.startswith("~"):
                regexes.append(re.compile(entry[1:], re.IGNORECASE))
            else:
                exact.add(_normalise_origin(entry))
        self._engine = CorsEngine(
            any_origin=any_origin,
            exact=frozenset(exact),
            regexes=tuple(regexes),
            credentials=config.credentials,
            methods=", ".join(config.methods).encode(),
            allow_headers=None if config.headers is None else ", ".join(config.headers).encode(),
            exposed=", ".join(config.exposed_headers).encode(),
            max_age=None if config.max_age is None else str(config.max_age).encode(),
            strict=config.strict,
            preflight_continue=config.preflight_continue,
        )
        # The pipeline calls the compiled hooks themselves (the class still defines
        # them: that is what the pipeline looks for).
        self.access = self._engine.access  # type: ignore[method-assign]
        self.response_headers = self._engine.response_headers  # type: ignore[method-assign]

    def access(self, ctx: RequestContext) -> Response | None:
        return self._engine.access(ctx)

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        self._engine.response_headers(ctx, head)

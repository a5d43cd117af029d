"""cors's per-request work, compiled with mypyc (the plugin is `cors.py`).

The plugin module keeps the pydantic schema; this one holds what runs on every
request: the origin check, the preflight answer and the response headers.
"""

from __future__ import annotations

import re
from typing import Any

from tollway.gateway.context import (
    Headers,
    RequestContext,
    Response,
    ResponseHead,
    header_add_vary,
)

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


class CorsEngine:
    """One cors configuration, compiled: `access` and `response_headers` are the hooks."""

    def __init__(
        self,
        *,
        any_origin: bool,
        exact: frozenset[str],
        regexes: tuple[re.Pattern[str], ...],
        credentials: bool,
        methods: bytes,
        allow_headers: bytes | None,
        exposed: bytes,
        max_age: bytes | None,
        strict: bool,
        preflight_continue: bool,
    ) -> None:
        self._any = any_origin
        self._exact = exact
        self._regexes = regexes
        # `*` cannot be combined with credentials (browsers reject it), so in that
        # case the origin is echoed; the answer then depends on Origin -> Vary.
        self._star = any_origin and not credentials
        self._credentials = credentials
        self._methods = methods
        self._allow_headers = allow_headers
        self._exposed = exposed
        self._max_age = max_age
        self._strict = strict
        self._preflight_continue = preflight_continue

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
        if self._credentials:
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
        # Every path that lets the request on records the response edits for the
        # raw path (plugins/base.py raw_response); response_headers does the same
        # on a parsed head.
        raw_origin = ctx.header(b"origin")
        if raw_origin is None:
            self._raw_default(ctx)
            return None
        origin = self._allowed(raw_origin)
        if ctx.method == "OPTIONS" and ctx.header(_ACRM) is not None:
            if origin is None:
                if self._strict:
                    return self._refuse(ctx, raw_origin)
                if self._preflight_continue:
                    self._raw_default(ctx)
                    return None
                return Response(204, [(b"vary", b"Origin")])
            headers = self._preflight_headers(ctx, origin)
            ctx.vars[_VARS_KEY] = headers
            if self._preflight_continue:
                self._raw_ours(ctx, headers)
                return None
            return Response(204, list(headers))
        if origin is None:
            if self._strict and ctx.method not in _SAFE_METHODS:
                return self._refuse(ctx, raw_origin)
            self._raw_default(ctx)
            return None
        headers = self._common(origin)
        if self._exposed:
            headers.append((_ACEH, self._exposed))
        ctx.vars[_VARS_KEY] = headers
        self._raw_ours(ctx, headers)
        return None

    def _raw_default(self, ctx: RequestContext) -> None:
        # No grant of ours: the upstream's CORS headers go, and the answer varies
        # by Origin (a second Vary line is the same as a comma-joined one, RFC 9110
        # §5.3; unlike response_headers, the raw path does not merge them).
        ctx.raw_edit(b"access-control-", b"" if self._star else b"vary", b"Origin")

    def _raw_ours(self, ctx: RequestContext, headers: Headers) -> None:
        for name, value in headers:
            if name == b"vary":
                ctx.raw_edit(b"", name, value)
            else:
                ctx.raw_edit(name, name, value)

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

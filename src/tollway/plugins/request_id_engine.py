"""request-id's per-request work, compiled with mypyc (the plugin is `request_id.py`)."""

from __future__ import annotations

import re

from tollway.gateway.context import RequestContext, Response, ResponseHead, header_set
from tollway.gateway.ids import new_request_id


class RequestIdEngine:
    """One request-id configuration, compiled: `access` and `response_headers`."""

    def __init__(self, header: bytes, pattern: re.Pattern[str], echo: bool) -> None:
        # Context header names are lower-case bytes.
        self._header = header
        self._pattern = pattern
        self._echo = echo

    def _accept(self, raw: bytes | None) -> str | None:
        if raw is None:
            return None
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
        # Reject control characters even if a custom pattern would allow them:
        # the id is written back into header lines.
        if not value.isprintable() or self._pattern.fullmatch(value) is None:
            return None
        return value

    def access(self, ctx: RequestContext) -> Response | None:
        raw = ctx.header(self._header)
        request_id = ctx.request_id or new_request_id()
        if raw is None:
            # Nothing to replace: skip header_set's rebuild of the header list.
            ctx.headers.append((self._header, request_id.encode("ascii")))
        else:
            request_id = self._accept(raw) or request_id
            header_set(ctx.headers, self._header, request_id.encode("ascii"))
        ctx.request_id = request_id
        if self._echo:
            # The raw path's copy of response_headers (plugins/base.py raw_response).
            ctx.raw_edit(self._header, self._header, request_id.encode("ascii", "replace"))
        return None

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        if self._echo and ctx.request_id is not None:
            header_set(head.headers, self._header, ctx.request_id.encode("ascii", "replace"))

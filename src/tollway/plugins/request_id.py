"""request-id: give every request an id, forward it upstream and echo it back.

Priority 100001, the highest of the bundled plugins (Kong's correlation-id uses the
same figure), so that every later plugin's error envelope and log line carries the
id, and the echo header is on the response before anything reads it.

The server mints an id for every request (gateway/ids.py), so that even errors
before any plugin carry one; this plugin forwards it upstream, echoes it, and lets
a client's own id replace it. A client-supplied id is kept only when it matches
`pattern`: the id ends up in log lines, upstream headers and error bodies, so
free-form client input is not trusted.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tollway.config.schema import Regex
from tollway.gateway.context import RequestContext, Response, ResponseHead, header_set
from tollway.gateway.ids import new_request_id
from tollway.plugins.base import Plugin, PluginConfig, register

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

class RequestIdConfig(PluginConfig):
    header_name: str = Field(default="X-Request-ID", description="header read and written")
    pattern: Regex = Field(
        default=r"[A-Za-z0-9._:-]{1,128}",
        description="a client id is kept only if it fully matches this regex",
    )
    echo_downstream: bool = Field(default=True, description="send the id back to the client")

    @field_validator("header_name")
    @classmethod
    def _token(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError("must be a valid HTTP header name")
        return v


@register
class RequestId(Plugin[RequestIdConfig]):
    name = "request-id"
    priority = 100001
    Config = RequestIdConfig

    def __init__(self, config: RequestIdConfig) -> None:
        super().__init__(config)
        # Context header names are lower-case bytes; compute the key once.
        self._header = config.header_name.lower().encode("ascii")
        self._pattern = re.compile(config.pattern)

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
        return None

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        if self.config.echo_downstream and ctx.request_id is not None:
            header_set(head.headers, self._header, ctx.request_id.encode("ascii", "replace"))

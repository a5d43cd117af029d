"""request-size-limiting: refuse request bodies over a size.

Priority 1900: after cors (a preflight has no body and must be answered anyway),
before authentication, so an oversized upload is refused before any key lookup.
Kong runs its equivalent at 951, after auth; DESIGN.md puts the size limit before.

A declared Content-Length over the limit is refused at once with 413
`payload_too_large`. A body without one (chunked) cannot be judged up front, so the
plugin lowers `ctx.max_body_size` and the server answers 413 as soon as the
streamed body crosses it. `ctx.max_body_size` is only ever lowered, never raised
above the server's own limit.

`require_content_length: true` refuses chunked bodies with 411 `length_required`
(a request with neither Content-Length nor chunked framing has no body and passes).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from tollway.config.schema import Size
from tollway.gateway.context import RequestContext, Response
from tollway.plugins.base import Plugin, PluginConfig, register


class RequestSizeLimitingConfig(PluginConfig):
    allowed_payload_size: Size = Field(
        default=128 * 1024 * 1024, description="largest body, e.g. 512k, 10m, or bytes"
    )
    require_content_length: bool = Field(
        default=False, description="refuse bodies sent without Content-Length (411)"
    )


@register
class RequestSizeLimiting(Plugin[RequestSizeLimitingConfig]):
    name = "request-size-limiting"
    priority = 1900
    Config = RequestSizeLimitingConfig

    def __init__(self, config: RequestSizeLimitingConfig) -> None:
        super().__init__(config)
        self._limit = config.allowed_payload_size
        self._details: dict[str, Any] = {"limit": self._limit}

    def access(self, ctx: RequestContext) -> Response | None:
        limit = self._limit
        if ctx.content_length is not None:
            if ctx.content_length > limit:
                return Response.error(
                    "payload_too_large",
                    ctx.request_id,
                    f"The request body is larger than {limit} bytes",
                    details=dict(self._details),
                )
        elif ctx.chunked and self.config.require_content_length:
            return Response.error(
                "length_required",
                ctx.request_id,
                "A Content-Length header is required",
                status=411,
            )
        ctx.max_body_size = min(ctx.max_body_size, limit)
        return None

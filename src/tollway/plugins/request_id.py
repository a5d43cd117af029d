"""request-id: give every request an id, forward it upstream and echo it back.

Priority 100001, the highest of the bundled plugins (Kong's correlation-id uses the
same figure), so that every later plugin's error envelope and log line carries the
id, and the echo header is on the response before anything reads it.

The server mints an id for every request (gateway/ids.py), so that even errors
before any plugin carry one; this plugin forwards it upstream, echoes it, and lets
a client's own id replace it. A client-supplied id is kept only when it matches
`pattern`: the id ends up in log lines, upstream headers and error bodies, so
free-form client input is not trusted. The hooks run compiled, in
request_id_engine.py; this module holds the schema.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from tollway.config.schema import Regex
from tollway.gateway.context import RequestContext, Response, ResponseHead
from tollway.plugins.base import Plugin, PluginConfig, register
from tollway.plugins.request_id_engine import RequestIdEngine

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
    raw_response = True  # its engine records its response edits in access
    Config = RequestIdConfig

    def __init__(self, config: RequestIdConfig) -> None:
        super().__init__(config)
        self._engine = RequestIdEngine(
            config.header_name.lower().encode("ascii"),
            re.compile(config.pattern),
            config.echo_downstream,
        )
        # The pipeline calls the compiled hooks themselves (the class still defines
        # them: that is what the pipeline looks for).
        self.access = self._engine.access  # type: ignore[method-assign]
        self.response_headers = self._engine.response_headers  # type: ignore[method-assign]

    def access(self, ctx: RequestContext) -> Response | None:
        return self._engine.access(ctx)

    def response_headers(self, ctx: RequestContext, head: ResponseHead) -> None:
        self._engine.response_headers(ctx, head)

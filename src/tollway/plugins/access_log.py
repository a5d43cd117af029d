"""access-log: one JSON line per request, written off the hot path.

Priority 9 (Kong's file-log): the log phase runs after the last byte went out, and
the lowest priority lets every other plugin's log hook (usage, metrics) go first.

Lines are encoded with orjson rather than through structlog: structlog's processor
chain (and the stdlib json encoder) cost several microseconds per event, too much
for a line written on every request; orjson encodes one in well under one. The
gateway's own diagnostic logs still go through structlog.

Nothing is written synchronously per request. A line is appended to an in-memory
buffer; the buffer is written out when it passes 64 KiB or 0.2 s after its first
line (a `loop.call_later`), or at once when no event loop is running. One writer
per destination is shared by the plugin instances of successive config snapshots,
so a reload neither reopens the file nor interleaves two buffers; the last
instance to close flushes and closes it.

Fields: time (request start, ISO 8601 UTC), request_id, client_ip, method, path,
has_query (the query string itself is not logged: it often carries tokens), status,
route, service, upstream, latency_ms, upstream_latency_ms (until the upstream's
headers arrived; null without an upstream), bytes_in, bytes_out, user_agent,
consumer, aborted. `drop_fields` leaves some out.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator

from tollway.gateway.context import RequestContext
from tollway.plugins.access_log_engine import (
    FIELDS,
    FLUSH_BYTES,
    FLUSH_SECONDS,
    AccessLogEngine,
    acquire_writer,
    flush_all,
    release_writer,
)
from tollway.plugins.base import Plugin, PluginConfig, register

__all__ = [
    "FIELDS",
    "FLUSH_BYTES",
    "FLUSH_SECONDS",
    "AccessLog",
    "AccessLogConfig",
    "flush_all",
]


class AccessLogConfig(PluginConfig):
    path: str = Field(default="-", description='"-" for stdout, or a file to append to')
    drop_fields: tuple[str, ...] = Field(default=(), description="fields left out of each line")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if v != "-":
            parent = os.path.dirname(os.path.abspath(v))
            if not os.path.isdir(parent):
                raise ValueError(f"directory {parent} does not exist")
        return v

    @field_validator("drop_fields")
    @classmethod
    def _fields(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown fields {unknown}; known: {', '.join(FIELDS)}")
        return v


@register
class AccessLog(Plugin[AccessLogConfig]):
    name = "access-log"
    priority = 9
    Config = AccessLogConfig

    def __init__(self, config: AccessLogConfig) -> None:
        super().__init__(config)
        self._engine = AccessLogEngine(tuple(config.drop_fields), acquire_writer(config.path))
        # The pipeline calls the compiled hook itself (the class still defines it:
        # that is what the pipeline looks for).
        self.log = self._engine.log  # type: ignore[method-assign]

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        """The fields of one line (before `drop_fields`)."""
        return self._engine.record(ctx)

    def log(self, ctx: RequestContext) -> None:
        self._engine.log(ctx)

    def flush(self) -> None:
        if self._engine.writer is not None:
            self._engine.writer.flush()

    def close(self) -> None:
        writer = self._engine.writer
        if writer is not None:
            release_writer(writer)
            self._engine.writer = None

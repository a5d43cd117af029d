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

import asyncio
import atexit
import logging
import os
import sys
import time
from typing import IO, Any

import orjson
from pydantic import Field, field_validator

from tollway.gateway.context import RequestContext
from tollway.plugins.base import Plugin, PluginConfig, register

FIELDS = (
    "time",
    "request_id",
    "client_ip",
    "method",
    "path",
    "has_query",
    "status",
    "route",
    "service",
    "upstream",
    "latency_ms",
    "upstream_latency_ms",
    "bytes_in",
    "bytes_out",
    "user_agent",
    "consumer",
    "aborted",
)

FLUSH_BYTES = 64 * 1024
FLUSH_SECONDS = 0.2

_log = logging.getLogger(__name__)



def _encode(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)


class _Writer:
    """A buffered, append-only destination shared by every instance for one path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.refs = 0
        self._buf: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._file: IO[bytes] | None = None
        if path != "-":
            # Unbuffered append: every flush is one write(2) of whole lines, so
            # workers sharing the file never split each other's lines.
            self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (lives as long as the writer)
        self._failed = False

    def write(self, line: bytes) -> None:
        self._buf.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        # A timer left on another (stopped) loop would never fire: re-arm here.
        if self._timer is None or self._timer_loop is not loop:
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_loop = None
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            if self._file is not None:
                view = memoryview(data)
                while view:
                    written = self._file.write(view)
                    view = view[written or len(view) :]
            else:
                out = getattr(sys.stdout, "buffer", None)
                if out is not None:
                    out.write(data)
                else:
                    sys.stdout.write(data.decode())
                sys.stdout.flush()
            self._failed = False
        except (OSError, ValueError) as exc:
            # The log phase must never raise; say so once per outage, not per batch.
            if not self._failed:
                _log.error("access log %s: write failed, lines dropped: %s", self.path, exc)
            self._failed = True

    def drop_pending(self) -> None:
        self._buf.clear()
        self._size = 0
        self._timer = None
        self._timer_loop = None

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


_WRITERS: dict[str, _Writer] = {}


def _acquire(path: str) -> _Writer:
    key = path if path == "-" else os.path.abspath(path)
    writer = _WRITERS.get(key)
    if writer is None:
        writer = _WRITERS[key] = _Writer(key)
    writer.refs += 1
    return writer


def _release(writer: _Writer) -> None:
    writer.refs -= 1
    if writer.refs > 0:
        writer.flush()
        return
    writer.close()
    if _WRITERS.get(writer.path) is writer:
        del _WRITERS[writer.path]


def flush_all() -> None:
    for writer in list(_WRITERS.values()):
        writer.flush()


def _after_fork_in_child() -> None:
    # The parent flushed before forking; whatever is left belongs to the parent.
    for writer in _WRITERS.values():
        writer.drop_pending()


atexit.register(flush_all)
os.register_at_fork(before=flush_all, after_in_child=_after_fork_in_child)

_sec = -1
_sec_text = ""


def _iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
    global _sec, _sec_text
    sec = int(ts)
    if sec != _sec:
        _sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _sec = sec
    return f"{_sec_text}.{int((ts - sec) * 1000):03d}Z"


def _consumer_id(consumer: Any) -> str | None:
    if consumer is None:
        return None
    if isinstance(consumer, dict):
        value = consumer.get("id") or consumer.get("username")
    else:
        value = getattr(consumer, "id", None) or getattr(consumer, "username", None)
    return None if value is None else str(value)


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
        self._drop = tuple(config.drop_fields)
        self._writer: _Writer | None = _acquire(config.path)

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        """The fields of one line (before `drop_fields`)."""
        end = ctx.finished_at or time.perf_counter()
        upstream_ms = None
        if ctx.upstream_start and ctx.upstream_headers_at:
            upstream_ms = round((ctx.upstream_headers_at - ctx.upstream_start) * 1000, 3)
        route = ctx.route
        service = route.service if route is not None else None
        ua = ctx.header(b"user-agent")
        return {
            "time": _iso_utc(ctx.started_at),
            "request_id": ctx.request_id,
            "client_ip": ctx.client_ip,
            "method": ctx.method,
            "path": ctx.path,
            "has_query": bool(ctx.query),
            "status": ctx.status,
            "route": route.name if route is not None else None,
            "service": service.name if service is not None else None,
            "upstream": ctx.upstream_addr,
            "latency_ms": round((end - ctx.start) * 1000, 3),
            "upstream_latency_ms": upstream_ms,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "user_agent": None if ua is None else ua.decode("latin-1"),
            "consumer": _consumer_id(ctx.consumer),
            "aborted": ctx.aborted,
        }

    def log(self, ctx: RequestContext) -> None:
        if self._writer is None:
            return
        rec = self.record(ctx)
        for name in self._drop:
            del rec[name]
        self._writer.write(_encode(rec))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            _release(self._writer)
            self._writer = None

"""access-log's per-request work and its buffered writers, compiled with mypyc.

The plugin module (access_log.py) keeps the pydantic schema; this one holds what
runs on every request: the line's fields, orjson, and the append to a buffer.
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

from tollway.gateway.context import RequestContext

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


class Writer:
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
        armed_on = self._timer_loop
        if self._timer is not None and armed_on is not None and armed_on.is_running():
            # Armed on the running loop: the common case, decided without
            # asyncio.get_running_loop(), which costs a getpid() call on 3.11.
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


WRITERS: dict[str, Writer] = {}


def acquire_writer(path: str) -> Writer:
    key = path if path == "-" else os.path.abspath(path)
    writer = WRITERS.get(key)
    if writer is None:
        writer = WRITERS[key] = Writer(key)
    writer.refs += 1
    return writer


def release_writer(writer: Writer) -> None:
    writer.refs -= 1
    if writer.refs > 0:
        writer.flush()
        return
    writer.close()
    if WRITERS.get(writer.path) is writer:
        del WRITERS[writer.path]


def flush_all() -> None:
    for writer in list(WRITERS.values()):
        writer.flush()


def _after_fork_in_child() -> None:
    # The parent flushed before forking; whatever is left belongs to the parent.
    for writer in WRITERS.values():
        writer.drop_pending()


atexit.register(flush_all)
os.register_at_fork(before=flush_all, after_in_child=_after_fork_in_child)

_sec = -1
_sec_text = ""
# ".000Z" to ".999Z": a table lookup, where an f-string with a format spec is the
# costliest step of a line.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _iso_utc(ts: float) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part is formatted once per second."""
    global _sec, _sec_text
    sec = int(ts)
    if sec != _sec:
        _sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _sec = sec
    return _sec_text + _MILLIS[min(999, int((ts - sec) * 1000))]


def _ms(seconds: float) -> float:
    """Seconds as milliseconds with three decimals (round(x, 3), without its
    correctly-rounded decimal conversion: a microsecond either way is noise here)."""
    return int(seconds * 1_000_000 + 0.5) / 1000


def _consumer_id(consumer: Any) -> str | None:
    if consumer is None:
        return None
    if isinstance(consumer, dict):
        value = consumer.get("id") or consumer.get("username")
    else:
        value = getattr(consumer, "id", None) or getattr(consumer, "username", None)
    return None if value is None else str(value)



class AccessLogEngine:
    """One access-log configuration: `log` is the hook."""

    def __init__(self, drop: tuple[str, ...], writer: Writer) -> None:
        self.drop = drop
        self.writer: Writer | None = writer

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        """The fields of one line (before `drop_fields`)."""
        end = ctx.finished_at or time.perf_counter()
        upstream_ms = None
        if ctx.upstream_start and ctx.upstream_headers_at:
            upstream_ms = _ms(ctx.upstream_headers_at - ctx.upstream_start)
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
            "latency_ms": _ms(end - ctx.start),
            "upstream_latency_ms": upstream_ms,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "user_agent": None if ua is None else ua.decode("latin-1"),
            "consumer": _consumer_id(ctx.consumer),
            "aborted": ctx.aborted,
        }

    def log(self, ctx: RequestContext) -> None:
        writer = self.writer
        if writer is None:
            return
        rec = self.record(ctx)
        for name in self.drop:
            del rec[name]
        writer.write(_encode(rec))

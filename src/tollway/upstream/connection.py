"""One keep-alive connection to an upstream target, as an asyncio Protocol.

While a request uses it, the connection has an `owner` (the data plane's exchange)
and reports to it the response head, body chunks, completion, failure and write
back-pressure. Between requests it sits idle in its pool. The owner decides
whether it may be reused: only after a complete response to a fully sent request.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from tollway.gateway.context import Headers
from tollway.upstream.errors import UpstreamClosed, UpstreamError, UpstreamProtocolError

if TYPE_CHECKING:
    from tollway.upstream.pool import ConnectionPool


class ConnectionOwner(Protocol):
    """What an upstream connection reports to the request using it."""

    def upstream_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None,
        chunked: bool, connection: bytes | None,
    ) -> None: ...

    def upstream_raw_head(
        self, status: int, block: bytes, content_length: int | None, chunked: bool
    ) -> None: ...

    def upstream_body(self, data: bytes) -> None: ...

    def upstream_complete(self, keep_alive: bool) -> None: ...

    def upstream_failed(self, exc: UpstreamError) -> None: ...

    def upstream_writable(self, writable: bool) -> None: ...

    def flush_output(self) -> None: ...

    def upstream_upgraded(self, tail: bytes) -> None: ...

    def relay_from_upstream(self, data: bytes) -> None: ...

    def relay_closed(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_chunked",
        "_collect",
        "_content_length",
        "_full_parser",
        "_head_data",
        "_head_only",
        "_head_start",
        "_headers",
        "_informational",
        "_parser",
        "_raw_parser",
        "_reason",
        "_responding",
        "closed",
        "idle_since",
        "owner",
        "pool",
        "relay",
        "requests",
        "transport",
    )

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner: ConnectionOwner | None = None
        self.closed = False
        self.relay = False
        self.idle_since = 0.0
        self.requests = 0
        # Two parsers, one per way of reading a response head; each response is read
        # whole by one of them, so each stays at a message boundary between uses.
        # The full one reports every header (response plugins need the list); the
        # raw one reports none: httptools binds its callbacks when it is built, so a
        # parser without on_header costs no Python call per header, and the head
        # is passed on as bytes (see _on_raw_headers_complete).
        self._full_parser = httptools.HttpResponseParser(self)
        self._raw_parser = httptools.HttpResponseParser(_RawCallbacks(self))
        self._parser = self._full_parser
        self._collect = False
        self._head_data = b""
        self._head_start = 0
        self._headers: Headers = []
        self._reason = b""
        self._head_only = False
        self._informational = False
        self._responding = False
        self._content_length: int | None = None
        self._chunked = False

    # ---- used by the owner ---------------------------------------------------------

    def send_head(
        self, owner: ConnectionOwner, head: bytes, head_only: bool, raw: bool = False
    ) -> None:
        """Start a request: become owned, write the request head.

        `raw`: report the response head as bytes (upstream_raw_head) instead of a
        header list; not for HEAD requests or upgrades.
        """
        self.owner = owner
        self.requests += 1
        self._head_only = head_only
        self._parser = self._raw_parser if raw else self._full_parser
        self._collect = raw
        self._head_data = b""
        self._head_start = 0
        self._headers = []
        self._reason = b""
        self._responding = False
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def start_relay(self) -> None:
        self.relay = True

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping unsent bytes: the request must not complete."""
        self.owner = None
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # ---- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if self.relay:
            if owner is not None:
                owner.relay_from_upstream(data)
            return
        if owner is None:
            # Bytes while idle: the upstream is confused; never reuse this one.
            self.close()
            return
        if self._collect:
            self._head_data = self._head_data + data if self._head_data else data
        try:
            self._parser.feed_data(data)
            if self.owner is owner:
                owner.flush_output()
        except httptools.HttpParserUpgrade as exc:
            if not self.relay or self.owner is not owner:
                # A 101 nobody asked for: what follows is not ours to pass on.
                self._fail(UpstreamProtocolError("unexpected 101 response"))
                return
            offset = exc.args[0] if exc.args else len(data)
            owner.upstream_upgraded(data[offset:])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"invalid response from upstream: {exc}"))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        owner, self.owner = self.owner, None
        if owner is None:
            return
        if self.relay:
            owner.relay_closed()
        elif self._responding and self._content_length is None and not self._chunked:
            # A body delimited by the close (RFC 9112 §6.3 rule 8) has ended.
            owner.upstream_complete(False)
        else:
            owner.upstream_failed(UpstreamClosed(str(exc) if exc else "upstream closed"))

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_writable(True)

    # ---- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.owner is None:
            # A second response after the one we asked for, in the same packet:
            # this connection is out of step and must never be reused.
            raise UpstreamProtocolError("bytes after the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._responding:
            self._headers.append((name.lower(), value))
        # Headers after the body are trailers: dropped (Trailer is hop-by-hop and
        # the client side re-frames the body).

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue and other interim answers: the gateway speaks for itself
            # to the client (it answered Expect already), so they are dropped.
            self._informational = True
            self._headers = []
            self._reason = b""
            return
        headers = self._headers
        content_length = connection = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().rstrip().endswith(b"chunked")
            elif name == b"connection":
                connection = value if connection is None else connection + b"," + value
        self._content_length = content_length
        self._chunked = chunked
        self._responding = True
        owner = self.owner
        assert owner is not None
        owner.upstream_head(status, self._reason, headers, content_length, chunked, connection)
        if self._head_only and self.owner is owner and status != 101:
            # httptools cannot be told a response answers HEAD, so it would wait for
            # Content-Length bytes that never come: finish here and retire the
            # connection rather than trust the parser state.
            self.owner = None
            self._responding = False
            owner.upstream_complete(False)
            self.close()

    def _on_raw_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        buf = self._head_data
        start = self._head_start
        while start < len(buf) and (buf[start] == 13 or buf[start] == 10):
            start += 1  # llhttp tolerates empty lines before a status line (CR, LF)
        end = buf.find(b"\r\n\r\n", start)
        if status == 101:
            # Raw mode is never used for upgrade requests: a 101 here is unasked.
            raise UpstreamProtocolError("unexpected 101 response")
        if 100 <= status < 200:
            # An interim answer (100 Continue): skip its head; the final one follows.
            self._informational = True
            self._head_start = end + 4
            return
        self._collect = False
        self._head_data = b""
        block = buf[start:end]
        content_length = None
        chunked = False
        # One regex pass: split() yields [text, name, value, text, name, value, ...].
        parts = _HOP_LINE.split(block)
        if len(parts) > 1:
            extra: set[bytes] = set()
            for i in range(1, len(parts), 3):
                name = parts[i].lower()
                value = parts[i + 1]
                if name == b"content-length":
                    content_length = int(value)
                elif name == b"transfer-encoding":
                    chunked = value.lower().rstrip().endswith(b"chunked")
                elif name == b"connection" and value.lower() != b"keep-alive":
                    tokens = {t.strip().lower() for t in value.split(b",")}
                    extra |= tokens - _HOP_NAMES - {b"", b"close"}
            block = b"".join(parts[::3])
            if extra:
                block = _without_headers(block, extra)
        self._content_length = content_length
        self._chunked = chunked
        self._responding = True
        owner = self.owner
        assert owner is not None
        owner.upstream_raw_head(status, block, content_length, chunked)

    def on_body(self, body: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.relay:
            # llhttp completes a 101 response before it reports the upgrade: the
            # connection now belongs to the relay, not back to the pool.
            return
        owner, self.owner = self.owner, None
        self._responding = False
        if owner is not None:
            owner.upstream_complete(self._parser.should_keep_alive())

    # ---- internals -----------------------------------------------------------------

    def _fail(self, exc: UpstreamError) -> None:
        owner, self.owner = self.owner, None
        self.close()
        if owner is not None:
            owner.upstream_failed(exc)


class _RawCallbacks:
    """The callbacks of the raw parser: the connection's own, minus on_header."""

    __slots__ = ("on_body", "on_headers_complete", "on_message_begin", "on_message_complete")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.on_message_begin = conn.on_message_begin
        self.on_headers_complete = conn._on_raw_headers_complete
        self.on_body = conn.on_body
        self.on_message_complete = conn.on_message_complete


# Hop-by-hop header lines and Content-Length, found and cut in one regex pass over
# the raw head; each match starts at the CRLF before its line, so cutting leaves
# the next line's CRLF in place.
_HOP_NAMES = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
     b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
_HOP_LINE = re.compile(
    rb"\r\n(content-length|" + b"|".join(sorted(_HOP_NAMES)) + rb")[ \t]*:[ \t]*([^\r\n]*)",
    re.IGNORECASE,
)


def _without_headers(block: bytes, names: set[bytes]) -> bytes:
    """Drop the header lines whose names Connection listed (rare: a slow path)."""
    lines = block.split(b"\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in names
    ]
    return b"\r\n".join(kept)

"""One keep-alive connection to an upstream target, as an asyncio Protocol.

While a request uses it, the connection has an `owner` (the data plane's exchange)
and reports to it the response head, body chunks, completion, failure and write
back-pressure. Between requests it sits idle in its pool. The owner decides
whether it may be reused: only after a complete response to a fully sent request.
"""

from __future__ import annotations

import asyncio
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
        "_content_length",
        "_head_only",
        "_headers",
        "_informational",
        "_parser",
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
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._reason = b""
        self._head_only = False
        self._informational = False
        self._responding = False
        self._content_length: int | None = None
        self._chunked = False

    # ---- used by the owner ---------------------------------------------------------

    def send_head(self, owner: ConnectionOwner, head: bytes, head_only: bool) -> None:
        """Start a request: become owned, write the request head."""
        self.owner = owner
        self.requests += 1
        self._head_only = head_only
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
        try:
            self._parser.feed_data(data)
            if self.owner is owner:
                owner.flush_output()
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self.relay = True
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

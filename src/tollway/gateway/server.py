"""The client side of the data plane: one asyncio Protocol per client connection.

It parses requests with httptools (llhttp), applies the limits and strictness
rules, and hands each request to an `Exchange`. Pipelined requests queue in
order; only the first in the queue writes to the socket, so responses leave in
request order. Timeouts are deadlines checked by the data plane's sweeper rather
than one timer per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from tollway.gateway.context import Headers, RequestContext, Response
from tollway.gateway.exchange import BODY_BUFFER, Exchange
from tollway.gateway.forwarded import resolve_client_ip
from tollway.gateway.http11 import (
    DATE,
    RequestRejected,
    host_without_port,
    is_upgrade,
    normalize_path,
    render_head,
    scan_request_headers,
    split_target,
)
from tollway.gateway.ids import new_request_id

if TYPE_CHECKING:
    from tollway.gateway.dataplane import DataPlane

log = structlog.get_logger("tollway.server")

MAX_PIPELINE = 32
_METHODS: dict[bytes, str] = {}
# Host header -> routing host (lower-case, no port); bounded, hosts repeat.
_HOSTS: dict[str, str] = {}


def _host_key(host: str) -> str:
    key = host_without_port(host)
    if len(_HOSTS) >= 1024:
        _HOSTS.clear()
    _HOSTS[host] = key
    return key


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing with an error answer."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing silently (reading stopped)."""


class ClientConnection(asyncio.Protocol):
    PAUSE_BODY = 1
    PAUSE_UPSTREAM = 2
    PAUSE_PIPELINE = 4
    PAUSE_STOPPED = 8

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.settings = plane.settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.local_port = 0
        self.queue: deque[Exchange] = deque()
        self.parsing: Exchange | None = None
        self.relay: Exchange | None = None
        self.deadline = 0.0
        self.deadline_kind = ""
        self._deadline_span = 0.0
        self._paused = 0
        self.write_paused = False
        self.closed = False
        # Set once a request is refused or upgraded: no further bytes are parsed.
        self._stopped = False
        self._upgrade_buf: list[bytes] = []
        self._url = b""
        self._headers: Headers = []
        # Bytes of packets wholly inside the current head (a backstop for a field
        # still held by the parser), exact bytes of its complete header lines, and
        # how many messages began (to tell whether a packet started a new head).
        self._head_bytes = 0
        self._head_size = 0
        self._begun = 0
        # Why a parser callback stopped parsing (see _abort).
        self._signal: Exception | None = None
        self._in_head = False
        self._in_body = False
        self._linger = False
        self._eof = False

    # ---- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else "127.0.0.1"
        sock = self.transport.get_extra_info("sockname")
        self.local_port = sock[1] if isinstance(sock, tuple) else 0
        self.plane.connection_opened(self)
        self.set_deadline("idle", self.settings.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.plane.connection_closed(self)
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.client_relay_closed()
        while self.queue:
            self.queue.popleft().client_gone(self.plane.abort_reason or "client_closed")

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.relay_from_client(data)
            return
        if self._stopped:
            if self.queue and self.queue[-1].upgrade is not None:
                # Bytes after an upgrade request belong to the upgraded protocol.
                self.queue[-1].upgrade_tail += data
                if len(self.queue[-1].upgrade_tail) > BODY_BUFFER:
                    self.pause_reading(self.PAUSE_STOPPED)
            return
        in_head, begun = self._in_head, self._begun
        try:
            self.parser.feed_data(data)
            if self._in_head and in_head and self._begun == begun:
                # Still inside the head this packet continued: all of it is head.
                self._head_bytes += len(data)
                if self._head_bytes > (
                    self.settings.max_header_bytes + self.settings.max_uri_length
                ):
                    self._refuse("headers_too_large")
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgraded(data[offset:])
        except httptools.HttpParserCallbackError as exc:
            cause = self._signal or exc.__context__
            self._signal = None
            if isinstance(cause, _Refuse):
                self._refuse(cause.code, cause.message)
            elif isinstance(cause, _Stop):
                pass
            else:
                log.error("parser callback failed", error=repr(cause), exc_info=cause)
                self._refuse("internal_error")
        except httptools.HttpParserInvalidMethodError:
            self._refuse("not_implemented", "Unknown request method")
        except httptools.HttpParserError as exc:
            self._parse_error(str(exc))

    def eof_received(self) -> bool | None:
        # A half-closed client may still want its responses (pipelined then FIN).
        self._eof = True
        if not self._stopped and (
            self._in_head or (self.parsing is not None and self.parsing.body_pending)
        ):
            # But a request cut short can never complete: refuse it (this aborts its
            # upstream request) instead of holding everything until a timeout.
            self._refuse("bad_request", "Incomplete request")
        return bool(self.queue)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.queue:
            # A client that stops reading must not hold the upstream forever.
            self.set_deadline("send", self.settings.body_timeout)
            self.queue[0].client_writable(False)
        elif self.relay is not None:
            self.relay.client_writable(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.queue:
            exchange = self.queue[0]
            if self.deadline_kind == "send":
                self.set_deadline("upstream", exchange.read_timeout())
            exchange.client_writable(True)
        elif self.relay is not None:
            self.relay.client_writable(True)

    # ---- httptools callbacks -------------------------------------------------------

    def _abort(self, signal: Exception) -> Exception:
        """Remember why a parser callback stops parsing; the callback raises it.

        feed_data's handler reads it here, not from the callback error's
        __context__: raising replaces that with whatever exception the thread is
        handling at the time (a coroutine suspended in an except block leaves one
        behind), which turned a 414 into a 500.
        """
        self._signal = signal
        return signal

    def on_message_begin(self) -> None:
        if self._stopped:
            # The rest of a packet after a refused request is never parsed.
            raise self._abort(_Stop())
        self._begun += 1
        self._head_bytes = 0
        self._head_size = 0
        self._url = b""
        self._headers = []
        self._in_head = True
        if not self.queue:
            self.set_deadline("header", self.settings.header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.settings.max_uri_length:
            raise self._abort(_Refuse("uri_too_long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            # Chunked trailers: dropped (the upstream body is re-framed), but
            # counted with the headers against one header-block budget.
            self._head_size += len(name) + len(value) + 4
            if self._head_size > self.settings.max_header_bytes:
                raise self._abort(_Refuse("headers_too_large", "Request trailers are too large"))
            return
        headers = self._headers
        if len(headers) >= self.settings.max_header_count:
            raise self._abort(_Refuse("headers_too_large", "Too many request headers"))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.settings.max_header_bytes:
            raise self._abort(_Refuse("headers_too_large"))
        headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._head_bytes = 0
        exchange = self._new_exchange()
        self.parsing = exchange
        self.queue.append(exchange)
        if len(self.queue) == 1:
            self._start(exchange)
        elif len(self.queue) >= MAX_PIPELINE:
            self.pause_reading(self.PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        if exchange is None or exchange.preset is not None:
            return  # refused before routing: the body is dropped
        if (
            self.queue and self.queue[0] is not exchange
            and exchange.body_received + len(body) > exchange.ctx.max_body_size
        ):
            # Queued behind other requests: only the first in the queue writes, so
            # the refusal waits for its turn.
            exchange.preset = Response.error("payload_too_large", exchange.ctx.request_id)
            self._stop_reading()
            raise self._abort(_Stop())
        exchange.request_body(body)
        if self.deadline_kind == "body":
            self.refresh_deadline()

    def on_message_complete(self) -> None:
        self._in_body = False
        exchange, self.parsing = self.parsing, None
        if exchange is not None:
            exchange.request_complete()
        if self._linger:
            self.close()

    # ---- requests ------------------------------------------------------------------

    def _new_exchange(self) -> Exchange:
        parser = self.parser
        settings = self.settings
        plane = self.plane
        snapshot = plane.snapshot
        method_b = parser.get_method()
        method = _METHODS.get(method_b)
        if method is None:
            method = _METHODS.setdefault(method_b, method_b.decode("ascii"))
        version = parser.get_http_version()
        headers = self._headers
        ctx = RequestContext(
            method=method, path="/", query=b"", http_version=version, headers=headers,
            peer_ip=self.peer_ip, client_ip=self.peer_ip, host="",
            max_body_size=settings.max_body_size, request_id=new_request_id(),
        )
        upgrade = is_upgrade(headers) if parser.should_upgrade() else None
        expect = False
        connection = None
        try:
            if version not in ("1.1", "1.0"):
                raise RequestRejected(
                    "version_not_supported", f"HTTP/{version} is not supported"
                )
            if method == "CONNECT":
                raise RequestRejected("not_implemented", "CONNECT is not supported")
            ctx.content_length, ctx.chunked, host_header, expect_value, connection = (
                scan_request_headers(headers, version)
            )
            path, ctx.query, authority = split_target(self._url)
            if path == "*" and method != "OPTIONS":
                # RFC 9112 §3.2.4: the asterisk-form is only for a server-wide OPTIONS.
                raise RequestRejected("bad_request", "Invalid request target")
            ctx.path = normalize_path(path)
            if authority is not None:
                # RFC 9112 §3.2.2: the absolute-form target wins over Host, for
                # routing and for the Host a proxy generates.
                ctx.host_header = authority.encode("latin-1")
            elif host_header is not None:
                ctx.host_header = host_header
            host = authority or (host_header or b"").decode("latin-1")
            ctx.host = _HOSTS.get(host) or _host_key(host)
            if snapshot.trusted_proxies:
                ctx.client_ip = resolve_client_ip(
                    self.peer_ip, headers, snapshot.trusted_proxies
                )
            if expect_value is not None:
                if expect_value.lower() != b"100-continue":
                    raise RequestRejected("expectation_failed", "Only 100-continue")
                expect = version == "1.1"
        except RequestRejected as exc:
            exchange = Exchange(self, ctx, False, snapshot, None, False)
            exchange.preset = Response.error(
                exc.code, ctx.request_id, exc.message, status=exc.status
            )
            self._stop_reading()
            return exchange
        if ctx.content_length is not None and ctx.content_length > ctx.max_body_size:
            # Refuse before the body arrives: no reason to read a body we will drop.
            exchange = Exchange(self, ctx, False, snapshot, None, False)
            exchange.preset = Response.error("payload_too_large", ctx.request_id)
            self._stop_reading()
            return exchange
        exchange = Exchange(self, ctx, parser.should_keep_alive(), snapshot, upgrade, expect)
        exchange.connection = connection
        if upgrade is not None:
            self._stop_reading()
        return exchange

    def _start(self, exchange: Exchange) -> None:
        if exchange.body_pending:
            self.set_deadline("body", self.settings.body_timeout)
        else:
            # Until the exchange arms its upstream deadline, none of an earlier
            # request's (pipelining) or of the header phase applies.
            self.deadline = 0.0
            self.deadline_kind = ""
        exchange.start()

    def exchange_done(self, exchange: Exchange) -> None:
        """The response is written out; go on with the next request or close."""
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        if self.relay is exchange:
            self.relay = None
        # Pauses this exchange asked for end with it; the next one re-pauses if needed.
        self.resume_reading(self.PAUSE_BODY | self.PAUSE_UPSTREAM)
        if exchange.close_after or self.plane.draining:
            if exchange is self.parsing and exchange.body_pending and not self._eof:
                # The client is still sending this request's body: read and drop it
                # for a moment, so that closing does not reset the connection under
                # the response we just wrote (lingering close).
                self._linger = True
                self.set_deadline("linger", 2.0)
                self.resume_reading(self._paused)
                return
            self.close()
            return
        if self.queue:
            if self._paused & self.PAUSE_PIPELINE and len(self.queue) < MAX_PIPELINE // 2:
                self.resume_reading(self.PAUSE_PIPELINE)
            self._start(self.queue[0])
        elif self._stopped or self._eof:
            self.close()
        else:
            self.set_deadline("idle", self.settings.keepalive_timeout)

    def exchange_dropped(self, exchange: Exchange) -> None:
        """An exchange ended without a complete response (client gone, aborted)."""
        if exchange in self.queue:
            self.queue.remove(exchange)

    def start_relay(self, exchange: Exchange) -> None:
        self.relay = exchange
        if self.queue and self.queue[0] is exchange:
            self.queue.popleft()
        tail = exchange.upgrade_tail
        exchange.upgrade_tail = b""
        if tail:
            exchange.relay_from_client(tail)
        self.resume_reading(self._paused)
        self.set_deadline("relay", self.settings.websocket_idle_timeout)

    # ---- errors --------------------------------------------------------------------

    def _refuse(self, code: str, message: str | None = None) -> None:
        """A request that cannot be parsed further: answer in turn, then close."""
        parsing = self.parsing
        if parsing is not None:
            self._stop_reading()
            if parsing.finished:
                # Answered already (413, timeout): no second response.
                if not self.queue:
                    self.close()
            elif self.queue and self.queue[0] is not parsing:
                # Not its turn yet: answer when it comes, in order.
                if parsing.preset is None:
                    parsing.preset = Response.error("bad_request", None, message or code)
            else:
                parsing.request_invalid(message or code)
            return
        self._stop_reading()
        ctx = RequestContext(
            method="GET", path="/", query=b"", http_version="1.1", headers=[],
            peer_ip=self.peer_ip, client_ip=self.peer_ip, host="", request_id=new_request_id(),
        )
        exchange = Exchange(self, ctx, False, self.plane.snapshot, None, False)
        exchange.request_done = True
        exchange.preset = Response.error(code, ctx.request_id, message)
        self.queue.append(exchange)
        if len(self.queue) == 1:
            exchange.start()

    def _parse_error(self, message: str) -> None:
        if message == "Invalid HTTP version":
            # llhttp's word for well-formed digits naming a version it does not speak
            # (HTTP/1.2, HTTP/3.0); malformed ones get other messages and a 400.
            self._refuse("version_not_supported")
            return
        self._refuse("bad_request", f"Malformed request: {message}")

    def _upgraded(self, tail: bytes) -> None:
        exchange = self.queue[-1] if self.queue else None
        if exchange is None or exchange.upgrade is None:
            self._refuse("bad_request", "Unexpected upgrade")
            return
        exchange.upgrade_tail += tail
        self._stopped = True

    def _stop_reading(self) -> None:
        self._stopped = True

    @property
    def reading_stopped(self) -> bool:
        """True when the response being written is the last one on this connection.

        Responses to requests pipelined before the refused (or upgrade) request that
        stopped reading still go out on a kept-alive connection: only the last queued
        exchange, the one that stopped reading, ends it.
        """
        return self._stopped and len(self.queue) <= 1

    # ---- socket control ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            self.closed = True
            transport.abort()

    def pause_reading(self, reason: int) -> None:
        was = self._paused
        self._paused |= reason
        if not was and self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self, reason: int) -> None:
        if not self._paused:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def set_deadline(self, kind: str, seconds: float) -> None:
        self.deadline_kind = kind
        self._deadline_span = seconds
        self.deadline = self.plane.loop.time() + seconds

    def refresh_deadline(self) -> None:
        self.deadline = self.plane.loop.time() + self._deadline_span

    def on_deadline(self) -> None:
        """Called by the sweeper when the deadline passed."""
        kind = self.deadline_kind
        self.deadline = 0.0
        if kind in ("idle", "linger"):
            self.close()
        elif kind == "header":
            if self.queue or not self._in_head:
                self.close()
            else:
                self._write_error_and_close("request_timeout")
        elif self.relay is not None:
            self.close()
            self.relay.client_relay_closed()
        elif self.queue:
            self.queue[0].on_timeout(kind)
        else:
            self.close()

    def _write_error_and_close(self, code: str) -> None:
        response = Response.error(code, None)
        headers = [*response.headers, (b"date", DATE.get()),
                   (b"content-length", str(len(response.body)).encode()),
                   (b"connection", b"close")]
        self.write(render_head(response.status, b"", headers) + response.body)
        self.close()

    def drain(self) -> None:
        """Graceful shutdown: close when idle, else after the current response."""
        if not self.queue and self.relay is None and not self._in_head:
            self.close()

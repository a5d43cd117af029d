"""A small HTTP/1.1 upstream for the quickstart and for tests.

asyncio Protocol + httptools, no web framework, so that tests of the proxy measure
the proxy and the demo starts in a few milliseconds. Endpoints:

  GET  /hello          JSON greeting with the path and headers it received
  ANY  /echo           JSON echo of method, path, query, headers and body
  GET  /bytes/{n}      n bytes of application/octet-stream
  GET  /delay/{ms}     answers after ms milliseconds
  GET  /status/{code}  answers with that status
  GET  /stream/{n}     n JSON lines, one chunk each (chunked encoding)

HEAD is accepted wherever GET is. Connections are kept alive and pipelined
requests are answered in order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

import httptools

# Longer than the gateway's default pool idle_timeout (60s), so that the gateway
# closes an idle pooled connection before the upstream does, as with nginx.
IDLE_TIMEOUT = 75.0
MAX_BODY = 64 * 1024 * 1024
MAX_BYTES = 256 * 1024 * 1024
MAX_DELAY_MS = 600_000
MAX_CHUNKS = 100_000
SERVER = b"tollway-demo-upstream"
_PATTERN = bytes(range(ord("a"), ord("z") + 1)) * 64


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes
    keep_alive: bool

    def header_dict(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for name, value in self.headers:
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return merged


@dataclass(slots=True)
class _Incoming:
    url: bytearray = field(default_factory=bytearray)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)


class _Response:
    """Writes one response onto the transport, honouring HEAD and HTTP/1.0."""

    def __init__(self, transport: asyncio.Transport, request: Request) -> None:
        self._transport = transport
        self._request = request
        self.keep_alive = request.keep_alive

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}".encode("latin-1")]
        lines += [b"%s: %s" % pair for pair in headers]
        lines.append(b"Server: " + SERVER)
        lines.append(b"Date: " + formatdate(usegmt=True).encode())
        lines.append(b"Connection: keep-alive" if self.keep_alive else b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def send(self, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
        headers: list[tuple[bytes, bytes]] = []
        # 1xx, 204 and 304 carry no body, and 204 must not announce a length.
        if status < 200 or status in (204, 304):
            body = b""
        else:
            headers.append((b"Content-Type", content_type))
            headers.append((b"Content-Length", str(len(body)).encode()))
        if self._request.method == "HEAD":
            body = b""
        self._transport.write(self._head(status, headers) + body)

    def send_json(self, status: int, payload: Any) -> None:
        self.send(status, json.dumps(payload).encode() + b"\n")

    async def stream(self, chunks: int, content_type: bytes) -> None:
        chunked = self._request.http_version != "1.0"
        if not chunked:
            # HTTP/1.0 has no chunked encoding: the end of the body is the close.
            self.keep_alive = False
        headers = [(b"Content-Type", content_type)]
        if chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        self._transport.write(self._head(200, headers))
        if self._request.method == "HEAD":
            return
        for i in range(chunks):
            data = json.dumps({"chunk": i}).encode() + b"\n"
            self._transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            # Yield so that each chunk leaves as its own write, as a real stream would.
            await asyncio.sleep(0)
            if self._transport.is_closing():
                return
        if chunked:
            self._transport.write(b"0\r\n\r\n")


Handler = Callable[[Request, _Response, str], Awaitable[None]]


def _number(text: str, limit: int) -> int | None:
    if not text.isdigit() or len(text) > 12:
        return None
    value = int(text)
    return value if value <= limit else None


async def _hello(req: Request, res: _Response, _: str) -> None:
    res.send_json(
        200,
        {"message": "hello from the demo upstream", "path": req.path, "headers": req.header_dict()},
    )


async def _echo(req: Request, res: _Response, _: str) -> None:
    try:
        body: str = req.body.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        body = base64.b64encode(req.body).decode()
        encoding = "base64"
    res.send_json(
        200,
        {
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "args": parse_qs(req.query, keep_blank_values=True),
            "http_version": req.http_version,
            "headers": req.header_dict(),
            "header_list": [[k, v] for k, v in req.headers],
            "body": body,
            "body_encoding": encoding,
        },
    )


async def _bytes(req: Request, res: _Response, arg: str) -> None:
    n = _number(arg, MAX_BYTES)
    if n is None:
        res.send_json(400, {"error": f"n must be a whole number up to {MAX_BYTES}"})
        return
    data = (_PATTERN * (n // len(_PATTERN) + 1))[:n]
    res.send(200, data, b"application/octet-stream")


async def _delay(req: Request, res: _Response, arg: str) -> None:
    ms = _number(arg, MAX_DELAY_MS)
    if ms is None:
        res.send_json(400, {"error": f"ms must be a whole number up to {MAX_DELAY_MS}"})
        return
    await asyncio.sleep(ms / 1000)
    res.send_json(200, {"delayed_ms": ms, "path": req.path})


async def _status(req: Request, res: _Response, arg: str) -> None:
    code = _number(arg, 599)
    if code is None or code < 200:
        res.send_json(400, {"error": "code must be from 200 to 599"})
        return
    res.send_json(code, {"status": code})


async def _stream(req: Request, res: _Response, arg: str) -> None:
    n = _number(arg, MAX_CHUNKS)
    if n is None:
        res.send_json(400, {"error": f"n must be a whole number up to {MAX_CHUNKS}"})
        return
    await res.stream(n, b"application/x-ndjson")


_ANY = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_GET = frozenset({"GET", "HEAD"})
# (path or prefix ending in "/", allowed methods, handler)
_ROUTES: list[tuple[str, frozenset[str], Handler]] = [
    ("/hello", _GET, _hello),
    ("/echo", _ANY, _echo),
    ("/bytes/", _GET, _bytes),
    ("/delay/", _GET, _delay),
    ("/status/", _GET, _status),
    ("/stream/", _GET, _stream),
]


async def _dispatch(req: Request, res: _Response) -> None:
    for pattern, methods, handler in _ROUTES:
        if pattern.endswith("/"):
            if not req.path.startswith(pattern):
                continue
            arg = req.path.removeprefix(pattern)
        elif req.path != pattern:
            continue
        else:
            arg = ""
        if req.method not in methods:
            res.send_json(405, {"error": "method not allowed", "allow": sorted(methods)})
            return
        await handler(req, res, arg)
        return
    res.send_json(404, {"error": "not found", "path": req.path})


class DemoProtocol(asyncio.Protocol):
    """One client connection: parse with httptools, answer requests in order."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._incoming = _Incoming()
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._idle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._worker = self._loop.create_task(self._serve())
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(501, "upgrades are not supported by the demo upstream")
        except httptools.HttpParserError as exc:
            self._fail(400, f"bad request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._worker is not None:
            self._worker.cancel()
        if self._idle is not None:
            self._idle.cancel()

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        self._incoming = _Incoming()

    def on_url(self, url: bytes) -> None:
        self._incoming.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._incoming.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        for name, value in self._incoming.headers:
            if name == "expect" and value.lower() == "100-continue" and self._transport:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._incoming.body += body
        if len(self._incoming.body) > MAX_BODY:
            self._fail(413, f"body larger than {MAX_BODY} bytes")

    def on_message_complete(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        url = httptools.parse_url(bytes(self._incoming.url))
        self._queue.put_nowait(
            Request(
                method=self._parser.get_method().decode("ascii"),
                path=(url.path or b"/").decode("latin-1"),
                query=(url.query or b"").decode("latin-1"),
                http_version=self._parser.get_http_version(),
                headers=self._incoming.headers,
                body=bytes(self._incoming.body),
                keep_alive=self._parser.should_keep_alive(),
            )
        )

    # -- serving

    async def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            request = await self._queue.get()
            if transport.is_closing():
                return
            if self._idle is not None:
                self._idle.cancel()
            response = _Response(transport, request)
            try:
                await _dispatch(request, response)
            except Exception as exc:  # noqa: BLE001  (a demo server answers 500, never dies)
                response.send_json(500, {"error": f"{type(exc).__name__}: {exc}"})
            if not response.keep_alive:
                transport.close()
                return
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._transport is not None:
            self._idle = self._loop.call_later(IDLE_TIMEOUT, self._transport.close)

    def _fail(self, status: int, message: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = json.dumps({"error": message}).encode() + b"\n"
        reason = HTTPStatus(status).phrase
        transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        transport.close()


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 9000) -> asyncio.Server:
    """Listen on host:port (0: any free port); the caller owns the server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(DemoProtocol, host, port, reuse_address=True)


def bound_port(server: asyncio.Server) -> int:
    """The port a server started with port 0 actually listens on."""
    port: int = server.sockets[0].getsockname()[1]
    return port


def run_demo_upstream(host: str = "127.0.0.1", port: int = 9000) -> None:
    """Serve in the foreground until interrupted."""

    async def main() -> None:
        server = await start_demo_upstream(host, port)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())

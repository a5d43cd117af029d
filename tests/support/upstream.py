"""A real HTTP/1.1 upstream for tests, on a loopback port, that records what it got.

It counts connections (to prove keep-alive reuse), keeps every request it
received (to prove what was or was not forwarded), and answers through a handler
the test chooses. Handlers are coroutines so a test can stall at any stage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytearray = field(default_factory=bytearray)
    body_size: int = 0
    complete: asyncio.Event = field(default_factory=asyncio.Event)
    connection_id: int = 0

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


class Reply:
    """What a handler writes back: use `send`, `chunk`, `end`, `close`, `abort`."""

    def __init__(self, proto: _UpstreamProtocol) -> None:
        self._proto = proto

    def send(
        self, status: int = 200, headers: list[tuple[str, str]] | None = None, body: bytes = b""
    ) -> None:
        hdrs = list(headers or [])
        if not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        self.head(status, hdrs)
        self.raw(body)

    def head(self, status: int, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status} X".encode()]
        lines += [f"{k}: {v}".encode() for k, v in headers]
        self.raw(b"\r\n".join(lines) + b"\r\n\r\n")

    def chunk(self, data: bytes) -> None:
        self.raw(b"%x\r\n%b\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.raw(b"0\r\n\r\n")

    def raw(self, data: bytes) -> None:
        if self._proto.transport is not None and not self._proto.transport.is_closing():
            self._proto.transport.write(data)

    def close(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.close()

    def abort(self) -> None:
        if self._proto.transport is not None:
            self._proto.transport.abort()


Handler = Callable[[Received, Reply], Awaitable[None]]


async def echo(req: Received, reply: Reply) -> None:
    """Default: wait for the whole body, answer a JSON description of the request."""
    await req.complete.wait()
    payload = {
        "method": req.method,
        "target": req.target,
        "headers": req.headers,
        "body_size": req.body_size,
        "body": req.body.decode("latin-1"),
    }
    reply.send(200, [("content-type", "application/json")], json.dumps(payload).encode())


class _UpstreamProtocol(asyncio.Protocol):
    def __init__(self, server: RecordingUpstream, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._current: Received | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Received] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.open_connections += 1
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.open_connections -= 1
        if self._runner is not None:
            self._runner.cancel()

    def data_received(self, data: bytes) -> None:
        self.server.bytes_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.server.parse_errors += 1
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        req = Received(
            method=self.parser.get_method().decode(),
            target=self._url.decode("latin-1"),
            headers=self._headers,
            connection_id=self.conn_id,
        )
        self._current = req
        self.server.requests.append(req)
        self.server.request_arrived.set()
        self._queue.put_nowait(req)

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body_size += len(body)
        if self.server.store_bodies:
            self._current.body += body

    def on_message_complete(self) -> None:
        if self._current is not None:
            self._current.complete.set()

    async def _run(self) -> None:
        # Requests on one connection are answered in order, one at a time.
        while True:
            req = await self._queue.get()
            await self.server.handler(req, Reply(self))


class RecordingUpstream:
    def __init__(self, handler: Handler = echo, store_bodies: bool = True) -> None:
        self.handler = handler
        self.store_bodies = store_bodies
        self.requests: list[Received] = []
        self.connections = 0
        self.open_connections = 0
        self.bytes_received = 0
        self.parse_errors = 0
        self.request_arrived = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> RecordingUpstream:
        loop = asyncio.get_running_loop()

        def factory() -> _UpstreamProtocol:
            self.connections += 1
            return _UpstreamProtocol(self, self.connections)

        self._server = await loop.create_server(factory, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def __aenter__(self) -> RecordingUpstream:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

"""Upstream timeouts set per service and overridden per route."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.client import parse_responses
from support.gateway import running_gateway
from support.upstream import Received, RecordingUpstream, Reply


async def test_upstream_that_stops_reading_the_body_gets_504_after_write_timeout(
    tmp_path: Path,
) -> None:
    stalled = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.set()
        await asyncio.sleep(3600)  # holds the connection without reading a byte

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = f"""
services:
  - name: up
    url: http://127.0.0.1:{port}
    write_timeout: 0.5s
routes:
  - name: upload
    service: up
    paths: [/upload]
"""
    size = 256 * 1024 * 1024  # far beyond what the socket buffers can absorb
    try:
        async with running_gateway(tmp_path, config) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
            )

            async def send_body() -> None:
                block = b"x" * 65536
                try:
                    for _ in range(size // len(block)):
                        writer.write(block)
                        await writer.drain()
                except ConnectionError:
                    pass

            sender = asyncio.create_task(send_body())
            loop = asyncio.get_running_loop()
            started = loop.time()
            raw = b""
            async with asyncio.timeout(15):
                while not parse_responses(raw):
                    raw += await reader.read(65536)
            elapsed = loop.time() - started
            sender.cancel()
            writer.close()
            (response,) = parse_responses(raw)
            assert response.status == 504
            assert response.json()["error"]["code"] == "upstream_timeout"  # type: ignore[index]
            assert stalled.is_set()
            assert elapsed < 10
    finally:
        server.close()


async def test_route_connect_timeout_overrides_the_service(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def hold(req: Received, reply: Reply) -> None:
        await release.wait()
        reply.send(200, body=b"done")

    async with RecordingUpstream(hold) as upstream:
        config = f"""
services:
  - name: up
    url: {upstream.url}
    connect_timeout: 60s
    pool: {{max_per_host: 1}}
routes:
  - name: slow
    service: up
    paths: [/slow]
  - name: quick
    service: up
    paths: [/quick]
    connect_timeout: 0.3s
"""
        async with running_gateway(tmp_path, config) as gw:
            _busy_r, busy_w = await asyncio.open_connection("127.0.0.1", gw.port)
            busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await upstream.request_arrived.wait()  # the only connection is now in use
            r, w = await asyncio.open_connection("127.0.0.1", gw.port)
            w.write(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(10):
                raw = b""
                while not parse_responses(raw):
                    raw += await r.read(65536)
            (response,) = parse_responses(raw)
            assert response.status == 504
            release.set()
            w.close()
            busy_w.close()

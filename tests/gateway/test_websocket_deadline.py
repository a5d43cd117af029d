"""After one episode of upstream write back-pressure, an open WebSocket relay gets
the upstream *read* timeout as its idle timeout instead of websocket_idle_timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.gateway import running_gateway

CFG = """
services:
  - name: ws
    url: http://127.0.0.1:{port}
    read_timeout: 1
    write_timeout: 30
routes:
  - name: ws
    service: ws
    paths: [/ws]
"""


async def test_relay_idle_timeout_survives_upstream_backpressure(tmp_path: Path) -> None:
    reading = asyncio.Event()
    got = 0
    total = 8 * 1024 * 1024

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal got
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        )
        await writer.drain()
        await reading.wait()  # stall: the gateway's writes to us back up
        while got < total:
            chunk = await reader.read(1 << 20)
            if not chunk:
                return
            got += len(chunk)
        await reader.read()  # hold the connection open

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_gateway(tmp_path, CFG.format(port=port)) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            writer.write(b"x" * total)
            await asyncio.sleep(0.5)
            conn = next(iter(gw.plane.connections))
            print("deadline kind while stalled:", conn.deadline_kind)
            reading.set()
            await writer.drain()
            async with asyncio.timeout(10):
                while got < total:
                    await asyncio.sleep(0.05)
            print("deadline kind after:", conn.deadline_kind)
            # Quiet for a few seconds: well below websocket_idle_timeout (3600 s).
            try:
                async with asyncio.timeout(3):
                    data = await reader.read(100)
                closed = data == b""
            except TimeoutError:
                closed = False
            writer.close()
            assert not closed, "relay closed after read_timeout of idleness"
    finally:
        server.close()

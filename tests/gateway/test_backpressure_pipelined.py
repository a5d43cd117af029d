"""Client write back-pressure that begins while an exchange completes (its last
upstream read crossed the high-water mark) is never applied to the next pipelined
exchange's upstream: that response is buffered in gateway memory without bound."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from support.gateway import api_config, running_gateway

SMALL = 200 * 1024
BIG = 64 * 1024 * 1024


async def test_backpressure_reaches_next_pipelined_exchange(tmp_path: Path) -> None:
    sent_big = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent_big
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/big" in head.split(b"\r\n", 1)[0]:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
                    block = b"b" * 65536
                    while sent_big < BIG:
                        writer.write(block)
                        sent_big += len(block)
                        await writer.drain()  # honours the gateway's back-pressure
                else:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % SMALL + b"s" * SMALL
                    )
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_gateway(tmp_path, api_config(f"http://127.0.0.1:{port}")) as gw:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gw.port))
            sock.setblocking(False)
            reqs = b"".join(b"GET /api/s%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(20))
            reqs += b"GET /api/big HTTP/1.1\r\nHost: a\r\n\r\n"
            sock.sendall(reqs)
            # The client reads nothing: give a runaway buffer time to show (this
            # waits for an absence, so there is no event to wait on instead).
            await asyncio.sleep(3)
            buffered = sum(c.transport.get_write_buffer_size() for c in gw.plane.connections)
            sock.close()
            assert buffered < 4 * 1024 * 1024, f"the gateway buffered {buffered >> 20} MiB"
    finally:
        server.close()

"""A pipelined request whose body was buffered past BODY_BUFFER (reading paused
with PAUSE_BODY) and that the gateway then answers itself (404 here; 401/429/403
from plugins alike) never resumes reading: the connection is kept alive but the
client's next request is never read."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support.client import parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply, echo


async def test_next_request_is_read_after_gateway_answer(tmp_path: Path) -> None:
    async def slow(req: Received, reply: Reply) -> None:
        await asyncio.sleep(0.3)
        await echo(req, reply)

    async with (
        RecordingUpstream(slow) as up,
        running_gateway(tmp_path, api_config(up.url)) as gw,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = b"x" * (100 * 1024)
        writer.write(
            b"GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /nowhere HTTP/1.1\r\nHost: a\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )
        data = b""
        async with asyncio.timeout(5):
            while len(parse_responses(data)) < 2:
                data += await reader.read(65536)
        assert [r.status for r in parse_responses(data)] == [200, 404]
        # Keep-alive: the next request must be answered.
        writer.write(b"GET /api/next HTTP/1.1\r\nHost: a\r\n\r\n")
        try:
            async with asyncio.timeout(5):
                while len(parse_responses(data)) < 3:
                    chunk = await reader.read(65536)
                    assert chunk, "closed"
                    data += chunk
        finally:
            writer.close()

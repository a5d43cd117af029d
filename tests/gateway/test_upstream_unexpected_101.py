"""A 101 to a request that asked for no upgrade. The bytes after it must never
reach the client: on the raw-head path they are relayed verbatim instead of a 502;
on the full path a 502 goes out, and then the same bytes follow it on the
kept-alive connection (a response the client will take for its next request's)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from support.client import parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply


@pytest.mark.parametrize("plugins", ["", "plugins:\n  - name: security-headers"])
async def test_unexpected_101_is_a_502_and_nothing_else(tmp_path: Path, plugins: str) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.raw(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n"
            b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\nset-cookie: session=attacker\r\n\r\nspoofed"
        )

    async with (
        RecordingUpstream(handler) as up,
        running_gateway(
            tmp_path,
            api_config(up.url, plugins),
        ) as gw,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /api/a HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        try:
            async with asyncio.timeout(1.5):
                while chunk := await reader.read(65536):
                    data += chunk
        except TimeoutError:
            pass
        writer.close()
        rs = parse_responses(data)
        assert [r.status for r in rs] == [502], data

"""Response heads taken as bytes (no response plugins) and as a header list
(with one): interim answers, split packets, Connection-named headers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from support.client import exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply

RESP = [
    # llhttp tolerates empty lines before the status line.
    b"\r\nHTTP/1.1 200 OK\r\nx-keep: k\r\ncontent-length: 4\r\n\r\nbody",
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nCONNECTION: X-Secret, keep-alive\r\nX-SECRET: s\r\nx-keep: k\r\n"
    b"Content-LENGTH: 4\r\n\r\nbody",
    b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nx-keep: k\r\nConnection:  x-secret \r\nx-secret: s\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nx-keep: k\r\nkeep-alive: timeout=5\r\nconnection: keep-alive\r\n"
    b"content-length: 4\r\n\r\nbody",
    b"HTTP/1.0 200 OK\r\nx-keep: k\r\n\r\nbody",
]


@pytest.mark.parametrize("split", [0, 1, 7, 30])
@pytest.mark.parametrize("idx", range(len(RESP)))
@pytest.mark.parametrize("plugins", ["", "plugins:\n  - name: security-headers"])
async def test_raw_variants(tmp_path: Path, split: int, idx: int, plugins: str) -> None:
    resp = RESP[idx]

    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        if split == 0:
            reply.raw(resp)
        else:
            for i in range(0, len(resp), split):
                reply.raw(resp[i : i + split])
                await asyncio.sleep(0.001)
        if resp.startswith(b"HTTP/1.0"):
            reply.close()

    async with (
        RecordingUpstream(handler) as up,
        running_gateway(tmp_path, api_config(up.url, plugins)) as gw,
    ):
        for _ in range(2):
            raw = await exchange_raw(
                gw.port, b"GET /api/a HTTP/1.1\r\nHost: a\r\n\r\n", expect=1, timeout=3
            )
            rs = parse_responses(raw)
            assert len(rs) == 1, raw
            r = rs[0]
            assert r.status == 200, raw
            assert r.body == b"body", raw
            assert r.header("x-keep") == "k", raw
            assert r.header("x-secret") is None, raw
            assert r.header("keep-alive") is None, raw

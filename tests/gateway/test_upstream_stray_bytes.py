"""A pooled upstream connection is reused while its parser holds the start of an
unsolicited next response: the next client's response is corrupted by it."""

from __future__ import annotations

from pathlib import Path

from support.client import exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply

# A response plugin, so that the full (header-list) path reads the head.
PLUGINS = "plugins:\n  - name: security-headers\n"


async def test_trailing_bytes_after_response_poison_pooled_connection(tmp_path: Path) -> None:
    count = 0

    async def handler(req: Received, reply: Reply) -> None:
        nonlocal count
        await req.complete.wait()
        count += 1
        if count == 1:
            # A complete response, then (same write) the start of an unsolicited
            # one: a buggy upstream, or a response to someone else's request.
            reply.raw(
                b"HTTP/1.1 200 X\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nx-injected: yes"
            )
        else:
            reply.raw(b"HTTP/1.1 404 X\r\ncontent-length: 3\r\n\r\nnop")

    async with (
        RecordingUpstream(handler) as up,
        running_gateway(tmp_path, api_config(up.url, PLUGINS)) as gw,
    ):
        r1 = parse_responses(
            await exchange_raw(gw.port, b"GET /api/a HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        )
        assert r1[0].body == b"ok"
        raw2 = await exchange_raw(
            gw.port, b"GET /api/b HTTP/1.1\r\nHost: b\r\n\r\n", expect=1, timeout=3
        )
        r2 = parse_responses(raw2)
        # The second client must get the upstream's 404 "nop" (or a 502), never
        # headers from the bytes left over on the first response's connection.
        assert len(r2) == 1, raw2
        assert r2[0].header("x-injected") is None, raw2
        assert r2[0].status in (404, 502), raw2

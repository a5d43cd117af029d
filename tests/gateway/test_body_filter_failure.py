"""A body filter whose finish() raises (a plugin bug) at the end of an upstream
body: the exchange is never told, and the client hangs until the read timeout."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from support.client import parse_responses
from support.gateway import running_gateway
from support.upstream import RecordingUpstream
from tollway.gateway.context import RequestContext, ResponseHead
from tollway.plugins.base import PLUGINS, BodyFilter, Plugin, PluginConfig, register


class _Boom(BodyFilter):
    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        raise RuntimeError("plugin bug")


class _BoomConfig(PluginConfig):
    pass


@register
class BoomAtEnd(Plugin[_BoomConfig]):
    name = "test-boom-at-end"
    priority = 10
    Config = _BoomConfig

    def body_filter(self, ctx: RequestContext, head: ResponseHead) -> BodyFilter | None:
        return _Boom()


CFG = """
services:
  - name: up
    url: {url}
    read_timeout: 20
routes:
  - name: api
    service: up
    paths: [/api]
plugins:
  - name: test-boom-at-end
"""


async def test_body_filter_exception_at_end_does_not_hang(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, CFG.format(url=up.url)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        ended = False
        try:
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    data += chunk
                    if parse_responses(data):
                        break  # a complete response is an answer too
                ended = True  # EOF: the response was cut, the client knows
        except TimeoutError:
            pass
        writer.close()
        assert ended or parse_responses(data), (
            f"client still waiting after {time.monotonic() - t0:.1f}s, got {data!r}"
        )


def teardown_module() -> None:
    PLUGINS.pop("test-boom-at-end", None)

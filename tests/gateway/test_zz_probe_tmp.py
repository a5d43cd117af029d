from pathlib import Path
from support.client import exchange_raw, parse_responses
from support.gateway import running_gateway
from support.upstream import RecordingUpstream, Received, Reply, echo

CFG = """
services:
  - name: up
    url: URL
routes:
  - name: api
    service: up
    paths: [/api]
plugins:
  - name: request-transformer
    config:
      add: {headers: ["x-added:yes"]}
"""

async def test_probe(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        if req.method == "HEAD":
            reply.raw(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n")
            return
        await echo(req, reply)
    async with RecordingUpstream(handler) as up, running_gateway(tmp_path, CFG.replace("URL", up.url)) as gw:
        raw = await exchange_raw(gw.port, b"HEAD /api/x HTTP/1.1\r\nHost: a\r\n\r\nGET /api/y HTTP/1.1\r\nHost: a\r\nConnection: x-added\r\n\r\n", timeout=3)
        print(raw)
        print(up.requests[-1].headers, up.connections)

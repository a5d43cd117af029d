"""WebSocket through the gateway: once the upstream answers 101 the two sockets are
relayed byte for byte, and a close on either side closes the other."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus

from support.client import exchange_raw, parse_responses
from support.gateway import running_gateway
from support.upstream import Received, RecordingUpstream, Reply


@dataclass
class WsUpstream:
    port: int = 0
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    close_codes: list[int | None] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    state = WsUpstream()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        state.paths.append(ws.request.path)
        state.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        try:
            async for message in ws:
                if message == "server-close":
                    await ws.close(4000, "bye from upstream")
                    break
                await ws.send(message)
        finally:
            state.close_codes.append(ws.close_code)
            state.closed.set()

    server: Server = await serve(handler, "127.0.0.1", 0, max_size=None)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


def config_for(url: str, extra: str = "") -> str:
    return f"""
services:
  - name: ws
    url: {url}
routes:
  - name: ws
    service: ws
    paths: [/ws]
{extra}
"""


async def test_text_and_binary_frames_are_echoed(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    async with running_gateway(tmp_path, config_for(ws_upstream.url)) as gw:
        async with asyncio.timeout(10), connect(
            f"ws://127.0.0.1:{gw.port}/ws/echo?room=1", max_size=None
        ) as client:
            await client.send("hello")
            assert await client.recv() == "hello"
            await client.send(b"\x00\x01\xfe\xff")
            assert await client.recv() == b"\x00\x01\xfe\xff"
            big = os.urandom(1024 * 1024)
            await client.send(big)
            assert await client.recv() == big
            for i in range(50):
                await client.send(f"msg {i}")
            assert [await client.recv() for _ in range(50)] == [f"msg {i}" for i in range(50)]
        assert ws_upstream.paths == ["/echo?room=1"]
        headers = ws_upstream.headers[0]
        assert headers["upgrade"].lower() == "websocket"
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert "1.1 tollway" in headers["via"]


async def test_client_close_closes_the_upstream(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    async with running_gateway(tmp_path, config_for(ws_upstream.url)) as gw:
        async with asyncio.timeout(10):
            client = await connect(f"ws://127.0.0.1:{gw.port}/ws")
            await client.send("ping")
            assert await client.recv() == "ping"
            await client.close(4001, "bye from client")
            await ws_upstream.closed.wait()
        assert ws_upstream.close_codes == [4001]


async def test_upstream_close_closes_the_client(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    async with running_gateway(tmp_path, config_for(ws_upstream.url)) as gw:
        async with asyncio.timeout(10):
            client = await connect(f"ws://127.0.0.1:{gw.port}/ws")
            await client.send("server-close")
            with pytest.raises(ConnectionClosed) as info:
                await client.recv()
            await client.wait_closed()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 4000
        assert info.value.rcvd.reason == "bye from upstream"


async def test_upstream_dropping_tcp_closes_the_client(tmp_path: Path) -> None:
    """No close frame at all: the client's TCP connection must still end."""
    drop = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await ws.recv()
        drop.set()
        ws.transport.abort()

    server = await serve(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_gateway(tmp_path, config_for(f"http://127.0.0.1:{port}")) as gw:
            async with asyncio.timeout(10):
                client = await connect(f"ws://127.0.0.1:{gw.port}/ws")
                await client.send("anything")
                await drop.wait()
                with pytest.raises(ConnectionClosed):
                    await client.recv()
                await client.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def masked_frame(payload: bytes, opcode: int = 1) -> bytes:
    mask = b"\x11\x22\x33\x44"
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def test_frames_sent_before_the_101_reach_the_upstream(
    tmp_path: Path, ws_upstream: WsUpstream
) -> None:
    async with running_gateway(tmp_path, config_for(ws_upstream.url)) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"\r\n" + masked_frame(b"early bird")
            )
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 ")
                assert b"s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
                frame = await reader.readexactly(2 + len(b"early bird"))
            assert frame == b"\x81\x0aearly bird"
        finally:
            writer.close()


async def test_upgrade_refused_with_200_gets_the_200_then_close(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        reply.send(200, [("content-type", "text/plain")], b"no websockets here")

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        # No `expect`: read until the gateway closes (a timeout fails the test).
        raw = await exchange_raw(
            gw.port,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            timeout=5,
        )
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert resp.body == b"no websockets here"
        assert resp.header("connection") == "close"
        assert up.requests[0].header("upgrade") == "websocket"


async def test_upgrade_refused_with_200_via_websocket_client(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        reply.send(200, [("content-type", "text/plain")], b"plain http")

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(10):
                await connect(f"ws://127.0.0.1:{gw.port}/ws")
        assert info.value.response.status_code == 200
        assert info.value.response.body == b"plain http"


async def test_upgrade_goes_through_access_plugins(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    extra = """
plugins:
  - name: ip-restriction
    route: ws
    config: {deny: [127.0.0.1]}
"""
    async with running_gateway(tmp_path, config_for(ws_upstream.url, extra)) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(10):
                await connect(f"ws://127.0.0.1:{gw.port}/ws")
        response = info.value.response
        assert response.status_code == 403
        body = json.loads(response.body or b"")
        assert body["responseStatus"] == "error"
        assert body["error"]["code"] == "ip_forbidden"
        assert ws_upstream.paths == []


async def test_upgrade_on_unknown_route_is_404(tmp_path: Path, ws_upstream: WsUpstream) -> None:
    async with running_gateway(tmp_path, config_for(ws_upstream.url)) as gw:
        with pytest.raises(InvalidStatus) as info:
            async with asyncio.timeout(10):
                await connect(f"ws://127.0.0.1:{gw.port}/elsewhere")
        assert info.value.response.status_code == 404
        assert ws_upstream.paths == []

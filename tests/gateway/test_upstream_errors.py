"""Upstream failures as the client sees them, and what the keep-alive pool does after.

Every failure before the response starts is a gateway envelope (502 or 504); after
it started, the only honest signal left is cutting the client connection. A pooled
connection is reused only after a clean exchange, and a stale one is replaced
transparently only when resending cannot do harm.

Not covered: connect_timeout against an address that never answers. On loopback a
closed port refuses at once and a full listen backlog behaves differently across
kernels (SYN dropped or reset), so there is no reliable local blackhole; the pool's
wait bound (which shares connect_timeout) is tested instead.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from support.client import closed_by_server, exchange_raw, parse_responses
from support.gateway import free_port, running_gateway
from support.upstream import Received, RecordingUpstream, Reply, echo

GET = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"


def config_for(url: str, service: str = "", route: str = "") -> str:
    return f"""
services:
  - name: up
    url: {url}
    read_timeout: 0.5s
{service}
routes:
  - name: api
    service: up
    paths: [/api]
{route}
"""


def envelope(raw: bytes, status: int, code: str) -> dict[str, Any]:
    (resp,) = parse_responses(raw)
    assert resp.status == status, resp.body
    body = resp.json()
    assert isinstance(body, dict)
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    assert body["error"]["code"] == code
    return body


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


# ---- failures before a response --------------------------------------------------------


async def test_nothing_listening_is_502_unavailable(tmp_path: Path) -> None:
    port = free_port()
    async with running_gateway(tmp_path, config_for(f"http://127.0.0.1:{port}")) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        body = envelope(raw, 502, "upstream_unavailable")
        assert body["error"]["details"] == {"upstream": f"127.0.0.1:{port}"}


async def test_upstream_closing_without_answer_is_502(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        reply.close()

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        envelope(raw, 502, "upstream_unavailable")
        assert len(up.requests) == 1


async def _reset(reply: Reply) -> None:
    reply.abort()


async def _garbage(reply: Reply) -> None:
    reply.raw(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


async def _malformed_header(reply: Reply) -> None:
    reply.raw(b"HTTP/1.1 200 OK\r\nContent-Length: 12, 13\r\n\r\nhello")


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (_reset, "upstream_unavailable"),
        (_garbage, "upstream_bad_response"),
        (_malformed_header, "upstream_bad_response"),
    ],
    ids=["reset-without-answer", "garbage", "malformed-header"],
)
async def test_broken_answer_is_502(
    tmp_path: Path, answer: Callable[[Reply], Awaitable[None]], code: str
) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        await answer(reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        envelope(raw, 502, code)


async def test_silent_upstream_is_504_after_read_timeout(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        await never.wait()

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        start = time.monotonic()
        raw = await exchange_raw(gw.port, GET, expect=1)
        elapsed = time.monotonic() - start
        envelope(raw, 504, "upstream_timeout")
        assert 0.45 <= elapsed < 2.0, elapsed


async def test_route_read_timeout_overrides_the_service(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        await never.wait()

    config = config_for("http://127.0.0.1:1", route="    read_timeout: 1.2s")
    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config.replace("http://127.0.0.1:1", up.url)
    ) as gw:
        start = time.monotonic()
        raw = await exchange_raw(gw.port, GET, expect=1)
        elapsed = time.monotonic() - start
        envelope(raw, 504, "upstream_timeout")
        assert 1.15 <= elapsed < 3.0, elapsed


async def test_slow_but_steady_body_is_not_cut(tmp_path: Path) -> None:
    """read_timeout is between reads, not for the whole response."""

    async def handler(req: Received, reply: Reply) -> None:
        reply.head(200, [("content-length", "8")])
        for _ in range(8):
            await asyncio.sleep(0.2)  # the upstream's pace, not a wait for a condition
            reply.raw(b"x")

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert resp.body == b"x" * 8


async def test_stall_mid_body_cuts_the_client_connection(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        reply.head(200, [("content-length", "1000")])
        reply.raw(b"partial")
        await never.wait()

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(GET)
            start = time.monotonic()
            got = b""
            async with asyncio.timeout(5):
                while b"partial" not in got:
                    data = await reader.read(65536)
                    assert data
                    got += data
            assert got.startswith(b"HTTP/1.1 200 ")
            try:
                closed = await closed_by_server(reader, timeout=3.0)
            except ConnectionResetError:
                closed = True  # an abort may reach the client as a reset
            assert closed
            elapsed = time.monotonic() - start
            assert 0.45 <= elapsed < 3.0, elapsed
        finally:
            writer.close()
        # The upstream connection is dropped too, not left hanging.
        await wait_for(lambda: up.open_connections == 0)


async def test_pool_wait_bounded_by_connect_timeout(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        await release.wait()
        reply.send(200, body=b"done")

    service = "    connect_timeout: 0.3s\n    read_timeout: 5s\n    pool: {max_per_host: 1}"
    config = f"""
services:
  - name: up
    url: URL
{service}
routes:
  - name: api
    service: up
    paths: [/api]
"""
    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config.replace("URL", up.url)
    ) as gw:
        first = asyncio.create_task(exchange_raw(gw.port, GET, expect=1))
        await wait_for(lambda: len(up.requests) == 1)
        start = time.monotonic()
        raw = await exchange_raw(gw.port, GET, expect=1)
        elapsed = time.monotonic() - start
        envelope(raw, 504, "upstream_timeout")
        assert 0.25 <= elapsed < 2.0, elapsed
        release.set()
        (resp,) = parse_responses(await first)
        assert resp.status == 200
        assert up.connections == 1


# ---- the keep-alive pool ---------------------------------------------------------------


def closes_reused_connections(count: list[int]) -> Callable[[Received, Reply], Any]:
    """A handler that answers the first request on a connection, and drops the
    connection when a second one arrives on it: an upstream whose idle timer fired
    just as the gateway reused the connection."""
    seen: set[int] = set()

    async def handler(req: Received, reply: Reply) -> None:
        count[0] += 1
        if req.connection_id in seen:
            reply.close()
            return
        seen.add(req.connection_id)
        await echo(req, reply)

    return handler


async def test_stale_pooled_connection_is_replaced_for_get(tmp_path: Path) -> None:
    count = [0]
    async with RecordingUpstream(closes_reused_connections(count)) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        for _ in range(3):
            raw = await exchange_raw(gw.port, GET, expect=1)
            assert parse_responses(raw)[0].status == 200
        # Each GET after the first met a stale connection and was resent on a new one.
        assert count[0] == 5
        assert up.connections == 3


async def test_stale_pooled_connection_does_not_resend_post(tmp_path: Path) -> None:
    count = [0]
    async with RecordingUpstream(closes_reused_connections(count)) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        assert parse_responses(await exchange_raw(gw.port, GET, expect=1))[0].status == 200
        raw = await exchange_raw(
            gw.port,
            b"POST /api/order HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
            expect=1,
        )
        envelope(raw, 502, "upstream_unavailable")
        assert [r.method for r in up.requests] == ["GET", "POST"]


async def test_stale_pooled_connection_resends_bodyless_post_with_idempotency_key(
    tmp_path: Path,
) -> None:
    count = [0]
    async with RecordingUpstream(closes_reused_connections(count)) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        assert parse_responses(await exchange_raw(gw.port, GET, expect=1))[0].status == 200
        raw = await exchange_raw(
            gw.port,
            b"POST /api/retry HTTP/1.1\r\nHost: a\r\nIdempotency-Key: k-1\r\n\r\n",
            expect=1,
        )
        assert parse_responses(raw)[0].status == 200
        assert [r.method for r in up.requests] == ["GET", "POST", "POST"]


async def test_connection_closed_by_upstream_while_idle_is_not_an_error(tmp_path: Path) -> None:
    replies: list[Reply] = []

    async def handler(req: Received, reply: Reply) -> None:
        replies.append(reply)
        await echo(req, reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        assert parse_responses(await exchange_raw(gw.port, GET, expect=1))[0].status == 200
        replies[0].close()
        await wait_for(lambda: up.open_connections == 0)
        for method in (b"GET", b"DELETE"):
            raw = await exchange_raw(
                gw.port, method + b" /api/x HTTP/1.1\r\nHost: a\r\n\r\n", expect=1
            )
            assert parse_responses(raw)[0].status == 200
        assert up.connections == 2


async def test_connection_not_reused_after_a_timeout(tmp_path: Path) -> None:
    """A late answer on a timed-out connection must never reach the next request."""
    late = asyncio.Event()
    late_sent = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/slow":
            await late.wait()
            reply.send(200, body=b"LATE ANSWER")
            late_sent.set()
            return
        await echo(req, reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /api/slow HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        envelope(raw, 504, "upstream_timeout")
        late.set()
        raw = await exchange_raw(gw.port, b"GET /api/fast HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert b"LATE ANSWER" not in raw
        assert up.connections == 2


async def test_connection_not_reused_after_bad_response(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/bad":
            reply.raw(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
            return
        await echo(req, reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /api/bad HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        envelope(raw, 502, "upstream_bad_response")
        raw = await exchange_raw(gw.port, GET, expect=1)
        assert parse_responses(raw)[0].status == 200
        assert up.connections == 2


async def test_connection_not_reused_when_upstream_answered_before_reading_the_body(
    tmp_path: Path,
) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        if req.method == "POST":
            # Answer at once, without reading the body: what is left of it is still
            # on its way on this connection.
            reply.send(413, [("content-type", "text/plain")], b"too big for me")
            return
        await echo(req, reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"POST /api/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n"
                + b"a" * 1000
            )
            got = b""
            async with asyncio.timeout(5):
                while not parse_responses(got):
                    data = await reader.read(65536)
                    assert data
                    got += data
        finally:
            writer.close()
        (resp,) = parse_responses(got)
        assert resp.status == 413
        assert resp.body == b"too big for me"
        raw = await exchange_raw(gw.port, GET, expect=1)
        assert parse_responses(raw)[0].status == 200
        assert up.connections == 2
        assert up.parse_errors == 0


async def test_connection_not_reused_after_client_left_mid_response(tmp_path: Path) -> None:
    more = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        if req.target == "/big":
            reply.head(200, [("content-length", "100000")])
            reply.raw(b"a" * 1000)
            await more.wait()
            reply.raw(b"b" * 99000)
            return
        await echo(req, reply)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url, service="    read_timeout: 5s")
        .replace("    read_timeout: 0.5s\n", "")
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /api/big HTTP/1.1\r\nHost: a\r\n\r\n")
        got = b""
        async with asyncio.timeout(5):
            while b"a" * 1000 not in got:
                data = await reader.read(65536)
                assert data
                got += data
        # Leave with a reset: the gateway learns at once that nobody reads any more.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()
        # The gateway drops the half-read upstream connection.
        await wait_for(lambda: up.open_connections == 0)
        more.set()
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert b"bbbb" not in raw
        assert up.connections == 2


async def test_connection_not_reused_after_upstream_says_close(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        # Says close but leaves the socket open: only the header tells the gateway.
        reply.send(200, [("connection", "close")], b"bye")

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        for _ in range(2):
            raw = await exchange_raw(gw.port, GET, expect=1)
            (resp,) = parse_responses(raw)
            assert resp.status == 200 and resp.body == b"bye"
        assert up.connections == 2
        assert len(up.requests) == 2

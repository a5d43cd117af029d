"""The data plane as an HTTP/1.1 server: keep-alive, pipelining, chunked bodies,
Expect, HTTP/1.0, HEAD, limits, timeouts, trailers and path normalization.

Everything goes through real loopback sockets: raw bytes from the client side, a
RecordingUpstream on the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.client import exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Handler, Received, RecordingUpstream, Reply, echo

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 5.0
H = b"Host: h\r\n"


def config_for(upstream: RecordingUpstream, other: RecordingUpstream | None = None) -> str:
    other_service = f"""
  - name: other
    url: {other.url}""" if other else ""
    other_route = """
  - name: public
    service: other
    paths: [/public]
    strip_path: false""" if other else ""
    return f"""
services:
  - name: up
    url: {upstream.url}{other_service}
routes:
  - name: api
    service: up
    paths: [/api]
    strip_path: false
  - name: admin
    service: up
    paths: [/admin]
    strip_path: false{other_route}
"""


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, handler: Handler = echo, **settings: Any
) -> AsyncIterator[tuple[int, RecordingUpstream]]:
    async with (
        RecordingUpstream(handler) as upstream,
        running_gateway(tmp_path, config_for(upstream), **settings) as gw,
    ):
        yield gw.port, upstream


@dataclass
class Client:
    """One raw client connection, reading responses as they come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    buf: bytearray

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_until(self, done: Callable[[bytes], bool],
                         timeout: float = IO_TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            while not done(bytes(self.buf)):
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                self.buf += chunk
        return bytes(self.buf)

    async def responses(self, n: int, timeout: float = IO_TIMEOUT) -> list[Any]:
        raw = await self.read_until(lambda b: len(parse_responses(b)) >= n, timeout)
        got = parse_responses(raw)
        assert len(got) >= n, raw
        return got

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def closed(self, timeout: float = IO_TIMEOUT) -> bool:
        """True when the server closes; bytes read meanwhile are kept."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        chunk = await self.reader.read(65536)
                    except ConnectionResetError:
                        return True
                    if not chunk:
                        return True
                    self.buf += chunk
        except TimeoutError:
            return False


@contextlib.asynccontextmanager
async def client(port: int) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Client(reader, writer, bytearray())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def wait_for(cond: Callable[[], bool], timeout: float = IO_TIMEOUT) -> None:
    """Poll a condition of the in-process servers until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)  # polling a counter with a deadline


def target_of(resp: Any) -> str:
    body = json.loads(resp.body)
    assert isinstance(body, dict)
    return str(body["target"])


def error_code(resp: Any) -> str:
    body = resp.json()
    assert body["responseStatus"] == "error"
    return str(body["error"]["code"])


# ---- keep-alive and pipelining ------------------------------------------------------

async def test_keep_alive_reuses_client_and_upstream_connections(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream), client(port) as c:
        for i in range(3):
            await c.send(b"GET /api/k%d HTTP/1.1\r\n" % i + H + b"\r\n")
            (resp,) = await c.responses(1)
            c.take()
            assert resp.status == 200
            assert resp.header("connection") is None
            assert target_of(resp) == f"/api/k{i}"
        # A second client connection still uses the pooled upstream connection.
        raw = await exchange_raw(port, b"GET /api/other HTTP/1.1\r\n" + H + b"\r\n", expect=1)
        assert parse_responses(raw)[0].status == 200
        assert upstream.connections == 1
        assert {r.connection_id for r in upstream.requests} == {1}


async def test_pipelined_responses_keep_request_order(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def slow_first(req: Received, reply: Reply) -> None:
        if req.target == "/api/p0":
            await release.wait()
        await echo(req, reply)

    async with gateway(tmp_path, slow_first) as (port, upstream), client(port) as c:
        await c.send(b"".join(b"GET /api/p%d HTTP/1.1\r\n" % i + H + b"\r\n"
                              for i in range(10)))
        await wait_for(lambda: any(r.target == "/api/p0" for r in upstream.requests))
        release.set()
        responses = await c.responses(10)
        assert [r.status for r in responses] == [200] * 10
        assert [target_of(r) for r in responses] == [f"/api/p{i}" for i in range(10)]


async def test_large_pipeline_in_one_write_is_not_mistaken_for_huge_headers(
    tmp_path: Path,
) -> None:
    """40 small requests in one packet add up to more than the header limit."""
    pad = b"X-Pad: " + b"p" * 1000 + b"\r\n"
    async with gateway(tmp_path, max_header_bytes=4096, max_uri_length=1024) as (port, _):
        data = b"".join(b"GET /api/q%d HTTP/1.1\r\n" % i + H + pad + b"\r\n"
                        for i in range(40))
        raw = await exchange_raw(port, data, expect=40, timeout=10)
        responses = parse_responses(raw)
        assert [r.status for r in responses] == [200] * 40


async def test_body_in_the_same_packet_as_the_head_is_not_counted_as_headers(
    tmp_path: Path,
) -> None:
    body = b"b" * 200_000
    async with gateway(tmp_path) as (port, upstream):
        data = b"POST /api/big HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(body)
        raw = await exchange_raw(port, data + body, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert bytes(upstream.requests[0].body) == body


async def test_refusal_queued_behind_a_slow_request_waits_its_turn(tmp_path: Path) -> None:
    """A chunked body over the limit on a pipelined request: 200 first, then 413."""
    release = asyncio.Event()

    async def slow(req: Received, reply: Reply) -> None:
        await release.wait()
        await echo(req, reply)

    async with gateway(tmp_path, slow, max_body_size=100) as (port, upstream), \
            client(port) as c:
        await c.send(
            b"GET /api/slow HTTP/1.1\r\n" + H + b"\r\n"
            + b"POST /api/big HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"c8\r\n" + b"x" * 200 + b"\r\n0\r\n\r\n"
        )
        await wait_for(lambda: len(upstream.requests) == 1)
        release.set()
        assert await c.closed()
        responses = parse_responses(c.take())
        assert [r.status for r in responses] == [200, 413]
        assert target_of(responses[0]) == "/api/slow"
        assert error_code(responses[1]) == "payload_too_large"
        assert [r.target for r in upstream.requests] == ["/api/slow"]


# ---- chunked bodies both ways -------------------------------------------------------

async def test_chunked_request_body_is_forwarded_whole(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream), client(port) as c:
        await c.send(b"POST /api/up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n")
        await c.send(b"5\r\nhello\r\n")
        await wait_for(lambda: bool(upstream.requests) and upstream.requests[0].body_size == 5)
        await c.send(b"1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n")
        (resp,) = await c.responses(1)
        assert resp.status == 200
        (req,) = upstream.requests
        assert bytes(req.body) == b"hello world!"
        assert req.header("transfer-encoding") == "chunked"


async def test_chunked_response_passes_back(tmp_path: Path) -> None:
    async def chunked(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.head(200, [("transfer-encoding", "chunked"), ("x-up", "1")])
        reply.chunk(b"part one, ")
        reply.chunk(b"part two")
        reply.end_chunks()

    async with gateway(tmp_path, chunked) as (port, _), client(port) as c:
        await c.send(b"GET /api/c HTTP/1.1\r\n" + H + b"\r\n")
        (resp,) = await c.responses(1)
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.header("x-up") == "1"
        assert resp.body == b"part one, part two"
        # The connection is still usable.
        c.take()
        await c.send(b"GET /api/c2 HTTP/1.1\r\n" + H + b"\r\n")
        (again,) = await c.responses(1)
        assert again.body == b"part one, part two"


async def test_trailers_in_a_chunked_request_are_not_forwarded(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream):
        data = (b"POST /api/t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                b"Trailer: X-Evil\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Evil: 1\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        raw = await exchange_raw(port, data, expect=1)
        assert parse_responses(raw)[0].status == 200
        (req,) = upstream.requests
        assert bytes(req.body) == b"abc"
        names = [k for k, _ in req.headers]
        assert "x-evil" not in names
        assert "trailer" not in names
        assert req.header_all("x-forwarded-for") == ["127.0.0.1"]


# ---- Expect -------------------------------------------------------------------------

async def test_expect_100_continue(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream), client(port) as c:
        await c.send(b"POST /api/e HTTP/1.1\r\n" + H
                     + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        raw = await c.read_until(lambda b: b"\r\n\r\n" in b)
        assert raw == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert all(r.body_size == 0 for r in upstream.requests)
        c.take()
        await c.send(b"hello")
        (resp,) = await c.responses(1)
        assert resp.status == 200
        assert bytes(upstream.requests[0].body) == b"hello"
        assert upstream.requests[0].header("expect") is None


async def test_unknown_expectation_gets_417(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream), client(port) as c:
        await c.send(b"POST /api/e HTTP/1.1\r\n" + H
                     + b"Expect: something-else\r\nContent-Length: 5\r\n\r\nhello")
        assert await c.closed()
        (resp,) = parse_responses(c.take())
        assert resp.status == 417
        assert error_code(resp) == "expectation_failed"
        assert upstream.requests == []


# ---- HTTP/1.0 and HEAD --------------------------------------------------------------

async def _chunked_upstream(req: Received, reply: Reply) -> None:
    await req.complete.wait()
    reply.head(200, [("transfer-encoding", "chunked")])
    reply.chunk(b"abc")
    reply.chunk(b"def")
    reply.end_chunks()


async def test_http10_client_gets_unchunked_response_and_close(tmp_path: Path) -> None:
    async with gateway(tmp_path, _chunked_upstream) as (port, _), client(port) as c:
        await c.send(b"GET /api/old HTTP/1.0\r\n\r\n")
        assert await c.closed()
        raw = c.take()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower()
        assert body == b"abcdef"


async def test_http10_keep_alive_is_honoured(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream), client(port) as c:
        for i in range(2):
            await c.send(b"GET /api/ka%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
            (resp,) = await c.responses(1)
            assert resp.status == 200
            assert resp.header("connection") == "keep-alive"
            assert resp.header("content-length") is not None
            assert target_of(resp) == f"/api/ka{i}"
            c.take()
        assert len(upstream.requests) == 2


async def test_head_request_gets_headers_only_and_connection_stays_usable(
    tmp_path: Path,
) -> None:
    async def head_aware(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        if req.method == "HEAD":
            reply.head(200, [("content-length", "5"), ("x-kind", "head")])
        else:
            reply.send(200, [("x-kind", "get")], b"hello")

    async with gateway(tmp_path, head_aware) as (port, _), client(port) as c:
        await c.send(b"HEAD /api/h HTTP/1.1\r\n" + H + b"\r\n")
        raw = await c.read_until(lambda b: b"\r\n\r\n" in b)
        head = raw.split(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 200")
        assert b"content-length: 5" in head
        assert b"x-kind: head" in head
        assert b"connection: close" not in head
        c.take()
        await c.send(b"GET /api/h HTTP/1.1\r\n" + H + b"\r\n")
        raw = await c.read_until(lambda b: b"hello" in b)
        # Nothing was left over from the HEAD response: this starts a new response.
        assert raw.startswith(b"HTTP/1.1 200")
        (resp,) = parse_responses(raw)
        assert resp.header("x-kind") == "get"
        assert resp.body == b"hello"


# ---- limits -------------------------------------------------------------------------

async def test_uri_over_limit_gets_414(tmp_path: Path) -> None:
    async with gateway(tmp_path, max_uri_length=100) as (port, upstream), client(port) as c:
        await c.send(b"GET /api/" + b"a" * 200 + b" HTTP/1.1\r\n" + H + b"\r\n")
        assert await c.closed()
        (resp,) = parse_responses(c.take())
        assert resp.status == 414
        assert error_code(resp) == "uri_too_long"
        assert upstream.requests == []


@pytest.mark.parametrize("dribble", [False, True], ids=["one-write", "dribbled"])
async def test_header_block_over_limit_gets_431(tmp_path: Path, dribble: bool) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(12))  # ~2.6 KB
    async with gateway(tmp_path, max_header_bytes=1024) as (port, upstream), \
            client(port) as c:
        data = b"GET /api/x HTTP/1.1\r\n" + H + headers + b"\r\n"
        if dribble:
            for i in range(0, len(data), 100):
                await c.send(data[i:i + 100])
        else:
            await c.send(data)
        assert await c.closed()
        (resp,) = parse_responses(c.take())
        assert resp.status == 431
        assert error_code(resp) == "headers_too_large"
        assert upstream.requests == []


async def test_header_block_under_limit_passes(tmp_path: Path) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(10))  # ~0.6 KB
    async with gateway(tmp_path, max_header_bytes=1024) as (port, upstream):
        raw = await exchange_raw(port, b"GET /api/x HTTP/1.1\r\n" + H + headers + b"\r\n",
                                 expect=1)
        assert parse_responses(raw)[0].status == 200
        assert upstream.requests[0].header("x-h9") == "v" * 50


async def test_too_many_headers_gets_431(tmp_path: Path) -> None:
    async with gateway(tmp_path, max_header_count=10) as (port, upstream), \
            client(port) as c:
        headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(11))
        await c.send(b"GET /api/x HTTP/1.1\r\n" + H + headers + b"\r\n")
        assert await c.closed()
        (resp,) = parse_responses(c.take())
        assert resp.status == 431
        assert error_code(resp) == "headers_too_large"
        assert upstream.requests == []


async def test_content_length_over_limit_gets_413_before_the_body(tmp_path: Path) -> None:
    async with gateway(tmp_path, max_body_size=100) as (port, upstream), client(port) as c:
        # Only the head is sent: the answer must not wait for the body.
        await c.send(b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 101\r\n\r\n")
        (resp,) = await c.responses(1)
        assert resp.status == 413
        assert error_code(resp) == "payload_too_large"
        assert resp.header("connection") == "close"
        assert await c.closed()
        assert upstream.requests == []
        assert upstream.bytes_received == 0


async def test_chunked_body_over_limit_gets_413_and_upstream_is_not_reused(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, max_body_size=100) as (port, upstream):
        async with client(port) as c:
            await c.send(b"POST /api/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                         + b"32\r\n" + b"a" * 50 + b"\r\n")
            await wait_for(lambda: bool(upstream.requests)
                           and upstream.requests[0].body_size == 50)
            await c.send(b"3c\r\n" + b"b" * 60 + b"\r\n")
            (resp,) = await c.responses(1)
            assert resp.status == 413
            assert error_code(resp) == "payload_too_large"
            assert await c.closed()
        assert not upstream.requests[0].complete.is_set()
        raw = await exchange_raw(port, b"GET /api/next HTTP/1.1\r\n" + H + b"\r\n", expect=1)
        assert parse_responses(raw)[0].status == 200
        assert [r.connection_id for r in upstream.requests] == [1, 2]


# ---- timeouts -----------------------------------------------------------------------

async def test_stalled_headers_get_408(tmp_path: Path) -> None:
    async with gateway(tmp_path, header_timeout=0.5) as (port, upstream), client(port) as c:
        start = time.monotonic()
        await c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\nX-Half: ")
        assert await c.closed(timeout=3)
        elapsed = time.monotonic() - start
        (resp,) = parse_responses(c.take())
        assert resp.status == 408
        assert error_code(resp) == "request_timeout"
        assert elapsed >= 0.4
        assert upstream.requests == []


async def test_a_gateway_idle_for_a_while_still_times_out_headers_on_time(
    tmp_path: Path,
) -> None:
    """With no connection the sweeper wakes once a second; the first connection
    brings the 0.1 s sweep back, so its header timeout is not up to a second late."""
    async with (
        RecordingUpstream(echo) as upstream,
        running_gateway(tmp_path, config_for(upstream), header_timeout=0.3) as gw,
    ):
        plane = gw.plane
        assert plane is not None
        await wait_for(lambda: plane.sweeper_idle)
        idle_sweeps = plane.sweeps
        await wait_for(lambda: plane.sweeps > idle_sweeps)  # the next one is 1 s away
        async with client(gw.port) as c:
            start = time.monotonic()
            await c.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\nX-Half: ")
            assert await c.closed(timeout=3)
            elapsed = time.monotonic() - start
            (resp,) = parse_responses(c.take())
        assert resp.status == 408
        assert 0.25 <= elapsed < 0.8


async def test_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with gateway(tmp_path, keepalive_timeout=0.5) as (port, _), client(port) as c:
        await c.send(b"GET /api/x HTTP/1.1\r\n" + H + b"\r\n")
        (resp,) = await c.responses(1)
        assert resp.status == 200
        c.take()
        start = time.monotonic()
        assert await c.closed(timeout=3)
        assert time.monotonic() - start >= 0.4
        assert c.take() == b""  # closed quietly, no error response


async def test_stalled_body_gets_408(tmp_path: Path) -> None:
    async with gateway(tmp_path, body_timeout=0.5) as (port, upstream), client(port) as c:
        await c.send(b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n"
                     + b"z" * 10)
        assert await c.closed(timeout=3)
        (resp,) = parse_responses(c.take())
        assert resp.status == 408
        assert error_code(resp) == "request_timeout"
        assert all(not r.complete.is_set() for r in upstream.requests)


async def test_client_gone_mid_request_does_not_break_the_next_one(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (port, upstream):
        async with client(port) as c:
            await c.send(b"POST /api/x HTTP/1.1\r\n" + H + b"Content-Length: 100\r\n\r\n"
                         + b"z" * 10)
            await wait_for(lambda: bool(upstream.requests)
                           and upstream.requests[0].body_size == 10)
            c.writer.transport.abort()
        await wait_for(lambda: upstream.open_connections == 0)
        assert not upstream.requests[0].complete.is_set()
        raw = await exchange_raw(port, b"GET /api/next HTTP/1.1\r\n" + H + b"\r\n", expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert target_of(resp) == "/api/next"


async def test_client_gone_while_upstream_answers_does_not_break_the_next_one(
    tmp_path: Path,
) -> None:
    release = asyncio.Event()

    async def slow(req: Received, reply: Reply) -> None:
        if req.target == "/api/slow":
            await release.wait()
        await echo(req, reply)

    async with (
        RecordingUpstream(slow) as upstream,
        running_gateway(tmp_path, config_for(upstream)) as gw,
    ):
        port = gw.port
        async with client(port) as c:
            await c.send(b"GET /api/slow HTTP/1.1\r\n" + H + b"\r\n")
            await wait_for(lambda: bool(upstream.requests))
            c.writer.transport.abort()
        # While the abandoned request still waits on its upstream, others go through.
        for name in (b"next", b"again"):
            raw = await exchange_raw(
                port, b"GET /api/" + name + b" HTTP/1.1\r\n" + H + b"\r\n", expect=1
            )
            (resp,) = parse_responses(raw)
            assert resp.status == 200
            assert target_of(resp) == "/api/" + name.decode()
        release.set()
        # The abandoned answer is dropped with its client connection...
        assert gw.plane is not None
        plane = gw.plane
        await wait_for(lambda: not plane.connections)
        # ...and the pooled upstream connections still serve cleanly.
        for i in range(3):
            raw = await exchange_raw(port, b"GET /api/last%d HTTP/1.1\r\n" % i + H + b"\r\n",
                                     expect=1)
            (resp,) = parse_responses(raw)
            assert resp.status == 200
            assert target_of(resp) == f"/api/last{i}"
        assert upstream.parse_errors == 0


# ---- path normalization -------------------------------------------------------------

@pytest.mark.parametrize(
    ("target", "routed"),
    [
        (b"/public/../admin/x", "/admin/x"),
        (b"/public/%2e%2e/admin/x", "/admin/x"),
        (b"/public/%2E%2E/admin/x", "/admin/x"),
        (b"/public/./../admin/x", "/admin/x"),
        (b"/public/a/../../admin/x", "/admin/x"),
        (b"/%61dmin/x", "/admin/x"),
    ],
)
async def test_dot_segments_are_resolved_before_routing(
    tmp_path: Path, target: bytes, routed: str
) -> None:
    async with (
        RecordingUpstream() as admin,
        RecordingUpstream() as public,
        running_gateway(tmp_path, config_for(admin, public)) as gw,
    ):
        raw = await exchange_raw(gw.port, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n",
                                 expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert [r.target for r in admin.requests] == [routed]
        assert public.requests == []


async def test_encoded_slash_is_not_a_segment_separator(tmp_path: Path) -> None:
    async with (
        RecordingUpstream() as admin,
        RecordingUpstream() as public,
        running_gateway(tmp_path, config_for(admin, public)) as gw,
    ):
        raw = await exchange_raw(
            gw.port, b"GET /public/..%2fadmin/x HTTP/1.1\r\n" + H + b"\r\n", expect=1
        )
        assert parse_responses(raw)[0].status == 200
        assert [r.target for r in public.requests] == ["/public/..%2Fadmin/x"]
        assert admin.requests == []


async def test_oversized_trailers_are_refused(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, api_config(upstream.url), max_header_bytes=2048
    ) as gw:
        trailer = b"X-Pad: " + b"a" * 4096 + b"\r\n"
        raw = await exchange_raw(
            gw.port,
            b"POST /api/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n",
        )
        (response,) = parse_responses(raw)
        assert response.status == 400
        assert response.header("connection") == "close"

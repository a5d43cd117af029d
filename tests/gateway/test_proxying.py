"""What the proxy does to a request and its response on the way through.

Bodies stream both ways (a 100 MB upload and download through a real `tollway
serve` process whose memory must stay flat), hop-by-hop headers are dropped in both
directions, the forwarding headers are ours unless the peer is a trusted proxy, and
everything else (status, reason, headers, query) passes through untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from support.client import exchange_raw, parse_responses
from support.gateway import GatewayProcess, running_gateway
from support.upstream import Received, RecordingUpstream, Reply

MB = 1024 * 1024
BIG = 100 * MB
CHUNK = 64 * 1024


def config_for(url: str, route: str = "", top: str = "") -> str:
    return f"""
{top}
services:
  - name: up
    url: {url}
routes:
  - name: api
    service: up
    paths: [/api]
{route}
"""


def only(req: Received, name: str) -> str:
    values = req.header_all(name)
    assert len(values) == 1, (name, values)
    return values[0]


# ---- streaming and memory ---------------------------------------------------------


def rss_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


async def stream_download_server(size: int) -> tuple[asyncio.Server, int]:
    """An upstream that answers every request with `size` bytes, honouring back-pressure
    (RecordingUpstream writes without waiting, which would buffer the body in the test)."""
    block = b"d" * CHUNK

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    return
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                    b"content-length: %d\r\n\r\n" % size
                )
                left = size
                while left:
                    n = min(left, CHUNK)
                    writer.write(block[:n])
                    await writer.drain()
                    left -= n
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def upload(port: int, size: int, chunked: bool = False) -> tuple[int, bytes]:
    """POST `size` bytes generated block by block; returns (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % size
        # As curl does for large bodies: the body waits for the gateway's 100 Continue.
        writer.write(
            b"POST /api/upload HTTP/1.1\r\nhost: gw\r\nexpect: 100-continue\r\n"
            + framing + b"\r\n\r\n"
        )
        block = b"u" * CHUNK
        left = size
        async with asyncio.timeout(120):
            interim = await reader.readuntil(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            while left:
                n = min(left, CHUNK)
                writer.write(b"%x\r\n%b\r\n" % (n, block[:n]) if chunked else block[:n])
                await writer.drain()
                left -= n
            if chunked:
                writer.write(b"0\r\n\r\n")
            raw = b""
            while not parse_responses(raw):
                data = await reader.read(65536)
                assert data, "gateway closed before answering"
                raw += data
        (resp,) = parse_responses(raw)
        return resp.status, resp.body
    finally:
        writer.close()


async def download(port: int) -> tuple[bytes, int]:
    """GET a large body; returns (response head, body byte count); nothing kept."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /api/download HTTP/1.1\r\nhost: gw\r\n\r\n")
        async with asyncio.timeout(120):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            got = 0
            while got < length:
                data = await reader.read(CHUNK)
                assert data, f"closed after {got} of {length} bytes"
                got += len(data)
        return head, got
    finally:
        writer.close()


@pytest.fixture
async def download_upstream() -> AsyncIterator[int]:
    server, port = await stream_download_server(BIG)
    try:
        yield port
    finally:
        server.close()


@pytest.mark.timeout(180)
async def test_100mb_each_way_streams_with_flat_gateway_memory(
    tmp_path: Path, download_upstream: int
) -> None:
    async with RecordingUpstream(store_bodies=False) as up:
        config = tmp_path / "tollway.yaml"
        config.write_text(f"""
services:
  - name: sink
    url: {up.url}
  - name: source
    url: http://127.0.0.1:{download_upstream}
routes:
  - name: upload
    service: sink
    paths: [/api/upload]
  - name: download
    service: source
    paths: [/api/download]
    strip_path: false
""")
        with GatewayProcess(config) as gw:
            assert gw.proc is not None
            # Warm up both paths (pools, parsers, buffers) before the baseline.
            assert (await upload(gw.port, MB))[0] == 200
            assert (await upload(gw.port, MB, chunked=True))[0] == 200
            before = rss_kb(gw.proc.pid)

            status, body = await upload(gw.port, BIG)
            assert status == 200
            assert json.loads(body)["body_size"] == BIG
            status, body = await upload(gw.port, BIG, chunked=True)
            assert status == 200
            assert json.loads(body)["body_size"] == BIG
            assert [r.body_size for r in up.requests] == [MB, MB, BIG, BIG]
            assert up.requests[-1].header("transfer-encoding") == "chunked"

            head, got = await download(gw.port)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert got == BIG

            after = rss_kb(gw.proc.pid)
        growth_mb = (after["VmRSS"] - before["VmRSS"]) / 1024
        peak_growth_mb = (after["VmHWM"] - before["VmHWM"]) / 1024
        assert growth_mb < 30, f"RSS grew {growth_mb:.1f} MB"
        assert peak_growth_mb < 30, f"peak RSS grew {peak_growth_mb:.1f} MB"


async def test_chunked_request_body_stays_chunked_and_intact(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        pieces = [bytes([i]) * (1000 + i) for i in range(50)]
        body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        raw = await exchange_raw(
            gw.port,
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
            expect=1,
        )
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        (req,) = up.requests
        assert req.header("transfer-encoding") == "chunked"
        assert req.header("content-length") is None
        assert bytes(req.body) == b"".join(pieces)


async def test_chunked_response_streams_to_client_chunked(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(req: Received, reply: Reply) -> None:
        reply.head(200, [("transfer-encoding", "chunked"), ("content-type", "text/plain")])
        reply.chunk(b"first;")
        await release.wait()
        reply.chunk(b"second")
        reply.end_chunks()

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(b"GET /api/s HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = b""
            async with asyncio.timeout(5):
                # The first chunk arrives while the upstream is still holding the rest.
                while b"first;" not in raw:
                    data = await reader.read(65536)
                    assert data
                    raw += data
                release.set()
                while not parse_responses(raw):
                    data = await reader.read(65536)
                    assert data
                    raw += data
        finally:
            writer.close()
        (resp,) = parse_responses(raw)
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.header("content-length") is None
        assert resp.body == b"first;second"


async def test_body_delimited_by_close_is_rechunked(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        reply.raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil-the-end")
        reply.close()

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /api/c HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"until-the-end"


async def test_large_response_body_arrives_intact(tmp_path: Path) -> None:
    payload = hashlib.sha256(b"seed").digest() * (4 * MB // 32)

    async def handler(req: Received, reply: Reply) -> None:
        reply.send(200, [("content-type", "application/octet-stream")], payload)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /api/b HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        (resp,) = parse_responses(raw)
        assert resp.header("content-length") == str(len(payload))
        assert hashlib.sha256(resp.body).digest() == hashlib.sha256(payload).digest()


async def test_body_sent_with_the_head_is_not_counted_as_header_bytes(tmp_path: Path) -> None:
    body = b"x" * 100_000
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        raw = await exchange_raw(
            gw.port,
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%b"
            % (len(body), body),
            expect=1,
        )
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert up.requests[0].body_size == len(body)


# ---- hop-by-hop headers -------------------------------------------------------------


async def test_hop_by_hop_headers_removed_both_ways(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.send(
            200,
            [
                ("connection", "x-resp-secret, keep-alive"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authenticate", "Basic realm=up"),
                ("te", "trailers"),
                ("trailer", "x-checksum"),
                ("upgrade", "h2c"),
                ("x-resp-secret", "internal"),
                ("x-end-to-end", "kept"),
            ],
            b"ok",
        )

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(
            gw.port,
            b"GET /api/h HTTP/1.1\r\nHost: a\r\n"
            b"Connection: keep-alive, x-secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: x-checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
            b"X-Secret: for-the-next-hop-only\r\n"
            b"X-End-To-End: kept\r\n\r\n",
            expect=1,
        )
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert resp.body == b"ok"
        (req,) = up.requests
        for name in ("keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                     "proxy-authorization", "x-secret"):
            assert req.header(name) is None, name
        # The gateway speaks for itself to the upstream: no client Connection tokens.
        assert req.header("connection") in (None, "keep-alive")
        assert req.header("x-end-to-end") == "kept"
        for name in ("keep-alive", "proxy-connection", "proxy-authenticate", "te", "trailer",
                     "upgrade", "x-resp-secret"):
            assert resp.header(name) is None, name
        assert resp.header("connection") in (None, "keep-alive")
        assert resp.header("x-end-to-end") == "kept"


# ---- forwarding headers ---------------------------------------------------------------


SPOOFED = (
    b"X-Forwarded-For: 6.6.6.6\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: evil.example\r\n"
    b"X-Forwarded-Port: 1\r\n"
    b"Forwarded: for=6.6.6.6;proto=https\r\n"
)


async def test_forwarding_headers_overwritten_for_untrusted_peer(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        raw = await exchange_raw(
            gw.port,
            b"GET /api/f HTTP/1.1\r\nHost: shop.example:8080\r\n" + SPOOFED + b"\r\n",
            expect=1,
        )
        assert parse_responses(raw)[0].status == 200
        (req,) = up.requests
        assert only(req, "x-forwarded-for") == "127.0.0.1"
        assert only(req, "x-forwarded-proto") == "http"
        assert only(req, "x-forwarded-host") == "shop.example:8080"
        assert only(req, "x-forwarded-port") == str(gw.port)
        assert only(req, "forwarded") == 'for=127.0.0.1;host="shop.example:8080";proto=http'
        assert "6.6.6.6" not in json.dumps(req.headers)
        assert "1.1 tollway" in req.header_all("via")


async def test_forwarding_headers_without_any_from_client(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        await exchange_raw(gw.port, b"GET /api/f HTTP/1.1\r\nHost: plain\r\n\r\n", expect=1)
        (req,) = up.requests
        assert only(req, "x-forwarded-for") == "127.0.0.1"
        assert only(req, "x-forwarded-host") == "plain"
        assert only(req, "forwarded") == "for=127.0.0.1;host=plain;proto=http"
        assert only(req, "via") == "1.1 tollway"


async def test_forwarding_headers_extended_for_trusted_proxy(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, top="trusted_proxies: [127.0.0.1/32]")
    ) as gw:
        raw = await exchange_raw(
            gw.port,
            b"GET /api/f HTTP/1.1\r\nHost: shop.example\r\n"
            b"X-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n"
            b"X-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: www.shop.example\r\n"
            b"X-Forwarded-Port: 443\r\n"
            b"Forwarded: for=203.0.113.7;proto=https\r\n"
            b"Via: 1.1 edge\r\n\r\n",
            expect=1,
        )
        assert parse_responses(raw)[0].status == 200
        (req,) = up.requests
        assert only(req, "x-forwarded-for") == "203.0.113.7, 10.0.0.2, 127.0.0.1"
        assert only(req, "x-forwarded-proto") == "https"
        assert only(req, "x-forwarded-host") == "www.shop.example"
        assert only(req, "x-forwarded-port") == "443"
        forwarded = only(req, "forwarded")
        # The proxy's element is kept; ours describes the hop we received.
        assert forwarded == (
            "for=203.0.113.7;proto=https, for=127.0.0.1;host=shop.example;proto=http"
        )
        via = ", ".join(req.header_all("via"))
        assert via.index("1.1 edge") < via.index("1.1 tollway")


# ---- host, paths, query -------------------------------------------------------------


async def test_host_is_the_target_by_default(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        await exchange_raw(gw.port, b"GET /api/x HTTP/1.1\r\nHost: client.example\r\n\r\n",
                           expect=1)
        assert only(up.requests[0], "host") == f"127.0.0.1:{up.port}"


async def test_preserve_host_sends_the_client_host(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, route="    preserve_host: true")
    ) as gw:
        await exchange_raw(gw.port, b"GET /api/x HTTP/1.1\r\nHost: client.example:81\r\n\r\n",
                           expect=1)
        assert only(up.requests[0], "host") == "client.example:81"


@pytest.mark.parametrize(
    ("base", "strip", "request_path", "expected"),
    [
        ("", "true", "/api/items/7", "/items/7"),
        ("", "true", "/api", "/"),
        ("", "false", "/api/items/7", "/api/items/7"),
        ("/v2", "true", "/api/items/7", "/v2/items/7"),
        ("/v2", "true", "/api", "/v2"),
        ("/v2/", "false", "/api/items", "/v2/api/items"),
    ],
)
async def test_strip_path_and_service_base_path(
    tmp_path: Path, base: str, strip: str, request_path: str, expected: str
) -> None:
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url + base, route=f"    strip_path: {strip}")
    ) as gw:
        raw = await exchange_raw(
            gw.port, b"GET %b HTTP/1.1\r\nHost: a\r\n\r\n" % request_path.encode(), expect=1
        )
        assert parse_responses(raw)[0].status == 200
        assert up.requests[0].target == expected


async def test_query_string_passes_untouched(tmp_path: Path) -> None:
    query = b"a=1&a=2&b=%2F+x&empty=&flag&q=%E2%9C%93&x=a%26b;c"
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url)) as gw:
        await exchange_raw(
            gw.port, b"GET /api/q?%b HTTP/1.1\r\nHost: a\r\n\r\n" % query, expect=1
        )
        assert up.requests[0].target == "/q?" + query.decode()


# ---- responses pass through -----------------------------------------------------------


async def test_upstream_status_reason_and_headers_pass_through(tmp_path: Path) -> None:
    body = b'{"brew":"refused"}'

    async def handler(req: Received, reply: Reply) -> None:
        reply.raw(
            b"HTTP/1.1 418 Short And Stout\r\n"
            b"Content-Type: application/teapot+json\r\n"
            b"X-Custom: one, two\r\n"
            b"Set-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: b=2; HttpOnly\r\n"
            b"Server: kettle/1.0\r\n"
            b"Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n"
            b"ETag: \"abc\"\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /api/tea HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        assert raw.startswith(b"HTTP/1.1 418 Short And Stout\r\n")
        (resp,) = parse_responses(raw)
        assert resp.status == 418
        assert resp.body == body
        expected: list[tuple[str, Any]] = [
            ("content-type", "application/teapot+json"),
            ("x-custom", "one, two"),
            ("set-cookie", "a=1; Path=/"),
            ("set-cookie", "b=2; HttpOnly"),
            ("server", "kettle/1.0"),
            ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
            ("etag", '"abc"'),
            ("content-length", str(len(body))),
        ]
        assert [h for h in resp.headers if h[0] != "connection"] == expected


async def test_upstream_error_statuses_are_not_wrapped(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        status = int(req.target.rsplit("/", 1)[1])
        reply.send(status, [("content-type", "text/plain")], b"upstream says %d" % status)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url)
    ) as gw:
        data = b"".join(
            b"GET /api/%d HTTP/1.1\r\nHost: a\r\n\r\n" % s for s in (404, 500, 502, 503)
        )
        responses = parse_responses(await exchange_raw(gw.port, data, expect=4))
        assert [(r.status, r.body) for r in responses] == [
            (s, b"upstream says %d" % s) for s in (404, 500, 502, 503)
        ]

"""The demo upstream, spoken to over real sockets."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tollway.demo.upstream import bound_port, start_demo_upstream


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = await start_demo_upstream("127.0.0.1", 0)
    yield bound_port(server)
    server.close()
    await server.wait_closed()


def fetch(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


async def get(
    port: int, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, str], bytes]:
    # http.client blocks: run it off the loop that serves the upstream.
    return await asyncio.to_thread(fetch, port, method, path, **kwargs)


async def test_hello_greets_with_path_and_headers(port: int) -> None:
    status, headers, body = await get(port, "GET", "/hello", headers={"X-Trace": "abc"})

    assert status == 200
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["message"] == "hello from the demo upstream"
    assert payload["path"] == "/hello"
    assert payload["headers"]["x-trace"] == "abc"


async def test_echo_returns_the_request(port: int) -> None:
    status, _, body = await get(
        port, "POST", "/echo?a=1&a=2&b", body=b'{"x": 1}', headers={"Content-Type": "text/json"}
    )

    assert status == 200
    echo = json.loads(body)
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo"
    assert echo["query"] == "a=1&a=2&b"
    assert echo["args"] == {"a": ["1", "2"], "b": [""]}
    assert echo["headers"]["content-type"] == "text/json"
    assert echo["body"] == '{"x": 1}'


async def test_echo_base64_encodes_a_binary_body(port: int) -> None:
    _, _, body = await get(port, "PUT", "/echo", body=b"\xff\x00")
    echo = json.loads(body)
    assert (echo["method"], echo["body"], echo["body_encoding"]) == ("PUT", "/wA=", "base64")


async def test_bytes_sends_exactly_n_bytes(port: int) -> None:
    status, headers, body = await get(port, "GET", "/bytes/100000")
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert len(body) == 100000


async def test_head_announces_the_length_without_a_body(port: int) -> None:
    status, headers, body = await get(port, "HEAD", "/bytes/10")
    assert (status, headers["content-length"], body) == (200, "10", b"")


async def test_status_answers_with_the_code(port: int) -> None:
    assert (await get(port, "GET", "/status/418"))[0] == 418
    status, headers, body = await get(port, "GET", "/status/204")
    assert (status, body) == (204, b"")
    assert "content-length" not in headers
    assert (await get(port, "GET", "/status/99"))[0] == 400


async def test_delay_waits_before_answering(port: int) -> None:
    started = time.monotonic()
    status, _, body = await get(port, "GET", "/delay/200")
    assert status == 200
    assert json.loads(body)["delayed_ms"] == 200
    assert time.monotonic() - started >= 0.2


async def test_stream_sends_one_chunk_per_line(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream/3 HTTP/1.1\r\nHost: demo\r\n\r\n")
    raw = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()

    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    lines = [json.loads(line) for line in _dechunk(body).splitlines()]
    assert lines == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}]


async def test_stream_over_http_1_0_ends_with_the_connection(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream/2 HTTP/1.0\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed
    writer.close()

    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"chunked" not in head
    assert body == b'{"chunk": 0}\n{"chunk": 1}\n'


async def test_keep_alive_and_pipelined_requests_answer_in_order(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # The slow request first: its answer must still come first.
    writer.write(
        b"GET /delay/50 HTTP/1.1\r\nHost: demo\r\n\r\n"
        b"GET /status/201 HTTP/1.1\r\nHost: demo\r\n\r\n"
    )
    first = await asyncio.wait_for(_read_response(reader), 5)
    second = await asyncio.wait_for(_read_response(reader), 5)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: demo\r\n\r\n")
    third = await asyncio.wait_for(_read_response(reader), 5)
    writer.close()

    assert first.startswith(b"HTTP/1.1 200 ") and b'"delayed_ms": 50' in first
    assert second.startswith(b"HTTP/1.1 201 ")
    assert third.startswith(b"HTTP/1.1 200 ") and b"hello from the demo upstream" in third


async def test_unknown_paths_and_methods(port: int) -> None:
    assert (await get(port, "GET", "/nowhere"))[0] == 404
    assert (await get(port, "POST", "/hello", body=b""))[0] == 405


async def test_a_malformed_request_gets_400_and_a_close(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400 ")


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await reader.readexactly(length)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]

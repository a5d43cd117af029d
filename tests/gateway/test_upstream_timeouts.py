"""Each upstream timeout, through a running gateway, against an upstream that stalls at
that stage: connect, write (request body), read (response head) and total.

Every target here is the service's only one, so no retry on another target can hide
the timeout: each request is answered 504 upstream_timeout, and about when the
configured timeout says (not after some default, not after a hidden second try).

The connect stall: a loopback listener with backlog 0 whose accept queue is filled
by a connection nobody accepts. Linux then drops further SYNs (a full accept queue
drops the SYN whatever tcp_syncookies says; syncookies only answer for a full SYN
queue), so a connect hangs until the caller gives up, with no firewall rule. The
helper checks that a connect does hang before the test relies on it, and skips
(saying why) on a kernel where it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support.client import exchange_raw, parse_responses
from support.gateway import running_gateway
from support.upstream import Received, RecordingUpstream, Reply

# Sub-second bounds: a full collection of a late-run heap must not stall them.
pytestmark = pytest.mark.usefixtures("frozen_heap")

GET = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"


def config_for(upstream: str, **settings: str) -> str:
    lines = "".join(f"    {k}: {v}\n" for k, v in settings.items())
    return f"""
services:
  - name: up
    url: {upstream}
{lines}
routes:
  - name: api
    service: up
    paths: [/api]
"""


def envelope(raw: bytes, status: int, code: str) -> dict[str, Any]:
    (resp,) = parse_responses(raw)
    assert resp.status == status, resp.body
    body = resp.json()
    assert isinstance(body, dict)
    assert body["responseStatus"] == "error"
    assert body["error"]["code"] == code, body
    assert body["requestId"]
    return body


@contextlib.contextmanager
def stalled_connect() -> Iterator[int]:
    """A loopback port on which a TCP connect hangs (SYNs dropped): see the module doc."""
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(8):
            filler = socket.socket()
            held.append(filler)
            filler.setblocking(False)
            filler.connect_ex(address)  # EINPROGRESS; never accepted
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(address)
            except TimeoutError:
                break  # the queue is full: a connect now hangs
            except OSError as exc:
                pytest.skip(f"a full accept queue refuses here instead of dropping: {exc}")
            else:
                held.append(probe)  # it went into the queue: one more filler
                continue
            finally:
                if probe not in held:
                    probe.close()
        else:
            pytest.skip("a full accept queue still completes connects on this kernel")
        yield int(address[1])
    finally:
        for s in held:
            s.close()
        listener.close()


async def timed_request(port: int, data: bytes = GET) -> tuple[bytes, float]:
    start = time.monotonic()
    raw = await exchange_raw(port, data, timeout=8, expect=1)
    return raw, time.monotonic() - start


async def test_connect_timeout_against_a_full_backlog_is_504(tmp_path: Path) -> None:
    with stalled_connect() as port:
        target = f"127.0.0.1:{port}"
        config = config_for(
            f"http://{target}", connect_timeout="0.4s", read_timeout="5s", write_timeout="5s"
        )
        async with running_gateway(tmp_path, config) as gw:
            raw, elapsed = await timed_request(gw.port)
            body = envelope(raw, 504, "upstream_timeout")
            assert body["error"]["details"] == {"upstream": target}
            # One connect_timeout: not the 5 s default, not two attempts on the one target.
            assert 0.38 <= elapsed < 1.2, elapsed


async def test_read_timeout_when_the_upstream_never_answers_is_504(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def read_then_hang(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        await never.wait()

    async with RecordingUpstream(read_then_hang) as up:
        config = config_for(up.url, connect_timeout="5s", read_timeout="0.4s", write_timeout="5s")
        async with running_gateway(tmp_path, config) as gw:
            raw, elapsed = await timed_request(gw.port)
            envelope(raw, 504, "upstream_timeout")
            assert 0.38 <= elapsed < 1.2, elapsed
            # The upstream got the whole request once: it is the answer that never came.
            assert len(up.requests) == 1
            assert up.requests[0].complete.is_set()


async def test_write_timeout_when_the_upstream_never_reads_the_body_is_504(
    tmp_path: Path,
) -> None:
    accepted: list[float] = []
    hold = asyncio.Event()

    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(time.monotonic())
        await hold.wait()  # holds the connection without reading a byte
        writer.close()

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = config_for(
        f"http://127.0.0.1:{port}", connect_timeout="5s", read_timeout="5s", write_timeout="0.4s"
    )
    size = 128 * 1024 * 1024  # far beyond what the socket buffers absorb
    try:
        async with running_gateway(tmp_path, config) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"POST /api/up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)

            async def send_body() -> None:
                block = b"x" * 65536
                with contextlib.suppress(ConnectionError):
                    for _ in range(size // len(block)):
                        writer.write(block)
                        await writer.drain()

            sender = asyncio.create_task(send_body())
            raw = b""
            try:
                async with asyncio.timeout(8):
                    while not parse_responses(raw):
                        chunk = await reader.read(65536)
                        assert chunk, "closed without an answer"
                        raw += chunk
                answered = time.monotonic()
            finally:
                sender.cancel()
                writer.close()
            envelope(raw, 504, "upstream_timeout")
            assert len(accepted) == 1
            # The write deadline starts once the socket buffers towards the upstream
            # are full (a few ms on loopback): about write_timeout after the accept.
            elapsed = answered - accepted[0]
            assert 0.38 <= elapsed < 1.5, elapsed
    finally:
        hold.set()
        server.close()


async def test_total_timeout_bounds_the_wait_for_the_head(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def hang(req: Received, reply: Reply) -> None:
        await never.wait()

    async with RecordingUpstream(hang) as up:
        config = config_for(up.url, read_timeout="5s", total_timeout="0.4s")
        async with running_gateway(tmp_path, config) as gw:
            raw, elapsed = await timed_request(gw.port)
            envelope(raw, 504, "upstream_timeout")
            assert 0.38 <= elapsed < 1.2, elapsed
            assert len(up.requests) == 1


async def test_total_timeout_bounds_retries_and_their_backoff(tmp_path: Path) -> None:
    """Each attempt answers 503 after 0.15 s and may be retried 9 times: total_timeout
    0.5 s ends it after about three attempts, mid-wait for the fourth one's head."""

    async def slow_503(req: Received, reply: Reply) -> None:
        await asyncio.sleep(0.15)  # the upstream's pace, not a wait for a condition
        reply.send(503, body=b"busy")

    async with RecordingUpstream(slow_503) as up:
        config = config_for(
            up.url,
            read_timeout="5s",
            total_timeout="0.5s",
            retries="{attempts: 10, on_statuses: [503], backoff_base: 1ms, backoff_max: 2ms}",
            circuit_breaker="{enabled: false}",
            healthchecks="{passive: null}",
        )
        async with running_gateway(tmp_path, config) as gw:
            raw, elapsed = await timed_request(gw.port)
            envelope(raw, 504, "upstream_timeout")
            assert 0.48 <= elapsed < 1.3, elapsed
            # Retries went (on the one target) until the total ran out, not 10 of them.
            assert 2 <= len(up.requests) <= 4, len(up.requests)

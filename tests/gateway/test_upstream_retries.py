"""Upstream retries through a running gateway, counted at real upstreams.

Every test runs a gateway in front of several RecordingUpstreams (one service, its
targets balanced round robin, from a random start) and counts what the targets
received, all of them together: a retry is a request a second target got; a request
"never sent twice" is a total of exactly one. The targets share one behaviour,
which is told the arrival number of each request across all of them, so that "the
first request fails, the others succeed" holds whichever target the balancer
happens to pick first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.client import exchange_raw, parse_responses
from support.gateway import free_ports, running_gateway
from support.upstream import Received, RecordingUpstream, Reply, echo

# Sub-second bounds: a full collection of a late-run heap must not stall them.
pytestmark = pytest.mark.usefixtures("frozen_heap")

# What a target does with the n-th request (counted from 1 across every target).
Behaviour = Callable[[int, Received, Reply], Awaitable[None]]

SERVICE = "up"


class Targets:
    """n upstreams behind one service: each request is numbered in arrival order."""

    def __init__(self, behaviour: Behaviour, n: int = 3) -> None:
        self.behaviour = behaviour
        self.arrivals: list[tuple[int, Received]] = []  # (target index, request)
        self.ups = [RecordingUpstream(self._handler(i)) for i in range(n)]

    def _handler(self, index: int) -> Callable[[Received, Reply], Awaitable[None]]:
        async def handle(req: Received, reply: Reply) -> None:
            self.arrivals.append((index, req))
            await self.behaviour(len(self.arrivals), req, reply)

        return handle

    @property
    def received(self) -> int:
        """Requests received by all the targets together."""
        return sum(len(up.requests) for up in self.ups)

    @property
    def keys(self) -> list[str]:
        return [f"127.0.0.1:{up.port}" for up in self.ups]

    async def start(self) -> Targets:
        for up in self.ups:
            await up.start()
        return self

    async def stop(self) -> None:
        for up in self.ups:
            await up.stop()


@contextlib.asynccontextmanager
async def targets(behaviour: Behaviour, n: int = 3) -> AsyncIterator[Targets]:
    t = await Targets(behaviour, n).start()
    try:
        yield t
    finally:
        await t.stop()


def config_for(
    keys: list[str],
    retries: str = "",
    service: str = "",
    route: str = "",
    routes: str = "",
    name: str = SERVICE,
) -> str:
    """One service over `keys` with short timeouts and a 1-5 ms backoff.

    `retries` adds flow-mapping entries to the service's retries ("attempts: 2");
    `service` adds service lines, `route` lines to the /api route, `routes` routes.
    """
    target_lines = "\n".join(f'      - {{target: "{k}"}}' for k in keys)
    extra = f", {retries}" if retries else ""
    return f"""
services:
  - name: {name}
    targets:
{target_lines}
    balancer: round_robin
    connect_timeout: 0.5s
    read_timeout: 1s
    retries: {{backoff_base: 1ms, backoff_max: 5ms{extra}}}
{service}
routes:
  - name: api
    service: {name}
    paths: [/api]
{route}
{routes}
"""


# ---- behaviours ----------------------------------------------------------------------


async def ok(n: int, req: Received, reply: Reply) -> None:
    await echo(req, reply)


def rst(reply: Reply) -> None:
    """Reset the connection (RST, not FIN): SO_LINGER 0, then abort."""
    transport = reply._proto.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reply.abort()


async def read_then_close(n: int, req: Received, reply: Reply) -> None:
    await req.complete.wait()
    reply.close()


async def read_then_reset(n: int, req: Received, reply: Reply) -> None:
    await req.complete.wait()
    rst(reply)


def status(code: int) -> Behaviour:
    async def answer(n: int, req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.send(code, [("content-type", "text/plain")], f"answer {n}".encode())

    return answer


def first(times: int, fail: Behaviour) -> Behaviour:
    """`fail` for the first `times` requests (whichever targets get them), then echo."""

    async def behave(n: int, req: Received, reply: Reply) -> None:
        if n <= times:
            await fail(n, req, reply)
        else:
            await echo(req, reply)

    return behave


# ---- client side ---------------------------------------------------------------------


def envelope(raw: bytes, code_status: int, code: str) -> dict[str, Any]:
    responses = parse_responses(raw)
    assert len(responses) == 1, raw[:500]
    resp = responses[0]
    assert resp.status == code_status, resp.body
    body = resp.json()
    assert isinstance(body, dict)
    assert body["responseStatus"] == "error"
    assert body["error"]["code"] == code, body
    return body


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


GET = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"


async def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def retries_counted(gw: Any, reason: str | None = None) -> int:
    stats = gw.plane.clusters.stats
    return sum(
        n for (svc, why), n in stats.retries.items()
        if svc == SERVICE and (reason is None or why == reason)
    )


# ---- 1. a retry goes to another target --------------------------------------------------


async def test_connect_refused_target_is_retried_on_the_others(tmp_path: Path) -> None:
    (closed,) = free_ports(1)
    refused = f"127.0.0.1:{closed}"
    async with targets(ok, n=2) as t, running_gateway(
        tmp_path, config_for([t.keys[0], refused, t.keys[1]])
    ) as gw:
        assert gw.plane is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
            statuses = [(await c.get(f"/api/item/{i}")).status_code for i in range(12)]
        assert statuses == [200] * 12
        # Each GET was received exactly once, by one of the live targets.
        assert t.received == 12
        assert sorted(r.target for _, r in t.arrivals) == sorted(
            f"/item/{i}" for i in range(12)
        )
        # Round robin over three sends the refused one some of the first requests:
        # they went elsewhere, and the retry counter says so.
        stats = gw.plane.clusters.stats
        assert stats.attempts[SERVICE, refused, "connect_failure"] >= 1
        assert retries_counted(gw, "connect_failure") >= 1


# ---- 2. POST without an Idempotency-Key is never sent twice ----------------------------


async def test_post_closed_without_answer_is_not_retried(tmp_path: Path) -> None:
    async with targets(read_then_close) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        raw = await exchange_raw(gw.port, post("/api/orders", b"order=1"), expect=1)
        envelope(raw, 502, "upstream_unavailable")
        assert t.received == 1
        assert bytes(t.arrivals[0][1].body) == b"order=1"
        assert retries_counted(gw) == 0


async def test_post_on_a_pooled_connection_is_not_resent(tmp_path: Path) -> None:
    """A kept-alive connection that closes after reading the POST was not stale: the
    target got the request, so it is not sent again on a fresh connection either."""

    async def then_close(n: int, req: Received, reply: Reply) -> None:
        if n == 1:
            await echo(req, reply)
        else:
            await read_then_close(n, req, reply)

    async with targets(then_close, n=1) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(GET)
            got = bytearray()
            async with asyncio.timeout(5):
                while not parse_responses(bytes(got)):
                    data = await reader.read(65536)
                    assert data
                    got += data
        finally:
            writer.close()
        assert parse_responses(bytes(got))[0].status == 200
        # The gateway keeps its upstream connection: the POST goes out on it.
        raw = await exchange_raw(gw.port, post("/api/orders", b"order=1"), expect=1)
        envelope(raw, 502, "upstream_unavailable")
        assert t.received == 2
        assert t.ups[0].connections == 1
        assert bytes(t.arrivals[1][1].body) == b"order=1"


async def test_post_answered_503_passes_through_unretried(tmp_path: Path) -> None:
    async with targets(status(503)) as t, running_gateway(tmp_path, config_for(t.keys)) as gw:
        raw = await exchange_raw(gw.port, post("/api/orders", b"order=1"), expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 503
        assert resp.body == b"answer 1"  # the upstream's own answer, not an envelope
        assert t.received == 1
        assert retries_counted(gw) == 0


async def test_post_with_idempotency_key_is_retried_on_another_target(tmp_path: Path) -> None:
    async with targets(first(1, read_then_close)) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        raw = await exchange_raw(
            gw.port, post("/api/orders", b"order=1", "Idempotency-Key: k-123\r\n"), expect=1
        )
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        (first_target, _), (second_target, again) = t.arrivals
        assert first_target != second_target
        assert again.method == "POST"
        assert again.header("idempotency-key") == "k-123"
        assert bytes(again.body) == b"order=1"
        assert retries_counted(gw, "reset") == 1


async def test_post_never_received_is_sent_to_another_target(tmp_path: Path) -> None:
    """A refused connect: the upstream never saw the POST, so it may go elsewhere."""
    (closed,) = free_ports(1)
    refused = f"127.0.0.1:{closed}"
    async with targets(ok, n=1) as t, running_gateway(
        tmp_path, config_for([refused, t.keys[0]])
    ) as gw:
        assert gw.plane is not None
        # Round robin over two: one of two consecutive requests picks the refused
        # target first, whatever the balancer's random start.
        for i in range(2):
            raw = await exchange_raw(gw.port, post("/api/orders", b"order=%d" % i), expect=1)
            (resp,) = parse_responses(raw)
            assert resp.status == 200, resp.body
        assert [bytes(r.body) for _, r in t.arrivals] == [b"order=0", b"order=1"]
        stats = gw.plane.clusters.stats
        assert stats.attempts[SERVICE, refused, "connect_failure"] >= 1
        assert retries_counted(gw, "connect_failure") >= 1


async def test_route_non_idempotent_lets_a_post_be_retried(tmp_path: Path) -> None:
    route = "    retries: {non_idempotent: true}"
    async with targets(first(1, read_then_close)) as t, running_gateway(
        tmp_path, config_for(t.keys, route=route)
    ) as gw:
        raw = await exchange_raw(gw.port, post("/api/orders", b"order=1"), expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        assert t.arrivals[0][0] != t.arrivals[1][0]
        assert retries_counted(gw, "reset") == 1


# ---- 3. no retry once the response started ----------------------------------------------


async def test_no_retry_after_the_response_started(tmp_path: Path) -> None:
    async def head_then_close(n: int, req: Received, reply: Reply) -> None:
        reply.head(200, [("content-length", "1000"), ("content-type", "text/plain")])
        reply.raw(b"partial")
        reply.close()

    async with targets(head_then_close) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        got = bytearray()
        try:
            writer.write(GET)
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    while data := await reader.read(65536):
                        got += data
        finally:
            writer.close()
        # The head and what came of the body, then the connection closed early.
        assert got.startswith(b"HTTP/1.1 200 "), bytes(got)
        assert got.endswith(b"partial")
        assert parse_responses(bytes(got)) == []
        assert t.received == 1
        assert retries_counted(gw) == 0


# ---- 4. a body too long to replay ---------------------------------------------------------


def chunked_put(size: int, piece: int = 16 * 1024) -> tuple[bytes, bytes]:
    body = bytes(i % 251 for i in range(size))
    head = b"PUT /api/blob HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i:i + piece]), body[i:i + piece])
        for i in range(0, size, piece)
    )
    return head + chunks + b"0\r\n\r\n", body


async def test_long_streamed_body_is_not_replayed(tmp_path: Path) -> None:
    async with targets(read_then_reset) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        request, body = chunked_put(200 * 1024)
        raw = await exchange_raw(gw.port, request, expect=1)
        envelope(raw, 502, "upstream_unavailable")
        assert t.received == 1
        assert bytes(t.arrivals[0][1].body) == body  # it did go out, all of it
        assert retries_counted(gw) == 0


async def test_short_body_is_replayed_whole_on_another_target(tmp_path: Path) -> None:
    async with targets(first(1, read_then_reset)) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        payload = bytes(i % 251 for i in range(1024))
        request = (
            b"PUT /api/blob HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n" + payload
        )
        raw = await exchange_raw(gw.port, request, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        (first_target, one), (second_target, two) = t.arrivals
        assert first_target != second_target
        assert bytes(one.body) == payload
        assert bytes(two.body) == payload
        assert two.header("content-length") == "1024"
        echoed = resp.json()
        assert isinstance(echoed, dict)
        assert echoed["body_size"] == 1024


async def test_short_chunked_body_is_replayed_whole(tmp_path: Path) -> None:
    async with targets(first(1, read_then_reset)) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        request, body = chunked_put(8 * 1024, piece=1024)
        raw = await exchange_raw(gw.port, request, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        assert [bytes(r.body) for _, r in t.arrivals] == [body, body]


async def test_body_still_arriving_follows_the_retry(tmp_path: Path) -> None:
    """The first target resets before the body is all in: the part received so far
    goes to the next target, then the rest as the client sends it."""

    async def reset_at_once(n: int, req: Received, reply: Reply) -> None:
        rst(reply)

    async with targets(first(1, reset_at_once)) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        payload = bytes(i % 251 for i in range(1024))
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(
                b"PUT /api/blob HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n"
                + payload[:512]
            )
            await writer.drain()
            await wait_for(lambda: t.received == 2)  # the retry reached another target
            writer.write(payload[512:])
            await writer.drain()
            got = bytearray()
            async with asyncio.timeout(5):
                while not parse_responses(bytes(got)):
                    data = await reader.read(65536)
                    assert data, bytes(got)
                    got += data
        finally:
            writer.close()
        (resp,) = parse_responses(bytes(got))
        assert resp.status == 200, resp.body
        (first_target, _), (second_target, two) = t.arrivals
        assert first_target != second_target
        assert bytes(two.body) == payload


# ---- 5. which statuses are retried --------------------------------------------------------


async def test_503_is_retried_by_default(tmp_path: Path) -> None:
    async with targets(first(1, status(503))) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        assert t.arrivals[0][0] != t.arrivals[1][0]
        assert retries_counted(gw, "status") == 1


async def test_502_and_504_are_retried_by_default(tmp_path: Path) -> None:
    async def one_502_one_504(n: int, req: Received, reply: Reply) -> None:
        if n <= 2:
            await status(502 if n == 1 else 504)(n, req, reply)
        else:
            await echo(req, reply)

    async with targets(one_502_one_504) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 3
        assert retries_counted(gw, "status") == 2


async def test_500_is_not_retried_by_default(tmp_path: Path) -> None:
    async with targets(first(1, status(500))) as t, running_gateway(
        tmp_path, config_for(t.keys)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 500
        assert resp.body == b"answer 1"
        assert t.received == 1
        assert retries_counted(gw) == 0


async def test_on_statuses_widens_the_retried_statuses(tmp_path: Path) -> None:
    async with targets(first(1, status(500))) as t, running_gateway(
        tmp_path, config_for(t.keys, retries="on_statuses: [500, 502, 503, 504]")
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200, resp.body
        assert t.received == 2
        assert retries_counted(gw, "status") == 1


# ---- 6. the attempts cap ---------------------------------------------------------------


async def test_attempts_cap_then_the_last_answer_passes_through(tmp_path: Path) -> None:
    async with targets(status(503)) as t, running_gateway(
        tmp_path, config_for(t.keys, retries="attempts: 2")
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 503
        assert resp.body == b"answer 2"  # the second (last) attempt's own answer
        assert t.received == 2
        assert retries_counted(gw, "status") == 1


async def test_route_attempts_override_turns_retries_off(tmp_path: Path) -> None:
    route = "    retries: {attempts: 1}"
    async with targets(status(503)) as t, running_gateway(
        tmp_path, config_for(t.keys, retries="attempts: 3", route=route)
    ) as gw:
        raw = await exchange_raw(gw.port, GET, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 503
        assert resp.body == b"answer 1"
        assert t.received == 1
        assert retries_counted(gw) == 0


async def test_route_attempts_override_applies_to_its_route_only(tmp_path: Path) -> None:
    routes = """  - name: once
    service: up
    paths: [/once]
    retries: {attempts: 1}"""
    async with targets(status(503)) as t, running_gateway(
        tmp_path, config_for(t.keys, retries="attempts: 3", routes=routes)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /once HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        assert parse_responses(raw)[0].status == 503
        assert t.received == 1
        raw = await exchange_raw(gw.port, GET, expect=1)
        assert parse_responses(raw)[0].status == 503
        assert t.received == 1 + 3


# ---- 7. the retry budget -----------------------------------------------------------------


async def test_spent_budget_stops_retries_and_is_counted(tmp_path: Path) -> None:
    name = "budgeted"
    async with targets(read_then_close) as t, running_gateway(
        tmp_path,
        config_for(t.keys, retries="budget_ratio: 0, budget_min_per_second: 0", name=name),
    ) as gw:
        assert gw.plane is not None
        raw = await exchange_raw(gw.port, GET, expect=1)
        envelope(raw, 502, "upstream_unavailable")
        assert t.received == 1
        stats = gw.plane.clusters.stats
        assert stats.budget_exhausted[name] == 1
        assert not any(svc == name for svc, _ in stats.retries)

        pattern = re.compile(
            r'^tollway_upstream_retry_budget_exhausted_total\{service="budgeted"\} (\S+)$',
            re.M,
        )
        deadline = time.monotonic() + 5  # metrics flush about once a second
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.admin_port}") as admin:
            while True:
                r = await admin.get("/metrics")
                assert r.status_code == 200
                match = pattern.search(r.text)
                if match is not None and float(match.group(1)) >= 1:
                    break
                assert time.monotonic() < deadline, "budget exhaustion never reached /metrics"
                await asyncio.sleep(0.1)


# ---- 8. the total timeout -----------------------------------------------------------------


async def test_total_timeout_bounds_every_attempt_together(tmp_path: Path) -> None:
    """Each target answers 503 after 0.4 s: without a total timeout three attempts
    would take 1.2 s; with 0.6 s the second attempt is cut at 0.6 s."""
    done = asyncio.Event()

    async def slow_503(n: int, req: Received, reply: Reply) -> None:
        await req.complete.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.4)  # the target's own slowness
        reply.send(503, [("content-type", "text/plain")], b"busy")

    async with targets(slow_503) as t, running_gateway(
        tmp_path, config_for(t.keys, service="    total_timeout: 0.6s")
    ) as gw:
        start = time.monotonic()
        raw = await exchange_raw(gw.port, GET, expect=1)
        elapsed = time.monotonic() - start
        done.set()
        envelope(raw, 504, "upstream_timeout")
        assert 0.55 <= elapsed < 1.0, elapsed
        assert 1 <= t.received <= 2

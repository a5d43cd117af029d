"""Open circuits shared between nodes through the real Redis."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from support.gateway import free_port
from support.redis_server import PrivateRedis, drop_keys, shared_client
from tollway.config.upstream_schema import CircuitBreakerConfig
from tollway.upstream.circuit import BreakerState, CircuitBreaker
from tollway.upstream.circuit_share import CircuitShare, share_opens

WAIT = 10.0


class Heard:
    """An on_remote_open callback: what it got, and an event per arrival."""

    def __init__(self) -> None:
        self.opens: list[tuple[str, float]] = []
        self.event = asyncio.Event()

    def __call__(self, name: str, seconds: float) -> None:
        self.opens.append((name, seconds))
        self.event.set()

    async def wait_for(self, name: str) -> float:
        async with asyncio.timeout(WAIT):
            while True:
                for got, seconds in self.opens:
                    if got == name:
                        return seconds
                self.event.clear()
                await self.event.wait()


@pytest.fixture
async def redis() -> AsyncIterator[tuple[Redis, str]]:
    client = await shared_client()
    prefix = f"test-circuits-{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        await drop_keys(client, prefix)
        await client.aclose()


@pytest.mark.needs_redis
async def test_a_peer_learns_an_open_and_the_publisher_ignores_its_own(
    redis: tuple[Redis, str],
) -> None:
    client, prefix = redis
    heard_a, heard_b = Heard(), Heard()
    a = CircuitShare(client, "a", heard_a, prefix=prefix)
    b = CircuitShare(client, "b", heard_b, prefix=prefix)
    await a.start()
    await b.start()
    try:
        assert a.subscribed and b.subscribed
        a.publish_open("images/127.0.0.1:9001", 5.0)
        seconds = await heard_b.wait_for("images/127.0.0.1:9001")
        assert seconds == pytest.approx(5.0, abs=0.5)
        # The key holds the publisher and expires with the open.
        key = f"{prefix}circuit:images/127.0.0.1:9001"
        assert await client.get(key) == b"a"
        assert 0 < await client.pttl(key) <= 5000
        # a's subscription delivers in order: once b's later open reached a, a's own
        # earlier message has been read too, and ignored.
        b.publish_open("billing", 2.0)
        assert await heard_a.wait_for("billing") == pytest.approx(2.0, abs=0.5)
        assert heard_a.opens == [("billing", 2.0)]
        assert [name for name, _ in heard_b.opens] == ["images/127.0.0.1:9001"]
    finally:
        await a.aclose()
        await b.aclose()
    assert a.published == 1 and b.published == 1


@pytest.mark.needs_redis
async def test_a_node_starting_late_learns_opens_from_the_keys(
    redis: tuple[Redis, str],
) -> None:
    client, prefix = redis
    a = CircuitShare(client, "a", Heard(), prefix=prefix)
    await a.start()
    try:
        a.publish_open("images", 30.0)
    finally:
        await a.aclose()  # waits for the publish
    assert a.published == 1
    heard_c = Heard()
    c = CircuitShare(client, "c", heard_c, prefix=prefix)
    await c.start()  # returns once the keys are loaded
    try:
        assert [name for name, _ in heard_c.opens] == ["images"]
        remaining = heard_c.opens[0][1]
        assert 25.0 < remaining <= 30.0
    finally:
        await c.aclose()


@pytest.mark.needs_redis
async def test_a_restarted_node_ignores_its_own_keys(redis: tuple[Redis, str]) -> None:
    client, prefix = redis
    await client.set(f"{prefix}circuit:images", "a", px=30_000)
    await client.set(f"{prefix}circuit:billing", "b", px=30_000)
    await client.set(f"{prefix}circuit:forever", "b")  # no TTL: not an open of ours
    heard = Heard()
    a = CircuitShare(client, "a", heard, prefix=prefix)
    await a.start()
    try:
        assert [name for name, _ in heard.opens] == ["billing"]
    finally:
        await a.aclose()


@pytest.mark.needs_redis
async def test_breakers_share_opens_without_echo(redis: tuple[Redis, str]) -> None:
    """The wiring the cluster does: local opens are published, peers' are not."""
    client, prefix = redis
    config = CircuitBreakerConfig(failure_threshold=2, open_time=5.0)
    breakers: dict[str, CircuitBreaker] = {}
    applied = asyncio.Event()

    def apply_on_b(name: str, seconds: float) -> None:
        breakers["b"].force_open(seconds, asyncio.get_running_loop().time())
        applied.set()

    a = CircuitShare(client, "a", Heard(), prefix=prefix)
    b = CircuitShare(client, "b", apply_on_b, prefix=prefix)
    breakers["a"] = CircuitBreaker(config, "images", on_transition=share_opens(a))
    b_moves: list[tuple[BreakerState, BreakerState]] = []
    breakers["b"] = CircuitBreaker(
        config, "images", on_transition=share_opens(b, lambda _b, o, n, _t: b_moves.append((o, n)))
    )
    await a.start()
    await b.start()
    try:
        now = asyncio.get_running_loop().time()
        breakers["a"].record(False, now)
        breakers["a"].record(False, now)
        assert breakers["a"].state(now) is BreakerState.OPEN
        async with asyncio.timeout(WAIT):
            await applied.wait()
        now = asyncio.get_running_loop().time()
        assert not breakers["b"].allow(now)
        assert 4.0 < breakers["b"].retry_after(now) <= 5.0
        assert b_moves == [(BreakerState.CLOSED, BreakerState.OPEN)]  # `then` still called
        assert breakers["b"].last_transition_remote
    finally:
        await a.aclose()
        await b.aclose()
    assert a.published == 1
    assert b.published == 0  # b did not publish the open it heard


async def test_publish_and_start_with_redis_unreachable_do_not_raise() -> None:
    client = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    share = CircuitShare(client, "a", Heard(), prefix="test-unreachable:")
    try:
        async with asyncio.timeout(WAIT):
            await share.start()
        assert not share.subscribed
        share.publish_open("images", 5.0)
        share.publish_open("billing", 5.0)
    finally:
        await share.aclose()  # waits for the publishes to fail
        await client.aclose()
    assert share.publish_failures == 2
    assert share.published == 0


async def test_publish_without_an_event_loop_does_not_raise() -> None:
    share = CircuitShare(Redis(port=free_port()), "a", Heard())

    def outside_the_loop() -> None:
        share.publish_open("images", 5.0)

    await asyncio.to_thread(outside_the_loop)
    assert share.published == 0


@pytest.mark.needs_redis
async def test_the_subscription_survives_a_redis_restart() -> None:
    server = PrivateRedis().start()
    client = Redis.from_url(server.url, socket_connect_timeout=0.5)
    heard = Heard()
    b = CircuitShare(client, "b", heard, prefix="test-restart:")
    try:
        await b.start()
        assert b.subscribed
        server.kill()
        # Publishing into the dead Redis fails quietly; the breaker works locally.
        a_client = Redis.from_url(server.url, socket_connect_timeout=0.5)
        a = CircuitShare(a_client, "a", Heard(), prefix="test-restart:")
        a.publish_open("lost", 5.0)
        await a.aclose()
        assert a.publish_failures == 1
        server = PrivateRedis(port=server.port).start()
        # Published while b may still be reconnecting: b learns it from the message
        # or, if it was away, from the key it loads on resubscribing.
        a = CircuitShare(a_client, "a", Heard(), prefix="test-restart:")
        a.publish_open("images", 30.0)
        assert await heard.wait_for("images") == pytest.approx(30.0, abs=2.0)
        await a.aclose()
        await a_client.aclose()
        # Possibly twice (key and message), never the open lost in the outage.
        assert {name for name, _ in heard.opens} == {"images"}
    finally:
        await b.aclose()
        await client.aclose()
        server.kill()


def test_junk_and_own_messages_are_ignored() -> None:
    heard = Heard()
    share = CircuitShare(Redis(port=free_port()), "a", heard)
    for data in [
        b"not json",
        b"[]",
        json.dumps({"name": "x", "seconds": 5}).encode(),  # no node
        json.dumps({"name": 1, "seconds": 5, "node": "b"}).encode(),
        json.dumps({"name": "x", "seconds": "5", "node": "b"}).encode(),
        json.dumps({"name": "x", "seconds": True, "node": "b"}).encode(),
        json.dumps({"name": "x", "seconds": -1, "node": "b"}).encode(),
        json.dumps({"name": "x", "seconds": 5, "node": "a"}).encode(),  # own
    ]:
        share.on_message(data)
    assert heard.opens == []
    share.on_message(json.dumps({"name": "x", "seconds": 5, "node": "b"}))
    assert heard.opens == [("x", 5.0)]


def test_a_failing_callback_does_not_end_the_subscription() -> None:
    def broken(name: str, seconds: float) -> None:
        raise RuntimeError("bug in the integrator's code")

    share = CircuitShare(Redis(port=free_port()), "a", broken)
    share.on_message(json.dumps({"name": "x", "seconds": 5, "node": "b"}))
    assert share.received == 1

"""Ban stores: MemoryBans on a fake clock, RedisBans against a real Redis.

The shared Redis (127.0.0.1:6379) is only used under a unique prefix per test,
deleted afterwards; whatever must die runs on a private redis-server started here
and killed by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from support.clock import FakeClock
from support.redis_server import SHARED_REDIS_URL, drop_keys, private_redis
from tollway.gateway.context import RequestContext
from tollway.limits.bans import (
    Ban,
    BanPolicy,
    BanStoreUnavailable,
    MemoryBans,
)
from tollway.limits.breaker import StoreBreaker
from tollway.limits.redis_bans import RedisBans
from tollway.observability.abuse_metrics import AbuseMetrics
from tollway.observability.metrics import render_latest, setup_multiprocess
from tollway.plugins.abuse_detection import AbuseDetection, AbuseDetectionConfig

T0 = 1_700_000_000.0
POLICY = BanPolicy(window=60.0, threshold=3, ban_seconds=600.0)
REDIS_URL = SHARED_REDIS_URL


async def until(check: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `check` until it is truthy (an event between processes: nothing to await)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def build_ctx(client_ip: str) -> RequestContext:
    return RequestContext("GET", "/x", b"", "1.1", [], client_ip, client_ip, "h")


# ---- MemoryBans -----------------------------------------------------------------------


def test_threshold_crossing_bans_for_ban_seconds() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    assert bans.count("ip", "1.2.3.4", POLICY) is None
    assert bans.count("ip", "1.2.3.4", POLICY) is None
    assert bans.banned("ip", "1.2.3.4") is None
    ban = bans.count("ip", "1.2.3.4", POLICY)
    assert ban is not None and ban.kind == "ip" and ban.value == "1.2.3.4"
    assert ban.until == T0 + 600 and ban.created_at == T0 and ban.strikes == 1
    assert ban.reason == "3 failed requests within 60 s"
    assert bans.banned("ip", "1.2.3.4") == ban
    assert bans.banned("ip", "1.2.3.5") is None
    assert bans.banned("consumer", "1.2.3.4") is None  # kinds are separate
    clock.advance(0.5)
    assert ban.retry_after(clock()) == 600  # whole seconds, rounded up
    assert bans.counters()["bans:ip"] == 1


def test_the_window_restarts_and_sources_are_separate() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    bans.failed("ip", "a", POLICY)
    bans.failed("ip", "a", POLICY)
    bans.failed("ip", "b", POLICY)
    bans.failed("consumer", "a", POLICY)
    clock.advance(60)  # the window ended: the two failures of "a" are forgotten
    bans.failed("ip", "a", POLICY)
    bans.failed("ip", "a", POLICY)
    assert bans.banned("ip", "a") is None
    bans.failed("ip", "a", POLICY)
    assert bans.banned("ip", "a") is not None


async def test_a_ban_expires_by_itself() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    for _ in range(3):
        bans.failed("ip", "a", POLICY)
    clock.advance(599.9)
    assert bans.banned("ip", "a") is not None
    assert [b.value for b in await bans.list_bans()] == ["a"]
    clock.advance(0.1)
    assert bans.banned("ip", "a") is None
    assert await bans.list_bans() == []
    assert await bans.lift("ip", "a") is False  # nothing left to lift


def test_ended_bans_leave_the_table() -> None:
    """So that the ban check is one test of an empty dict again."""
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    for _ in range(3):
        bans.failed("ip", "a", POLICY)
    assert bans.active
    clock.advance(601)
    bans.failed("ip", "b", POLICY)  # the failure path sweeps now and then
    assert not bans.active and list(bans._counts) == [("ip", "b")]


def test_failures_of_a_banned_source_do_not_lengthen_its_ban() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    first = None
    for _ in range(3):
        first = bans.count("ip", "a", POLICY) or first
    for _ in range(10):
        clock.advance(1)
        assert bans.count("ip", "a", POLICY) is None
    assert bans.banned("ip", "a") == first
    assert bans.counters()["bans:ip"] == 1


def test_repeat_offenders_are_banned_longer_up_to_the_cap() -> None:
    clock = FakeClock(T0)
    policy = BanPolicy(
        window=60, threshold=1, ban_seconds=10, growth=3, max_ban_seconds=50, repeat_window=1000
    )
    bans = MemoryBans(clock=clock)
    lengths = []
    for _ in range(4):
        ban = bans.count("ip", "a", policy)
        assert ban is not None
        lengths.append((ban.until - ban.created_at, ban.strikes))
        clock.advance(ban.until - clock())
    assert lengths == [(10, 1), (30, 2), (50, 3), (50, 4)]
    clock.advance(1000)  # past the repeat window: a first offence again
    ban = bans.count("ip", "a", policy)
    assert ban is not None and ban.strikes == 1 and ban.until - ban.created_at == 10


async def test_manual_ban_lift_and_list_pages() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock)
    await bans.ban("ip", "c", 30, "manual")
    await bans.ban("consumer", "u1", 10, "manual")
    await bans.ban("ip", "d", 20, "scanner")
    assert [(b.kind, b.value) for b in await bans.list_bans()] == [
        ("consumer", "u1"),
        ("ip", "d"),
        ("ip", "c"),
    ]
    assert [b.value for b in await bans.list_bans("ip")] == ["d", "c"]
    assert [b.value for b in await bans.list_bans(offset=1, limit=1)] == ["d"]
    bans.failed("ip", "e", POLICY)
    bans.failed("ip", "e", POLICY)
    assert await bans.lift("ip", "d") is True
    assert bans.banned("ip", "d") is None
    assert await bans.lift("ip", "d") is False
    # A lift forgets the count too: two more failures do not ban "e" at once.
    await bans.ban("ip", "e", 5, "manual")
    assert await bans.lift("ip", "e") is True
    bans.failed("ip", "e", POLICY)
    bans.failed("ip", "e", POLICY)
    assert bans.banned("ip", "e") is None
    with pytest.raises(ValueError, match="kind"):
        await bans.ban("asn", "1", 5, "manual")
    assert bans.counters()["bans:ip"] == 3 and bans.counters()["bans:consumer"] == 1


def test_tables_are_bounded() -> None:
    clock = FakeClock(T0)
    bans = MemoryBans(clock=clock, max_entries=5)
    one = BanPolicy(window=60, threshold=1, ban_seconds=600)
    for i in range(50):
        bans.failed("ip", f"10.0.0.{i}", POLICY)
        bans.failed("consumer", f"c{i}", one)
    assert len(bans._counts) <= 5 and len(bans.active) <= 5 and len(bans._strikes) <= 5
    assert bans.banned("consumer", "c49") is not None  # the newest stay


def test_ban_json_round_trip_and_junk() -> None:
    ban = Ban("ip", "::1", "why", until=T0 + 1.5, created_at=T0, strikes=2)
    assert Ban.decode(ban.encode()) == ban
    for junk in (b"", b"[]", b'{"kind":"ip"}', b"nope", b'{"kind":"ip","value":"a",'):
        assert Ban.decode(junk) is None


def test_metrics_export_what_changed() -> None:
    bans = MemoryBans(clock=FakeClock(T0))

    def value(name: str, kind: str) -> float:
        return REGISTRY.get_sample_value(name, {"kind": kind}) or 0.0

    before = value("tollway_abuse_bans_total", "ip"), value("tollway_abuse_blocked_total", "ip")
    metrics = AbuseMetrics(bans.counters)
    for _ in range(3):
        bans.failed("ip", "a", POLICY)
    bans.blocked("ip")
    bans.blocked("ip")
    metrics.flush()
    metrics.flush()  # nothing new: nothing added
    after = value("tollway_abuse_bans_total", "ip"), value("tollway_abuse_blocked_total", "ip")
    assert (after[0] - before[0], after[1] - before[1]) == (1.0, 2.0)


def _worker_bans_once() -> None:
    bans = MemoryBans()
    metrics = AbuseMetrics(bans.counters)
    for _ in range(3):
        bans.failed("consumer", "c", POLICY)
    bans.blocked("consumer")
    metrics.flush()


def test_metrics_are_summed_across_workers(tmp_path: Path) -> None:
    """With --workers the counters go through prometheus_client's multiprocess
    files: each worker's bans show up once in the parent's /metrics."""
    setup_multiprocess(tmp_path / "metrics")
    try:
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=_worker_bans_once) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
            assert w.exitcode == 0
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(render_latest()[0].decode())
            for s in family.samples
        }
        assert samples[("tollway_abuse_bans_total", (("kind", "consumer"),))] == 2
        assert samples[("tollway_abuse_blocked_total", (("kind", "consumer"),))] == 2
    finally:
        setup_multiprocess(None)


# ---- RedisBans on the shared Redis ---------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"test:tollway:bans:{uuid.uuid4().hex}:"


@pytest.fixture
async def cleanup(redis: Redis, prefix: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await drop_keys(redis, prefix)


@contextlib.asynccontextmanager
async def node(prefix: str, **kw: object) -> AsyncIterator[RedisBans]:
    """One process's store, with its own clients, started and closed."""
    store = RedisBans.from_url(REDIS_URL, prefix=prefix, **kw)  # type: ignore[arg-type]
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.mark.needs_redis
async def test_redis_threshold_keys_and_ttls(redis: Redis, prefix: str, cleanup: None) -> None:
    async with node(prefix) as store:
        assert await store.record_failure("ip", "10.1.1.1", POLICY) is None
        count_key = store.count_key("ip", "10.1.1.1")
        assert await redis.get(count_key) == b"1"
        assert 0 < await redis.pttl(count_key) <= 60_000
        assert await store.record_failure("ip", "10.1.1.1", POLICY, count=1) is None
        ban = await store.record_failure("ip", "10.1.1.1", POLICY)
        assert ban is not None and ban.strikes == 1
        assert abs(ban.until - ban.created_at - 600) < 0.01
        assert abs(ban.created_at - time.time()) < 5  # Redis TIME
        assert store.banned("ip", "10.1.1.1") == ban  # known locally at once
        ban_key = store.ban_key("ip", "10.1.1.1")
        assert ban_key == f"{prefix}ban:ip:10.1.1.1"
        assert 599_000 < await redis.pttl(ban_key) <= 600_000
        assert await redis.exists(count_key) == 0
        assert await redis.zscore(store.index_key("ip"), "10.1.1.1") is not None
        # Banned: further failures are not counted and do not change the ban.
        assert await store.record_failure("ip", "10.1.1.1", POLICY) is None
        assert await redis.exists(count_key) == 0
        assert [b.value for b in await store.list_bans()] == ["10.1.1.1"]
        assert store.counters()["bans:ip"] == 1


@pytest.mark.needs_redis
async def test_redis_queued_failures_are_sent_in_batches(prefix: str, cleanup: None) -> None:
    async with node(prefix) as store:
        for i in range(3):
            store.failed("ip", "10.2.2.2", POLICY)
            store.failed("consumer", f"u{i}", POLICY)
        # The background sender picks them up; the 3 failures of one IP ban it.
        await until(lambda: store.banned("ip", "10.2.2.2") is not None)
        assert store.banned("consumer", "u0") is None
        assert store.counters()["dropped"] == 0


@pytest.mark.needs_redis
async def test_redis_bans_and_lifts_reach_other_nodes(prefix: str, cleanup: None) -> None:
    async with node(prefix) as a, node(prefix) as b:
        await until(lambda: a.subscribed and b.subscribed)
        ban = await a.ban("consumer", "c-1", 300, "manual")
        assert a.banned("consumer", "c-1") == ban
        await until(lambda: b.banned("consumer", "c-1") is not None)  # pub/sub
        assert b.messages >= 1
        for _ in range(3):
            await b.record_failure("ip", "10.3.3.3", POLICY)
        await until(lambda: a.banned("ip", "10.3.3.3") is not None)
        assert await b.lift("consumer", "c-1") is True
        await until(lambda: a.banned("consumer", "c-1") is None)
        assert await a.lift("consumer", "c-1") is False
        # A node started later loads what is active.
        async with node(prefix) as c:
            assert c.banned("ip", "10.3.3.3") is not None
            assert c.banned("consumer", "c-1") is None


@pytest.mark.needs_redis
async def test_redis_reload_catches_up_without_pubsub(
    redis: Redis, prefix: str, cleanup: None
) -> None:
    """A message lost (written straight to Redis here, unannounced) is picked up by
    the periodic reload; an index member whose ban is gone is skipped."""
    async with node(prefix, refresh_interval=0.05, resync_interval=0.05) as store:
        other = RedisBans(redis, prefix=prefix)
        ban = Ban("ip", "10.4.4.4", "quiet", time.time() + 60, time.time(), 0)
        await redis.set(other.ban_key("ip", "10.4.4.4"), ban.encode(), px=60_000)
        await redis.zadd(other.index_key("ip"), {"10.4.4.4": ban.until * 1000})
        await redis.zadd(other.index_key("ip"), {"10.9.9.9": ban.until * 1000})  # no key
        await until(lambda: store.banned("ip", "10.4.4.4") is not None)
        assert [b.value for b in await store.list_bans()] == ["10.4.4.4"]
        await redis.delete(other.ban_key("ip", "10.4.4.4"))
        await until(lambda: store.banned("ip", "10.4.4.4") is None)


@pytest.mark.needs_redis
async def test_redis_ban_expires_by_itself(redis: Redis, prefix: str, cleanup: None) -> None:
    short = BanPolicy(window=60, threshold=2, ban_seconds=0.3)
    async with node(prefix) as store:
        await store.record_failure("ip", "10.5.5.5", short)
        ban = await store.record_failure("ip", "10.5.5.5", short)
        assert ban is not None and store.banned("ip", "10.5.5.5") is not None
        await until(lambda: store.banned("ip", "10.5.5.5") is None)
        key = store.ban_key("ip", "10.5.5.5")
        deadline = time.monotonic() + 5
        while await redis.exists(key):  # Redis expires it on its own (PX)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert await store.list_bans() == []
        assert await redis.zcard(store.index_key("ip")) == 0  # pruned by the list


@pytest.mark.needs_redis
async def test_redis_list_pages_and_kinds(prefix: str, cleanup: None) -> None:
    async with node(prefix) as store:
        await store.ban("ip", "10.6.0.1", 30, "m")
        await store.ban("ip", "10.6.0.2", 10, "m")
        await store.ban("consumer", "u", 20, "m")
        assert [b.value for b in await store.list_bans()] == ["10.6.0.2", "u", "10.6.0.1"]
        assert [b.value for b in await store.list_bans("ip")] == ["10.6.0.2", "10.6.0.1"]
        assert [b.value for b in await store.list_bans(offset=1, limit=1)] == ["u"]
        ipv6 = await store.ban("ip", "2001:db8::1", 5, "m")
        assert store.banned("ip", "2001:db8::1") == ipv6


# ---- a Redis that dies ------------------------------------------------------------------


@pytest.mark.needs_redis
async def test_noscript_after_a_script_flush_is_recovered() -> None:
    with private_redis() as server:
        store = RedisBans.from_url(server.url)
        try:
            client: Redis = Redis.from_url(server.url)
            await client.script_flush()
            for _ in range(3):
                store.failed("ip", "10.7.7.7", POLICY)
            assert await store.flush() == 1
            assert store.banned("ip", "10.7.7.7") is not None
            await client.script_flush()
            assert (await store.ban("consumer", "x", 5, "m")).value == "x"
            await client.script_flush()
            assert await store.lift("consumer", "x") is True
            await client.aclose()
        finally:
            await store.aclose()


@pytest.mark.needs_redis
async def test_a_dead_redis_never_fails_or_holds_a_request() -> None:
    with private_redis() as server:
        store = RedisBans.from_url(
            server.url, breaker=StoreBreaker(failure_threshold=2, open_seconds=30)
        )
        await store.start()
        plugin = AbuseDetection(AbuseDetectionConfig(threshold=3))
        plugin.use_store(store)
        try:
            await store.ban("ip", "10.8.8.8", 300, "before the outage")
            server.kill()
            # The request path: the ban check reads the local table, failures queue.
            started = time.perf_counter()
            for _ in range(100):
                blocked = plugin.access(build_ctx(client_ip="10.8.8.8"))
                assert blocked is not None and blocked.status == 403
                ctx = build_ctx(client_ip="10.8.8.9")
                assert plugin.access(ctx) is None
                ctx.status = 404
                plugin.log(ctx)
            assert time.perf_counter() - started < 0.05
            # The sender fails, counts, drops: fail open, bounded by the timeout.
            started = time.perf_counter()
            await until(lambda: store.counters()["dropped"] >= 1)
            assert time.perf_counter() - started < 1.0
            ctx.status = 404
            plugin.log(ctx)  # one more failed send opens the breaker
            await until(lambda: store.breaker.state == "open")
            assert store.counters()["store_errors"] >= 2
            # With the breaker open, calls fail at once instead of waiting.
            started = time.perf_counter()
            with pytest.raises(BanStoreUnavailable):
                await store.list_bans()
            with pytest.raises(BanStoreUnavailable):
                await store.record_failure("ip", "10.8.8.9", POLICY)
            assert time.perf_counter() - started < 0.05
            assert store.banned("ip", "10.8.8.8") is not None  # still enforced
        finally:
            await store.aclose()


@pytest.mark.needs_redis
async def test_a_redis_down_at_start_is_not_fatal() -> None:
    with private_redis() as server:
        url = server.url
    store = RedisBans.from_url(url, timeout=0.05)
    started = time.perf_counter()
    await store.start()  # logs, does not raise
    try:
        assert time.perf_counter() - started < 1.0
        assert store.banned("ip", "1.1.1.1") is None
        with pytest.raises(BanStoreUnavailable):
            await store.ban("ip", "1.1.1.1", 5, "m")
    finally:
        await store.aclose()

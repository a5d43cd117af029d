"""rate-limit with Redis: exact across processes, and what happens when Redis dies.

The exactness tests run two `tollway serve` processes against the shared Redis at
127.0.0.1:6379 (counters under a namespace unique to the run, so nothing collides
with another test or an earlier run). The failure tests kill a private
redis-server they started, never the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis import Redis
from test_plugin_rate_limit import TRUSTED, concurrency_run, held_upstream

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import GatewayProcess, api_config, running_gateway
from support.redis_server import PrivateRedis
from support.upstream import RecordingUpstream
from tollway.gateway.app import Gateway
from tollway.limits.concurrency import Concurrency

pytestmark = pytest.mark.needs_redis

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def _config(upstream_url: str, rate_limit: str) -> str:
    plugins = f"plugins:\n  - name: rate-limit\n    config: {rate_limit}\n"
    return api_config(upstream_url, plugins)


async def _get(port: int, tenant: str) -> int:
    request = f"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\n\r\n".encode()
    responses = parse_responses(await exchange_raw(port, request, timeout=30, expect=1))
    assert len(responses) == 1
    return responses[0].status


async def _burst(ports: list[int], tenant: str, total: int, concurrency: int = 100) -> Counter[int]:
    """`total` requests at once (at most `concurrency` connections open), spread
    evenly over the gateways."""
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            return await _get(ports[i % len(ports)], tenant)

    return Counter(await asyncio.gather(*(one(i) for i in range(total))))


def _clear_of_boundary(redis: Redis, period: float, margin: float) -> None:
    """Wait (on Redis's clock, which the limiter uses) until at least `margin`
    seconds remain in the current fixed window, so that a burst never straddles two
    windows: a straddling burst is allowed twice the limit, by design."""
    deadline = time.monotonic() + period
    while time.monotonic() < deadline:
        seconds, micros = redis.time()
        now = seconds + micros / 1e6
        if period - (now % period) >= margin:
            return
        time.sleep(0.2)  # waiting for the wall clock to pass a window boundary
    raise AssertionError("Redis's clock did not move")


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    """One upstream for the module's gateway subprocesses: a RecordingUpstream on an
    event loop of its own thread (each test drives its burst with asyncio.run)."""
    import threading

    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, RecordingUpstream] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        up = loop.run_until_complete(RecordingUpstream().start())
        holder["up"] = up
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield holder["up"].port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.fixture(scope="module")
def two_gateways(
    tmp_path_factory: pytest.TempPathFactory, upstream_port: int
) -> Iterator[tuple[list[int], str]]:
    """Two `tollway serve` processes sharing the real Redis; yields their ports and
    the run's namespace."""
    namespace = "exact-" + uuid.uuid4().hex[:12]
    rate_limit = (
        "{limits: [{per: minute, limit: 100}], key_by: header:X-Tenant,"
        f" algorithm: fixed_window, namespace: {namespace}, on_store_error: fail_closed}}"
    )
    day = (
        "{limits: [{per: day, limit: 5}], key_by: header:X-Tenant,"
        f" namespace: {namespace}-day, on_store_error: fail_closed}}"
    )
    url = f"http://127.0.0.1:{upstream_port}"
    plugins = (
        "plugins:\n"
        f"  - name: rate-limit\n    route: api\n    config: {rate_limit}\n"
        f"  - name: rate-limit\n    route: quota\n    config: {day}\n"
    )
    routes = "  - name: quota\n    service: up\n    paths: [/quota]\n"
    env = {"TOLLWAY_REDIS_URL": SHARED_REDIS}
    procs = []
    try:
        for i in range(2):
            d = tmp_path_factory.mktemp(f"gw{i}")
            (d / "tollway.yaml").write_text(api_config(url, plugins, routes=routes))
            # Each its own data dir and SQLite file: only Redis is shared.
            procs.append(GatewayProcess(d / "tollway.yaml", env=env).start(timeout=60))
        yield [p.port for p in procs], namespace
    finally:
        for p in procs:
            p.__exit__(None, None, None)


def test_two_processes_share_a_limit_exactly(two_gateways: tuple[list[int], str]) -> None:
    """1,000 concurrent requests over two processes, limit 100 per minute: exactly
    100 pass and 900 get 429, five times over."""
    ports, _ = two_gateways
    redis = Redis.from_url(SHARED_REDIS)
    try:
        for run in range(5):
            _clear_of_boundary(redis, 60.0, margin=20.0)
            tenant = f"t{run}-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            counts = asyncio.run(_burst(ports, tenant, 1000))
            elapsed = time.monotonic() - started
            print(f"run {run}: {dict(counts)} in {elapsed:.2f}s")
            assert counts == Counter({200: 100, 429: 900}), counts
    finally:
        redis.close()


def test_two_processes_share_a_daily_quota_exactly(two_gateways: tuple[list[int], str]) -> None:
    ports, _ = two_gateways
    redis = Redis.from_url(SHARED_REDIS)
    try:
        _clear_of_boundary(redis, 86400.0, margin=120.0)
    finally:
        redis.close()

    async def run() -> Counter[int]:
        tenant = "day-" + uuid.uuid4().hex[:8]
        gate = asyncio.Semaphore(100)

        async def one(i: int) -> int:
            async with gate:
                request = f"GET /quota/x HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\n\r\n"
                data = await exchange_raw(ports[i % 2], request.encode(), timeout=30, expect=1)
                return parse_responses(data)[0].status

        return Counter(await asyncio.gather(*(one(i) for i in range(200))))

    counts = asyncio.run(run())
    assert counts == Counter({200: 5, 429: 195}), counts


# ---- Redis dies ------------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream() as up:
        yield up


@contextlib.asynccontextmanager
async def _private_redis_gateway(
    tmp_path: Path, config: str
) -> AsyncIterator[tuple[Gateway, PrivateRedis]]:
    """A gateway on a redis-server of its own (killed by its pid afterwards)."""
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        async with running_gateway(tmp_path, config, redis_url=server.url) as gw:
            yield gw, server
    finally:
        server.kill()


async def _statuses(gw: Gateway, tenant: str, n: int) -> list[int]:
    return [await _get(gw.port, tenant) for _ in range(n)]


async def _call(gw: Gateway, tenant: str) -> Parsed:
    request = f"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Tenant: {tenant}\r\n\r\n".encode()
    return parse_responses(await exchange_raw(gw.port, request, timeout=30, expect=1))[0]


def _rl(mode: str, extra: str = "") -> str:
    return (
        "{limits: [{per: minute, limit: 4}], key_by: header:X-Tenant,"
        f" on_store_error: {mode}{extra}}}"
    )


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed", "degrade_to_local"])
async def test_redis_killed_mid_run(tmp_path: Path, upstream: RecordingUpstream, mode: str) -> None:
    server = PrivateRedis(tmp_path / "redis").start()
    extra = ", degrade_share: 0.5" if mode == "degrade_to_local" else ""
    try:
        async with running_gateway(
            tmp_path, _config(upstream.url, _rl(mode, extra)), redis_url=server.url
        ) as gw:
            assert await _statuses(gw, "a", 5) == [200, 200, 200, 200, 429]
            server.kill()
            started = time.monotonic()
            got = await _statuses(gw, "b", 12)
            elapsed = time.monotonic() - started
            if mode == "fail_open":
                assert got == [200] * 12  # unlimited while the store is down
            elif mode == "fail_closed":
                assert got == [503] * 12
                resp = await _call(gw, "b")
                body = resp.json()
                assert isinstance(body, dict) and body["error"]["code"] == "limiter_unavailable"
                assert resp.header("retry-after") == "1"
            else:
                # Each node counts alone with half of the limit.
                assert got == [200, 200] + [429] * 10
            # The breaker stops waiting on the dead Redis: twelve requests take far
            # less than twelve socket timeouts.
            assert elapsed < 12 * 0.25, elapsed
            assert gw.runtime is not None and gw.runtime.limits is not None
            events = gw.runtime.limits.stats.store_events
            assert events[("redis", "error")] >= 1
            assert events[("redis", "breaker_open")] >= 1
            expected = {"fail_open": "fail_open", "fail_closed": "fail_closed"}.get(
                mode, "degraded"
            )
            assert events[("redis", expected)] == 12 + (mode == "fail_closed")
    finally:
        server.kill()


async def test_limits_come_back_when_redis_does(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        async with running_gateway(
            tmp_path, _config(upstream.url, _rl("fail_closed")), redis_url=server.url
        ) as gw:
            assert await _statuses(gw, "a", 1) == [200]
            server.kill()
            assert await _statuses(gw, "a", 3) == [503, 503, 503]
            server = PrivateRedis(tmp_path / "redis", port=server.port).start()
            # The breaker lets a probe through after its open time; poll for it.
            deadline = time.monotonic() + 10
            status = 503
            while status == 503 and time.monotonic() < deadline:
                status = await _get(gw.port, "c")
                if status == 503:
                    await asyncio.sleep(0.1)  # the breaker's open time must pass
            assert status == 200
            # A fresh Redis: counting starts again, exactly.
            assert await _statuses(gw, "c", 4) == [200, 200, 200, 429]
    finally:
        server.kill()


async def test_script_flushed_mid_run_is_loaded_again_and_counts_exactly(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    # A check normally waits on the open connection's reply without a task; a
    # NOSCRIPT reply there (Redis restarted or flushed its scripts) must fall back
    # to loading the script and checking once more, counting the request once.
    config = _config(upstream.url, _rl("fail_closed"))
    async with _private_redis_gateway(tmp_path, config) as (gw, server):
        assert await _statuses(gw, "a", 2) == [200, 200]
        with Redis.from_url(server.url) as admin:
            admin.script_flush()  # the private server: allowed here
            first = await _call(gw, "a")
            assert first.status == 200
            assert first.header("x-ratelimit-remaining") == "1"
            assert await _statuses(gw, "a", 2) == [200, 429]
            stats = admin.info("commandstats")
        assert stats["cmdstat_script|load"]["calls"] >= 1
        assert gw.runtime is not None and gw.runtime.limits is not None
        assert gw.runtime.limits.stats.store_events[("redis", "error")] == 0


async def test_hooks_after_the_limit_run_once_redis_answers(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    # request-transformer runs after rate-limit (lower priority): the gateway waits
    # for Redis's answer, then runs it, and only then calls the upstream.
    plugins = (
        "plugins:\n"
        f"  - name: rate-limit\n    config: {_rl('fail_closed')}\n"
        "  - name: request-transformer\n    config: {add: {headers: ['x-limited:yes']}}\n"
    )
    async with _private_redis_gateway(tmp_path, api_config(upstream.url, plugins)) as (gw, _):
        assert await _statuses(gw, "t", 5) == [200, 200, 200, 200, 429]
        assert len(upstream.requests) == 4
        for req in upstream.requests:
            assert ("x-limited", "yes") in req.headers


async def test_concurrency_slots_live_in_redis(tmp_path: Path) -> None:
    release = asyncio.Event()
    namespace = "conc-" + uuid.uuid4().hex[:12]
    async with held_upstream(release) as up:
        cfg = f"{{concurrency: 2, key_by: ip, namespace: {namespace}}}"
        async with running_gateway(
            tmp_path, _config(up.url, cfg).replace("services:", TRUSTED + "\nservices:", 1),
            redis_url=SHARED_REDIS,
        ) as gw:  # fmt: skip
            await concurrency_run(gw, up, release)
            assert gw.runtime is not None and gw.runtime.limits is not None
            redis = gw.runtime.limits.redis
            assert redis is not None
            key = redis.key_for([namespace, "ip=198.51.100.1"], Concurrency(2))
            # Every slot was given back (in the background: poll for it).
            deadline = time.monotonic() + 5
            while await redis.client.call("ZCARD", key):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)  # releases run after the response went out

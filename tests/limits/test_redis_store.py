"""RedisLimiter against a real Redis: parity with the pure functions, exactness,
keys and TTLs, refunds, leases, NOSCRIPT, round trips, and failures.

The limiter talks through its own client (resp.RespClient); the tests inspect
Redis with redis-py. The shared Redis (127.0.0.1:6379) is only read and written
under a unique prefix per test, deleted afterwards. Whatever must flush scripts,
count commands or die runs on a private redis-server started here and killed by
its pid.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.crc import key_slot

from support.gateway import free_port
from support.redis_server import SHARED_REDIS_URL, drop_keys, private_redis, shared_client
from support.relay import FaultRelay
from tollway.limits import (
    NEVER,
    Concurrency,
    FixedWindow,
    Gcra,
    Limit,
    LimitResult,
    MemoryLimiter,
    SlidingState,
    SlidingWindow,
)
from tollway.limits.errors import LimiterUnavailable
from tollway.limits.memory import Charge
from tollway.limits.multi import Windows
from tollway.limits.redis_store import RedisLimiter, encode_key
from tollway.limits.resp import RespClient

pytestmark = pytest.mark.needs_redis

REDIS_URL = SHARED_REDIS_URL
NY = "America/New_York"


def unique_prefix() -> str:
    return f"test:tollway:rl:{uuid.uuid4().hex}:"


@pytest.fixture
async def limiter(redis: Redis) -> AsyncIterator[RedisLimiter]:
    prefix = unique_prefix()
    client = RespClient.from_url(REDIS_URL, timeout=2.0)
    try:
        yield RedisLimiter(client, prefix=prefix)
    finally:
        await client.aclose()
        await drop_keys(redis, prefix)


# -- a private redis-server ----------------------------------------------------------


# -- parity with MemoryLimiter on a fake clock ---------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at_local(tz: str, year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(tz)).timestamp()


Check = tuple[str, Any]


def ops(scale: float, n_limits: int) -> st.SearchStrategy[list[tuple[float, Check]]]:
    """(dt, action) sequences: checks with a cost (or one per limit), refunds of an
    earlier charge (with or without a cost); dt lands on round instants or anywhere.

    The clock never goes back here: MemoryLimiter keeps a state that became as
    good as fresh until its next sweep, where Redis drops it at once, so after a
    step back they may differ (both are right; see test_clock_going_back)."""
    dt = st.one_of(
        st.sampled_from([0.0, scale / 8, scale / 4, scale / 2, scale, 2 * scale]),
        st.floats(0, 1.5 * scale, allow_nan=False),
    )
    cost = st.integers(0, 4)
    costs = cost | st.lists(cost, min_size=n_limits, max_size=n_limits).map(tuple)
    check = st.tuples(st.just("check"), costs)
    refund = st.tuples(st.just("refund"), st.tuples(st.integers(0, 40), st.none() | cost))
    action = st.one_of(check, check, check, refund)
    return st.lists(st.tuples(dt, action), min_size=1, max_size=25)


async def replay(limits: Sequence[Limit], start: float, steps: list[tuple[float, Check]]) -> None:
    client = await shared_client()
    prefix = unique_prefix()
    own = RespClient.from_url(REDIS_URL, timeout=2.0)
    store = RedisLimiter(own, prefix=prefix)
    clock = FakeClock(start)
    memory = MemoryLimiter(clock=clock)
    key = ("parity", "key")
    charges: list[tuple[Charge, Charge]] = []
    try:
        for step, (dt, (kind, arg)) in enumerate(steps):
            clock.now += dt
            if kind == "check":
                got = await store.check(key, limits, arg, now=clock.now)
                want = memory.check(key, limits, arg)
                assert got == want, f"step {step} at {clock.now!r}:\n{got}\n!=\n{want}"
                if got.charge is not None and want.charge is not None:
                    charges.append((want.charge, got.charge))
            elif charges:
                which, cost = arg
                mine, theirs = charges[which % len(charges)]
                memory.refund(mine, cost)
                await store.refund(theirs, cost, now=clock.now)
    finally:
        await own.aclose()
        await drop_keys(client, prefix)
        await client.aclose()


SCENARIOS: dict[str, tuple[tuple[Limit, ...], float, float]] = {
    # name: (limits, start, dt scale)
    "gcra": ((Gcra(5, 10.0, burst=3),), 1_700_000_000.0, 4.0),
    "gcra-odd": ((Gcra(7, 3.0),), 1_700_000_000.3, 1.0),
    "sliding": ((SlidingWindow(6, 10.0),), 1_699_999_990.0, 4.0),
    "fixed-minute": ((FixedWindow(5, "minute"),), 1_699_999_950.0, 20.0),
    "fixed-day-ny": ((FixedWindow(4, "day", NY),), at_local(NY, 2024, 11, 2, 20), 3 * 3600.0),
    "fixed-day-ny-spring": ((FixedWindow(3, "day", NY),), at_local(NY, 2024, 3, 9, 21), 3 * 3600.0),
}
MULTI: tuple[Limit, ...] = (
    Gcra(5, 10.0),
    SlidingWindow(8, 30.0),
    FixedWindow(10, "minute"),
    FixedWindow(12, "day", NY),
)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_parity_with_memory_limiter(name: str) -> None:
    limits, start, scale = SCENARIOS[name]

    @settings(max_examples=25, deadline=None)
    @given(ops(scale, len(limits)), st.floats(0, scale))
    def run(steps: list[tuple[float, Check]], offset: float) -> None:
        asyncio.run(replay(limits, start + offset, steps))

    run()


@settings(max_examples=40, deadline=None)
@given(ops(5.0, len(MULTI)), st.floats(0, 60))
def test_parity_multi_window_with_per_limit_costs(
    steps: list[tuple[float, Check]], offset: float
) -> None:
    asyncio.run(replay(MULTI, at_local(NY, 2024, 11, 2, 23, 59) + offset, steps))


async def test_clock_going_back(limiter: RedisLimiter) -> None:
    """A step back keeps the newer window already counted, as the pure functions do
    (while the state is alive; see ops() for a state that became fresh)."""
    limits = (FixedWindow(5, "minute"), SlidingWindow(5, 60.0), Gcra(5, 60.0))
    clock = FakeClock(1_699_999_980.0)
    memory = MemoryLimiter(clock=clock)
    for dt in (0.0, 60.0, -30.0, -31.0, 5.0):
        clock.now += dt
        got = await limiter.check(("back",), limits, now=clock.now)
        assert got == memory.check(("back",), limits), dt
    # 2 counted in the newer minute (the GCRA refused the last two), weighted 1 back there
    assert [d.remaining for d in got.decisions] == [3, 2, 0]
    assert not got.allowed and got.refused_by == limits[2]


# -- exactness, all or nothing -------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    [Gcra(100, 86400.0), SlidingWindow(100, 86400.0), FixedWindow(100, "month")],
    ids=["gcra", "sliding", "fixed"],
)
async def test_500_concurrent_checks_allow_exactly_100(redis: Redis, limit: Limit) -> None:
    prefix = unique_prefix()
    # from_url's own client: the 500 scripts are pipelined on its one connection.
    limiter = RedisLimiter.from_url(REDIS_URL, timeout=2.0, prefix=prefix)
    try:
        results = await asyncio.gather(*(limiter.check(("burst",), [limit]) for _ in range(500)))
        assert sum(r.allowed for r in results) == 100
        assert sorted(r.decision.remaining for r in results if r.allowed) == list(range(100))
    finally:
        await limiter.aclose()
        await drop_keys(redis, prefix)


async def test_a_refusal_consumes_nothing_anywhere(limiter: RedisLimiter) -> None:
    hour, day = FixedWindow(2, "hour"), FixedWindow(5, "day", NY)
    for _ in range(2):
        assert (await limiter.check(("u",), [hour, day])).allowed
    refused = await limiter.check(("u",), [hour, day])
    assert not refused.allowed and refused.refused_by == hour and refused.charge is None
    assert refused.decisions[1].allowed and refused.decisions[1].remaining == 3
    # the day window alone still has 3: the refused request took nothing from it
    assert (await limiter.check(("u",), [day])).decision.remaining == 2


async def test_a_refused_first_check_writes_no_key(limiter: RedisLimiter, redis: Redis) -> None:
    result = await limiter.check(("n",), [FixedWindow(5, "minute"), Gcra(2, 1.0)], (1, 3))
    assert not result.allowed and result.decision.retry_after == NEVER
    assert [k async for k in redis.scan_iter(match=limiter.prefix + "*")] == []


async def test_a_compiled_windows_checks_like_a_list(limiter: RedisLimiter, redis: Redis) -> None:
    """The plugin passes a multi.Windows (its encoding is kept on it, shared by every
    limiter); a list is encoded and cached here. Both count the same counters, and a
    second limiter with another prefix on the same Windows keeps its own keys."""
    windows = Windows(MULTI)
    at = at_local(NY, 2024, 11, 2, 12)
    other = RedisLimiter(limiter.client, prefix=unique_prefix())
    try:
        clock = FakeClock(at)
        memory = MemoryLimiter(clock=clock)
        for i in range(6):
            clock.now = at + i
            limits = windows if i % 2 else list(MULTI)
            got = await limiter.check(("w",), limits, (1, 2, 1, 1), now=clock.now)
            assert got == memory.check(("w",), MULTI, (1, 2, 1, 1)), i
        fresh = await other.check(("w",), windows, (1, 2, 1, 1), now=at + 6)
        assert [d.remaining for d in fresh.decisions] == [4, 6, 9, 11]
    finally:
        await drop_keys(redis, other.prefix)


async def test_per_limit_costs(limiter: RedisLimiter) -> None:
    minute, day = FixedWindow(10, "minute"), FixedWindow(20, "day")
    result = await limiter.check(("c",), [minute, day], (1, 5))
    assert [d.remaining for d in result.decisions] == [9, 15]
    assert result.charge is not None and result.charge.costs == (1, 5)
    with pytest.raises(ValueError, match="one cost per limit"):
        await limiter.check(("c",), [minute, day], (1, 2, 3))
    with pytest.raises(ValueError, match="cost must be"):
        await limiter.check(("c",), [minute], -1)


async def test_bad_arguments_are_refused_before_redis(limiter: RedisLimiter) -> None:
    with pytest.raises(ValueError, match="at least one"):
        await limiter.check(("x",), [])
    with pytest.raises(ValueError, match="share a counter"):
        await limiter.check(("x",), [FixedWindow(1), FixedWindow(2)])
    with pytest.raises(ValueError, match="braces"):
        RedisLimiter(limiter.client, prefix="bad{")


# -- keys and TTLs -------------------------------------------------------------------


def test_key_encoding_is_collision_free() -> None:
    cases = [(), ("",), ("", ""), ("a:b",), ("a", "b"), ("a|1:b",), ("1:a",), ("a}",), ("é",)]
    encoded = [encode_key(c) for c in cases]
    assert len(set(encoded)) == len(cases)
    assert all(e for e in encoded)  # never an empty hash tag


async def test_colon_in_a_part_never_shares_a_counter(limiter: RedisLimiter) -> None:
    minute = FixedWindow(1, "minute")
    assert (await limiter.check(("a:b",), [minute])).allowed
    assert (await limiter.check(("a", "b"), [minute])).allowed
    assert not (await limiter.check(("a", "b"), [minute])).allowed
    assert limiter.key_for(("a:b",), minute) != limiter.key_for(("a", "b"), minute)


def test_every_window_of_a_key_lives_in_one_cluster_slot() -> None:
    limiter = RedisLimiter(RespClient(), prefix="p:")
    for parts in [("a",), ("a}", "b"), ("{x}",), ()]:
        names = [limiter.key_for(parts, limit) for limit in (*MULTI, Concurrency(3))]
        assert len({key_slot(n.encode()) for n in names}) == 1, names


async def test_every_key_written_has_a_ttl_bounded_by_its_window(
    limiter: RedisLimiter, redis: Redis
) -> None:
    limits = (*MULTI, FixedWindow(3, "month", NY))
    assert (await limiter.check(("ttl",), limits)).allowed
    bounds = {  # longest a state can stay relevant, in ms
        "gcra": 10_000,
        "sliding": 60_000,
        "fixed:minute": 60_000,
        "fixed:day": 25 * 3600_000,
        "fixed:month": 31 * 86400_000,
    }
    written = 0
    for limit in limits:
        name = limiter.key_for(("ttl",), limit)
        ttl = await redis.pttl(name)
        bound = next(v for k, v in bounds.items() if name.split("}:")[1].startswith(k))
        assert 0 < ttl <= bound, (name, ttl)
        written += 1
    assert written == len(limits)


async def test_a_state_whose_ttl_passed_is_fresh(limiter: RedisLimiter, redis: Redis) -> None:
    limit = Gcra(2, 60.0)
    for _ in range(2):
        await limiter.check(("exp",), [limit])
    assert not (await limiter.check(("exp",), [limit])).allowed
    await redis.delete(limiter.key_for(("exp",), limit))  # what the TTL does
    assert (await limiter.check(("exp",), [limit])).decision.remaining == 1


async def test_a_zero_cost_check_on_a_fresh_key_stores_nothing(
    limiter: RedisLimiter, redis: Redis
) -> None:
    assert (await limiter.check(("zero",), list(MULTI), 0)).allowed
    assert [k async for k in redis.scan_iter(match=limiter.prefix + "*")] == []


# -- refunds --------------------------------------------------------------------------


async def test_refund_gives_back_once(limiter: RedisLimiter) -> None:
    limits = [FixedWindow(10, "hour"), Gcra(10, 3600.0), SlidingWindow(10, 3600.0)]
    result = await limiter.check(("r",), limits, 4)
    assert [d.remaining for d in result.decisions] == [6, 6, 6]
    assert result.charge is not None
    await limiter.refund(result.charge, 1)
    assert result.charge.refunded
    await limiter.refund(result.charge)  # once per charge: nothing more
    after = await limiter.check(("r",), limits, 0)
    assert [d.remaining for d in after.decisions] == [7, 7, 7]

    second = await limiter.check(("r",), limits, 2)
    assert second.charge is not None
    await limiter.refund(second.charge)
    again = await limiter.check(("r",), limits, 0)
    assert [d.remaining for d in again.decisions] == [7, 7, 7]
    with pytest.raises(ValueError, match="cost must be"):
        await limiter.refund(Charge(("r",), tuple(limits), (1, 1, 1), second.charge.charged), -1)


async def test_refund_of_an_expired_counter_does_nothing(
    limiter: RedisLimiter, redis: Redis
) -> None:
    limit = FixedWindow(3, "minute")
    result = await limiter.check(("gone",), [limit])
    assert result.charge is not None
    await redis.delete(limiter.key_for(("gone",), limit))
    await limiter.refund(result.charge)
    assert await redis.exists(limiter.key_for(("gone",), limit)) == 0


# -- calendar bounds and clocks --------------------------------------------------------


async def test_calendar_window_follows_redis_clock_not_the_local_one(redis: Redis) -> None:
    prefix = unique_prefix()
    day = FixedWindow(10, "day", NY)
    client = RespClient.from_url(REDIS_URL, timeout=2.0)
    try:
        honest = RedisLimiter(client, prefix=prefix)
        # Local clocks off by 20 hours either way: still within the previous/next
        # window sent, so the script counts in the day holding Redis's now.
        ahead = RedisLimiter(client, prefix=prefix, wall_clock=lambda: time.time() + 20 * 3600)
        behind = RedisLimiter(client, prefix=prefix, wall_clock=lambda: time.time() - 20 * 3600)
        remaining = []
        for store in (honest, ahead, behind, honest):
            remaining.append((await store.check(("cal",), [day])).decision.remaining)
        if remaining != [9, 8, 7, 6]:  # a local midnight passed during the test
            pytest.skip("crossed midnight in New York")
        # Days off: no window sent holds Redis's now; the closest is used.
        far = RedisLimiter(client, prefix=prefix, wall_clock=lambda: time.time() + 5 * 86400)
        assert (await far.check(("cal2",), [day])).allowed
    finally:
        await client.aclose()
        await drop_keys(redis, prefix)


async def test_redis_time_is_used_without_now(limiter: RedisLimiter, redis: Redis) -> None:
    def seconds(reply: tuple[int, int]) -> float:
        return reply[0] + reply[1] / 1e6

    before = seconds(await redis.time())
    result = await limiter.check(("t",), [SlidingWindow(3, 3600.0)])
    after = seconds(await redis.time())
    assert result.charge is not None
    state = result.charge.charged[0]
    assert isinstance(state, SlidingState)
    assert state.window_start in {(before // 3600) * 3600, (after // 3600) * 3600}


# -- concurrency leases ---------------------------------------------------------------


async def test_leases_limit_in_flight_and_release_is_idempotent(
    limiter: RedisLimiter, redis: Redis
) -> None:
    limit = Concurrency(2, retry_hint=0.5)
    first, lease1 = await limiter.acquire(("job",), limit)
    second, lease2 = await limiter.acquire(("job",), limit)
    assert (first.remaining, second.remaining) == (1, 0)
    refused, none = await limiter.acquire(("job",), limit)
    assert not refused.allowed and none is None and refused.retry_after == 0.5
    too_big, none = await limiter.acquire(("job",), limit, 3)
    assert too_big.retry_after == NEVER and none is None
    assert lease1 is not None and lease2 is not None
    assert await lease1.release() is True
    assert await lease1.release() is False
    again, lease3 = await limiter.acquire(("job",), limit)
    assert again.allowed and lease3 is not None
    async with lease3:
        pass
    assert lease3.released
    await lease2.release()
    assert await redis.exists(limiter.key_for(("job",), limit)) == 0


async def test_concurrent_acquires_are_exact(limiter: RedisLimiter) -> None:
    limit = Concurrency(10)
    results = await asyncio.gather(*(limiter.acquire(("c",), limit) for _ in range(100)))
    leases = [lease for _, lease in results if lease is not None]
    assert len(leases) == 10
    await asyncio.gather(*(lease.release() for lease in leases))
    assert (await limiter.acquire(("c",), limit, 10))[0].allowed


async def test_a_leaked_lease_expires_by_itself(limiter: RedisLimiter, redis: Redis) -> None:
    limit = Concurrency(1)
    _, leaked = await limiter.acquire(("leak",), limit, lease_ttl=0.3)
    assert leaked is not None  # and never released: its node "crashed"
    assert (await limiter.acquire(("leak",), limit, lease_ttl=0.3))[1] is None
    ttl = await redis.pttl(limiter.key_for(("leak",), limit))
    assert 0 < ttl <= 300
    started = time.monotonic()
    deadline = started + 5
    while True:
        decision, lease = await limiter.acquire(("leak",), limit, lease_ttl=10)
        if lease is not None:
            break
        assert time.monotonic() < deadline, "the leaked lease never expired"
        await asyncio.sleep(0.02)  # poll interval
    assert decision.remaining == 0
    # The late release of the leaked lease must not free the new holder's slot.
    assert await leaked.release() is True
    assert (await limiter.acquire(("leak",), limit))[1] is None
    await lease.release()


# -- scripts and round trips (private server) --------------------------------------------


async def test_noscript_loads_the_script_and_retries() -> None:
    with private_redis() as server:
        client: Redis = Redis.from_url(server.url)
        limiter = RedisLimiter.from_url(server.url, timeout=2.0)
        try:
            limit = FixedWindow(5, "minute")
            assert (await limiter.check(("s",), [limit])).decision.remaining == 4
            await client.script_flush()  # private server: allowed here
            assert (await limiter.check(("s",), [limit])).decision.remaining == 3
            stats = await client.info("commandstats")
            assert stats["cmdstat_script|load"]["calls"] == 2
            _, lease = await limiter.acquire(("s",), Concurrency(1))
            assert lease is not None
        finally:
            await limiter.aclose()
            await client.aclose()


async def test_one_evalsha_per_check_whatever_the_windows() -> None:
    limits = [Gcra(100, 60.0), SlidingWindow(100, 60.0), FixedWindow(100, "day", NY)]
    with private_redis() as server:
        client: Redis = Redis.from_url(server.url)
        limiter = RedisLimiter.from_url(server.url, timeout=2.0)
        try:
            await limiter.check(("warm",), limits)  # loads the script
            await client.config_resetstat()
            n = 25
            for i in range(n):
                await limiter.check((f"k{i % 3}",), limits)
            stats = await client.info("commandstats")
            assert stats["cmdstat_evalsha"]["calls"] == n
            assert "cmdstat_eval" not in stats and "cmdstat_script|load" not in stats
        finally:
            await limiter.aclose()
            await client.aclose()


# -- failures ---------------------------------------------------------------------------


async def test_a_dead_redis_raises_limiter_unavailable_fast() -> None:
    with private_redis() as server:
        limiter = RedisLimiter.from_url(server.url, timeout=0.25)
        try:
            result = await limiter.check(("d",), [FixedWindow(5, "minute")])
            _, lease = await limiter.acquire(("d",), Concurrency(2))
            assert result.charge is not None and lease is not None
            server.kill()
            charge = result.charge
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: limiter.check(("d",), [FixedWindow(5, "minute")]),
                lambda: limiter.refund(charge),
                lambda: limiter.acquire(("d",), Concurrency(2)),
                lease.release,
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(LimiterUnavailable):
                    await call()
                assert time.monotonic() - started < 1.0
            assert not lease.released  # may be retried; it also expires by itself
        finally:
            await limiter.aclose()


async def test_a_closed_port_raises_limiter_unavailable() -> None:
    limiter = RedisLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=0.25)
    try:
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable, match="ConnectionError"):
            await limiter.check(("x",), [Gcra(1, 1.0)])
        assert time.monotonic() - started < 1.0
    finally:
        await limiter.aclose()


@pytest.mark.parametrize("fault", ["drop", "blackhole"])
async def test_a_silent_redis_times_out_within_the_bound(redis: Redis, fault: str) -> None:
    prefix = unique_prefix()
    try:
        async with FaultRelay("127.0.0.1", 6379) as relay:
            limiter = RedisLimiter.from_url(
                f"redis://127.0.0.1:{relay.port}/0", timeout=0.25, prefix=prefix
            )
            try:
                if fault == "blackhole":  # an open connection goes silent
                    assert (await limiter.check(("b",), [FixedWindow(5, "minute")])).allowed
                getattr(relay, fault)()
                started = time.monotonic()
                with pytest.raises(LimiterUnavailable):
                    await limiter.check(("b",), [FixedWindow(5, "minute")])
                elapsed = time.monotonic() - started
                assert 0.2 < elapsed < 0.25 * 3
            finally:
                relay.passthrough()
                await limiter.aclose()
    finally:
        await drop_keys(redis, prefix)


async def test_an_error_reply_becomes_limiter_unavailable(
    limiter: RedisLimiter, redis: Redis
) -> None:
    limit = Gcra(3, 1.0)
    await redis.lpush(limiter.key_for(("w",), limit), "not a counter")
    with pytest.raises(LimiterUnavailable, match="WRONGTYPE"):
        await limiter.check(("w",), [limit])


async def test_result_types_match_memory_limiter(limiter: RedisLimiter) -> None:
    result = await limiter.check(("types",), [Gcra(3, 1.0)])
    assert isinstance(result, LimitResult) and isinstance(result.charge, Charge)

"""MemoryLimiter on a fake clock: keys, windows, refunds, memory bound."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from support.clock import FakeClock
from tollway.limits import FixedWindow, Gcra, MemoryLimiter, SlidingWindow
from tollway.limits.service import LimitService

T0 = 1_699_999_980.0  # a minute boundary


PER_MINUTE = FixedWindow(limit=3, per="minute")
BURSTY = Gcra(limit=2, period=1.0, burst=4)


def test_check_consumes_and_refuses() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock)
    results = [limiter.check(["ip", "1.2.3.4"], [PER_MINUTE]) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.decision.remaining for r in results] == [2, 1, 0, 0]
    refused = results[-1]
    assert refused.refused_by == PER_MINUTE and refused.charge is None
    assert refused.decision.retry_after == 60.0
    clock.advance(60)
    assert limiter.check(["ip", "1.2.3.4"], [PER_MINUTE]).decision.remaining == 2


def test_two_keys_never_share_a_counter() -> None:
    limiter = MemoryLimiter(clock=FakeClock(T0))
    one = FixedWindow(limit=1, per="minute")
    assert limiter.check(["a:b"], [one]).allowed
    assert limiter.check(["a", "b"], [one]).allowed  # no joining of key parts
    assert limiter.check(["a"], [one]).allowed
    assert limiter.check(["a", "b", ""], [one]).allowed
    assert not limiter.check(["a:b"], [one]).allowed
    assert not limiter.check(["a", "b"], [one]).allowed


def test_different_limits_on_one_key_are_separate_counters() -> None:
    limiter = MemoryLimiter(clock=FakeClock(T0))
    assert limiter.check(["k"], [FixedWindow(1, "minute")]).allowed
    assert limiter.check(["k"], [FixedWindow(1, "hour")]).allowed
    assert limiter.check(["k"], [SlidingWindow(1, 60.0)]).allowed
    assert not limiter.check(["k"], [FixedWindow(1, "minute")]).allowed


def test_a_raised_allowance_keeps_what_was_spent() -> None:
    """A plan upgrade or a burst grant raises the limit mid-window: the count stays,
    so "5 per day" raised to 8 leaves 3 more, not 8."""
    limiter = MemoryLimiter(clock=FakeClock(T0))
    for _ in range(5):
        assert limiter.check(["k"], [FixedWindow(5, "day")]).allowed
    assert not limiter.check(["k"], [FixedWindow(5, "day")]).allowed
    raised = [limiter.check(["k"], [FixedWindow(8, "day")]) for _ in range(4)]
    assert [r.allowed for r in raised] == [True, True, True, False]
    # GCRA: a larger burst at the same rate keeps the bucket; a new rate starts afresh.
    for _ in range(4):
        assert limiter.check(["g"], [Gcra(2, 1.0, burst=4)]).allowed
    assert limiter.check(["g"], [Gcra(2, 1.0, burst=6)]).decision.remaining == 1
    assert limiter.check(["g"], [Gcra(3, 1.0, burst=6)]).decision.remaining == 5


def test_one_cost_per_window() -> None:
    limiter = MemoryLimiter(clock=FakeClock(T0))
    limits = [FixedWindow(10, "minute"), FixedWindow(10, "day")]
    result = limiter.check(["k"], limits, [1, 5])
    assert [d.remaining for d in result.decisions] == [9, 5]
    assert limiter.check(["k"], limits, [1, 5]).allowed
    refused = limiter.check(["k"], limits, [1, 5])
    assert not refused.allowed and refused.refused_by == limits[1]
    assert result.charge is not None
    limiter.refund(result.charge)
    assert [d.remaining for d in limiter.check(["k"], limits, 0).decisions] == [9, 5]


def test_two_limits_sharing_a_counter_are_refused() -> None:
    limiter = MemoryLimiter(clock=FakeClock(T0))
    try:
        limiter.check(["k"], [FixedWindow(1, "minute"), FixedWindow(5, "minute")])
    except ValueError as exc:
        assert "share a counter" in str(exc)
    else:
        raise AssertionError("two minute windows were accepted")


def test_several_windows_all_or_nothing() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock)
    limits = [BURSTY, PER_MINUTE]
    first = limiter.check(["c"], limits, cost=2)
    assert first.allowed and [d.remaining for d in first.decisions] == [2, 1]
    assert first.decision.remaining == 1 and first.decision.limit == 3  # most restrictive
    refused = limiter.check(["c"], limits, cost=2)  # GCRA allows, the minute does not
    assert not refused.allowed and refused.refused_by == PER_MINUTE
    assert [d.remaining for d in refused.decisions] == [2, 1]  # nothing consumed
    assert limiter.check(["c"], limits, cost=1).allowed
    refused = limiter.check(["c"], limits, cost=1)
    assert refused.refused_by == PER_MINUTE and refused.decision.retry_after == 60.0
    assert refused.decisions[0].remaining == 1  # GCRA untouched by the refusal


def test_refund_returns_capacity_once_and_never_beyond_the_limit() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock)
    limits = [BURSTY, PER_MINUTE, SlidingWindow(3, 60.0)]
    result = limiter.check(["c"], limits, cost=2)
    assert result.charge is not None
    limiter.refund(result.charge)
    again = limiter.check(["c"], limits, cost=0)
    assert [d.remaining for d in again.decisions] == [4, 3, 3]
    limiter.refund(result.charge)  # a second refund does nothing
    assert [d.remaining for d in limiter.check(["c"], limits, 0).decisions] == [4, 3, 3]


def test_partial_refund_and_refund_after_the_window_is_over() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock)
    result = limiter.check(["c"], [PER_MINUTE], cost=3)
    assert result.charge is not None
    limiter.refund(result.charge, cost=1)
    assert limiter.check(["c"], [PER_MINUTE], 0).decision.remaining == 1
    late = limiter.check(["c"], [PER_MINUTE], cost=1)
    assert late.charge is not None
    clock.advance(60)
    limiter.check(["c"], [PER_MINUTE], cost=2)
    limiter.refund(late.charge)  # charged in the previous minute: nothing to give
    assert limiter.check(["c"], [PER_MINUTE], 0).decision.remaining == 1


def test_expired_states_are_dropped() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock, sweep_interval=5.0)
    for i in range(5000):
        limiter.check(["ip", str(i)], [BURSTY, PER_MINUTE])
    assert len(limiter) == 10_000
    clock.advance(30)  # GCRA states are full again, minute windows still live
    assert limiter.sweep() == 5000
    assert len(limiter) == 5000
    clock.advance(31)  # the minute is over
    limiter.check(["ip", "new"], [PER_MINUTE])  # a check past the interval sweeps
    assert len(limiter) == 1


def test_expired_state_reads_as_fresh_before_any_sweep() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock, sweep_interval=1e9)
    for _ in range(4):
        limiter.check(["k"], [BURSTY])
    clock.advance(2.0)
    assert limiter.check(["k"], [BURSTY], cost=0).decision.remaining == 4


def test_no_sweep_before_the_interval() -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock, sweep_interval=100.0)
    limiter.check(["a"], [BURSTY])
    clock.advance(50)
    limiter.check(["b"], [BURSTY])
    assert len(limiter) == 2  # "a" expired but waits for the next sweep


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(
        st.tuples(st.floats(0, 3, allow_nan=False), st.integers(1, 3), st.sampled_from("ab")),
        max_size=60,
    )
)
def test_property_gcra_through_the_store(reqs: list[tuple[float, int, str]]) -> None:
    clock = FakeClock(T0)
    limiter = MemoryLimiter(clock=clock, sweep_interval=1.0)
    spent = {"a": 0, "b": 0}
    for dt, cost, key in reqs:
        clock.advance(dt)
        result = limiter.check([key], [BURSTY], cost)
        if result.allowed:
            spent[key] += cost
        elapsed = clock.now - T0
        assert spent[key] <= math.floor(4 + 2 * elapsed + 1e-4)


def test_a_flood_of_keys_cannot_grow_the_table_without_end() -> None:
    """Distinct keys on a day quota stay live all day: past max_entries the oldest
    tenth is dropped (and counted), so memory stays bounded."""
    limiter = MemoryLimiter(clock=FakeClock(T0), max_entries=100)
    stats = LimitService(limiter).stats  # what tollway_limiter_store_events_total reads
    day = FixedWindow(5, "day")
    for i in range(1000):
        assert limiter.check([f"ip-{i}"], [day]).allowed
        assert len(limiter) <= 100
    assert limiter.evicted >= 900
    assert stats.store_events[("memory", "evicted")] == limiter.evicted
    # Recent keys keep their counts.
    assert limiter.check(["ip-999"], [day]).decision.remaining == 3

"""Fixed and sliding windows, window_bounds, and check_all over several windows."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.limits import (
    NEVER,
    FixedState,
    FixedWindow,
    Gcra,
    GcraState,
    SlidingState,
    SlidingWindow,
    check_all,
    evaluate,
    fixed_refund,
    fixed_window,
    initial_state,
    sliding_refund,
    sliding_window,
    window_bounds,
)

approx = lambda x: pytest.approx(x, abs=1e-6)  # noqa: E731
BERLIN = ZoneInfo("Europe/Berlin")
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ts(*args: int, tz: ZoneInfo = BERLIN) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


# -- window_bounds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("per", "start", "end"),
    [
        ("second", 1_700_000_000.0, 1_700_000_001.0),
        ("minute", 1_699_999_980.0, 1_700_000_040.0),
        ("hour", 1_699_999_200.0, 1_700_002_800.0),
        ("day", ts(2023, 11, 14, tz=ZoneInfo("UTC")), ts(2023, 11, 15, tz=ZoneInfo("UTC"))),
        ("month", ts(2023, 11, 1, tz=ZoneInfo("UTC")), ts(2023, 12, 1, tz=ZoneInfo("UTC"))),
    ],
)
def test_window_bounds_utc(per: str, start: float, end: float) -> None:
    assert window_bounds(T0 + 0.5, per, None) == (start, end)  # type: ignore[arg-type]
    assert window_bounds(start, per, "UTC") == (start, end)  # type: ignore[arg-type]
    assert window_bounds(end, per, "UTC")[0] == end  # type: ignore[arg-type]


def test_calendar_day_in_berlin_is_local_midnight() -> None:
    # 2023-11-14 22:13:20Z is 23:13:20 in Berlin (UTC+1): still the 14th there.
    start, end = window_bounds(T0, "day", "Europe/Berlin")
    assert (start, end) == (ts(2023, 11, 14), ts(2023, 11, 15))
    assert end - start == 86400
    # 23:30Z is already the 15th in Berlin.
    start, _ = window_bounds(ts(2023, 11, 14, 23, 30, tz=ZoneInfo("UTC")), "day", BERLIN)
    assert start == ts(2023, 11, 15)


def test_calendar_day_across_dst_changes_in_berlin() -> None:
    # 2026-03-29: clocks go 02:00 -> 03:00 (a 23-hour day).
    start, end = window_bounds(ts(2026, 3, 29, 12), "day", "Europe/Berlin")
    assert (start, end) == (ts(2026, 3, 29), ts(2026, 3, 30))
    assert end - start == 23 * 3600
    assert start == datetime(2026, 3, 28, 23, tzinfo=UTC).timestamp()  # UTC+1 midnight
    assert end == datetime(2026, 3, 29, 22, tzinfo=UTC).timestamp()  # UTC+2 midnight
    # 2026-10-25: clocks go 03:00 -> 02:00 (a 25-hour day); 02:30 happens twice.
    start, end = window_bounds(ts(2026, 10, 25, 23, 59), "day", "Europe/Berlin")
    assert end - start == 25 * 3600
    assert start == datetime(2026, 10, 24, 22, tzinfo=UTC).timestamp()
    second_0230 = datetime(2026, 10, 25, 1, 30, tzinfo=UTC).timestamp()
    assert window_bounds(second_0230, "day", "Europe/Berlin") == (start, end)


def test_month_boundaries() -> None:
    start, end = window_bounds(ts(2026, 1, 31, 23, 59, 59), "month", "Europe/Berlin")
    assert (start, end) == (ts(2026, 1, 1), ts(2026, 2, 1))
    start, end = window_bounds(ts(2026, 2, 1), "month", "Europe/Berlin")
    assert (start, end) == (ts(2026, 2, 1), ts(2026, 3, 1))
    assert end - start == 28 * 86400
    start, end = window_bounds(ts(2026, 12, 15), "month", "Europe/Berlin")
    assert (start, end) == (ts(2026, 12, 1), ts(2027, 1, 1))
    # March in Berlin loses an hour to DST.
    start, end = window_bounds(ts(2026, 3, 10), "month", BERLIN)
    assert end - start == 31 * 86400 - 3600


def test_window_bounds_rejects_unknown_period() -> None:
    with pytest.raises(ValueError):
        window_bounds(T0, "week", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FixedWindow(5, "week")  # type: ignore[arg-type]
    with pytest.raises(Exception):  # noqa: B017  (ZoneInfoNotFoundError)
        FixedWindow(5, "day", "Mars/Olympus")


# -- fixed window -------------------------------------------------------------


def test_fixed_window_counts_and_resets_at_the_boundary() -> None:
    params = FixedWindow(limit=3, per="minute")
    start = 1_699_999_980.0
    state = FixedState()
    for i, remaining in enumerate([2, 1, 0]):
        decision, state = fixed_window(state, start + 10 + i, 1, params)
        assert (decision.allowed, decision.remaining) == (True, remaining)
        assert decision.reset_after == approx(50 - i)
    decision, after = fixed_window(state, start + 20, 1, params)
    assert not decision.allowed and after is state
    assert (decision.remaining, decision.retry_after, decision.reset_after) == (
        0,
        approx(40),
        approx(40),
    )
    decision, state = fixed_window(state, start + 59.999, 1, params)
    assert not decision.allowed
    decision, state = fixed_window(state, start + 60, 1, params)
    assert (decision.allowed, decision.remaining) == (True, 2)
    assert state == FixedState(start + 60, 1)


def test_fixed_window_cost_and_cost_above_limit() -> None:
    params = FixedWindow(limit=5, per="second")
    decision, state = fixed_window(FixedState(), T0, 4, params)
    assert decision.remaining == 1
    decision, after = fixed_window(state, T0 + 0.5, 2, params)
    assert not decision.allowed and after is state and decision.remaining == 1
    assert decision.retry_after == approx(0.5)
    decision, after = fixed_window(FixedState(), T0, 6, params)
    assert not decision.allowed and decision.retry_after == NEVER and after == FixedState()
    assert decision.remaining == 5 and decision.reset_after == 0.0


def test_calendar_day_quota_resets_at_berlin_midnight_across_dst() -> None:
    """Seed 004: 5 stories per day, the day of Europe/Berlin; 2026-03-29 has 23 hours."""
    params = FixedWindow(limit=5, per="day", tz="Europe/Berlin")
    state = FixedState()
    now = ts(2026, 3, 29, 0, 30)
    for _ in range(5):
        decision, state = fixed_window(state, now, 1, params)
        assert decision.allowed
    decision, _ = fixed_window(state, ts(2026, 3, 29, 23, 59, 59), 1, params)
    assert not decision.allowed
    assert decision.retry_after == approx(1.0)
    # UTC midnight (02:00 Berlin on the 30th) is not the reset; Berlin midnight is.
    assert fixed_window(state, ts(2026, 3, 29, 23, 59, 59) + 0.999, 1, params)[0].allowed is False
    decision, state = fixed_window(state, ts(2026, 3, 30), 1, params)
    assert decision.allowed and decision.remaining == 4
    assert decision.reset_after == approx(86400)


def test_fixed_window_clock_going_back_keeps_the_newer_window() -> None:
    params = FixedWindow(limit=2, per="minute")
    _, state = fixed_window(FixedState(), 1_699_999_980.0 + 60, 2, params)
    decision, _ = fixed_window(state, 1_699_999_980.0 + 59, 1, params)
    assert not decision.allowed


def test_fixed_refund_only_in_the_charged_window() -> None:
    params = FixedWindow(limit=3, per="minute")
    start = 1_699_999_980.0
    _, charged = fixed_window(FixedState(), start + 1, 2, params)
    assert fixed_refund(charged, start + 2, 1, params, charged) == FixedState(start, 1)
    assert fixed_refund(charged, start + 2, 9, params, charged) == FixedState(start, 0)
    assert fixed_refund(charged, start + 61, 1, params, charged) == charged  # window over


@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.floats(0, 20, allow_nan=False), st.integers(0, 4)), max_size=80),
    limit=st.integers(1, 8),
    per=st.sampled_from(["second", "minute"]),
)
def test_property_fixed_window_never_exceeds_limit(
    reqs: list[tuple[float, int]], limit: int, per: str
) -> None:
    params = FixedWindow(limit=limit, per=per)  # type: ignore[arg-type]
    state = FixedState()
    now = T0
    spent: dict[float, int] = {}
    for dt, cost in reqs:
        now += dt
        decision, new = fixed_window(state, now, cost, params)
        assert 0 <= decision.remaining <= limit
        if decision.allowed:
            start = window_bounds(now, per, None)[0]  # type: ignore[arg-type]
            spent[start] = spent.get(start, 0) + cost
            assert spent[start] <= limit
            assert decision.remaining == limit - spent[start]
        else:
            assert new is state
            if not math.isinf(decision.retry_after):
                assert fixed_window(state, now + decision.retry_after, cost, params)[0].allowed
        state = new


# -- sliding window -----------------------------------------------------------

SW = SlidingWindow(limit=10, period=60.0)
PREV8_CUR3 = SlidingState(window_start=1_699_999_980.0, previous_count=8, current_count=3)
W = 1_699_999_980.0


@pytest.mark.parametrize(
    ("elapsed", "cost", "allowed", "remaining", "retry_after", "reset_after"),
    [
        # weight 1: 8 + 3 = 11 > 10; cost 1 fits when 8w <= 6, w = 0.75, 15 s in.
        (0.0, 1, False, 0, 15.0, 120.0),
        # weight 0.75: 6 + 3 = 9; +1 = 10 fits, nothing left.
        (15.0, 1, True, 0, 0.0, 105.0),
        # cost 2 needs 8w <= 5: w = 0.625, 22.5 s in.
        (15.0, 2, False, 1, 7.5, 105.0),
        # weight 0.5: 4 + 3 = 7; +3 = 10 fits.
        (30.0, 3, True, 0, 0.0, 90.0),
        # cost 4 needs 8w <= 3: w = 0.375, 37.5 s in.
        (30.0, 4, False, 3, 7.5, 90.0),
        # weight 0.25: 2 + 3 = 5; +1 -> 4 left.
        (45.0, 1, True, 4, 0.0, 75.0),
        # weight 1/60: 8/60 + 3 + 1 = 4.133 -> 5 left.
        (59.0, 1, True, 5, 0.0, 61.0),
        # cost above the limit: never.
        (30.0, 11, False, 3, NEVER, 90.0),
    ],
)
def test_sliding_window_weighting(
    elapsed: float,
    cost: int,
    allowed: bool,
    remaining: int,
    retry_after: float,
    reset_after: float,
) -> None:
    decision, new = sliding_window(PREV8_CUR3, W + elapsed, cost, SW)
    assert decision.allowed is allowed
    assert decision.remaining == remaining
    assert decision.retry_after == approx(retry_after)
    assert decision.reset_after == approx(reset_after)
    if allowed:
        assert new == SlidingState(PREV8_CUR3.window_start, 8, 3 + cost)
    else:
        assert new is PREV8_CUR3
        if not decision.never:
            later = sliding_window(PREV8_CUR3, W + elapsed + decision.retry_after, cost, SW)
            assert later[0].allowed


def test_sliding_window_rolls_over() -> None:
    # Next window: the current 3 become the previous count, at full weight.
    decision, state = sliding_window(PREV8_CUR3, W + 60, 1, SW)
    assert state == SlidingState(W + 60, 3, 1)
    assert decision.remaining == 6
    # Two windows later everything is forgotten.
    decision, state = sliding_window(PREV8_CUR3, W + 125, 1, SW)
    assert state == SlidingState(W + 120, 0, 1)
    assert decision.remaining == 9


def test_sliding_window_retry_in_the_next_window() -> None:
    full = SlidingState(W, 0, 10)
    decision, after = sliding_window(full, W + 30, 1, SW)
    assert not decision.allowed and after is full
    # Next window: 10 * w + 1 <= 10 -> w <= 0.9, 6 s into it: 30 + 6 s from now.
    assert decision.retry_after == approx(36.0)
    assert decision.reset_after == approx(90.0)
    assert sliding_window(full, W + 66, 1, SW)[0].allowed
    assert not sliding_window(full, W + 65.9, 1, SW)[0].allowed


def test_sliding_refund() -> None:
    _, charged = sliding_window(SlidingState(), W + 1, 4, SW)
    assert sliding_refund(charged, W + 2, 1, SW, charged) == SlidingState(W, 0, 3)
    # After the roll the charge sits in the previous count.
    assert sliding_refund(charged, W + 61, 1, SW, charged) == SlidingState(W + 60, 3, 0)
    assert sliding_refund(charged, W + 130, 1, SW, charged) == charged
    assert sliding_refund(charged, W + 2, 99, SW, charged) == SlidingState(W, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.floats(0, 30, allow_nan=False), st.integers(0, 4)), max_size=80),
    limit=st.integers(1, 10),
)
def test_property_sliding_estimate_never_exceeds_limit(
    reqs: list[tuple[float, int]], limit: int
) -> None:
    params = SlidingWindow(limit=limit, period=60.0)
    state = SlidingState()
    now = T0
    for dt, cost in reqs:
        now += dt
        decision, new = sliding_window(state, now, cost, params)
        assert 0 <= decision.remaining <= limit
        if decision.allowed:
            weight = (60.0 - (now - new.window_start)) / 60.0
            assert new.previous_count * weight + new.current_count <= limit + 1e-6
            assert new.current_count <= limit  # so never more than limit per window
        else:
            assert new is state
            if not decision.never:
                assert sliding_window(state, now + decision.retry_after + 1e-6, cost, params)[
                    0
                ].allowed
        state = new


# -- check_all ----------------------------------------------------------------

PER_SECOND = Gcra(limit=2, period=1.0)
PER_MINUTE = FixedWindow(limit=5, per="minute")
PER_DAY = FixedWindow(limit=100, per="day", tz="Europe/Berlin")
LIMITS = (PER_SECOND, PER_MINUTE, PER_DAY)


def test_check_all_allows_and_reports_the_least_remaining() -> None:
    states = tuple(initial_state(limit) for limit in LIMITS)
    start = 1_699_999_980.0
    multi, states = check_all(states, start, 1, LIMITS)
    assert multi.allowed and multi.refused_by is None
    assert [d.remaining for d in multi.decisions] == [1, 4, 99]
    assert multi.reported == 0 and multi.decision.remaining == 1
    multi, states = check_all(states, start + 10, 1, LIMITS)
    assert [d.remaining for d in multi.decisions] == [1, 3, 98]
    assert multi.reported == 0
    multi, states = check_all(states, start + 20, 2, LIMITS)
    assert [d.remaining for d in multi.decisions] == [0, 1, 96]
    assert multi.reported == 0
    multi, states = check_all(states, start + 30, 1, LIMITS)
    # GCRA is back to 1 left after 10 s; the minute window has 0 left.
    assert [d.remaining for d in multi.decisions] == [1, 0, 95]
    assert multi.reported == 1 and multi.decision.limit == 5


def test_check_all_is_all_or_nothing() -> None:
    start = 1_699_999_980.0
    states = (GcraState(), FixedState(start, 4), FixedState())
    multi, after = check_all(states, start + 1, 2, LIMITS)
    assert not multi.allowed
    assert after == states  # the per-second window allowed, but consumed nothing
    assert multi.refused_by == 1 and multi.decision is multi.decisions[1]
    assert multi.decision.retry_after == approx(59.0)
    # Windows that would have allowed are described without the request.
    assert multi.decisions[0].allowed and multi.decisions[0].remaining == 2
    assert multi.decisions[2].remaining == 100


def test_check_all_reports_the_refusal_with_the_longest_wait() -> None:
    start = 1_699_999_980.0
    day_start = window_bounds(start, "day", "Europe/Berlin")[0]
    states = (GcraState(), FixedState(start, 5), FixedState(day_start, 100))
    multi, after = check_all(states, start + 1, 1, LIMITS)
    assert not multi.allowed and after == states
    assert multi.refused_by == 2  # the day quota: its retry_after is the longest
    assert multi.decision.retry_after > 59.0


def test_check_all_validates_inputs() -> None:
    with pytest.raises(ValueError):
        check_all((), T0, 1, ())
    with pytest.raises(ValueError):
        check_all((GcraState(),), T0, 1, LIMITS)
    with pytest.raises(TypeError):
        evaluate(PER_SECOND, FixedState(), T0, 1)

"""GCRA on a fake clock: reference table, burst then steady rate, properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.limits import NEVER, Gcra, GcraState, gcra, gcra_refund

T0 = 1_700_000_000.0  # a realistic epoch instant: float precision matters here
approx = lambda x: pytest.approx(x, abs=1e-6)  # noqa: E731


# limit 5/s, burst 5 (redis-cell: CL.THROTTLE key 4 5 1): offset, allowed,
# remaining, retry_after, reset_after.
REFERENCE = [
    (0.0, True, 4, 0.0, 0.2),
    (0.0, True, 3, 0.0, 0.4),
    (0.0, True, 2, 0.0, 0.6),
    (0.0, True, 1, 0.0, 0.8),
    (0.0, True, 0, 0.0, 1.0),
    (0.0, False, 0, 0.2, 1.0),
    (0.1, False, 0, 0.1, 0.9),
    (0.2, True, 0, 0.0, 1.0),
    (0.5, True, 0, 0.0, 0.9),  # 1.5 tokens back, one spent
    (0.5, False, 0, 0.1, 0.9),
    (0.7, True, 0, 0.0, 0.9),  # tat 1.6 -> 0.9 ahead after this one
    (2.0, True, 4, 0.0, 0.2),  # idle: bucket full again
    (2.1, True, 3, 0.0, 0.3),
    (10.0, True, 4, 0.0, 0.2),
]


def test_reference_table_limit_5_per_second_burst_5() -> None:
    params = Gcra(limit=5, period=1.0, burst=5)
    state = GcraState()
    for offset, allowed, remaining, retry, reset in REFERENCE:
        decision, state = gcra(state, T0 + offset, 1, params)
        got = (decision.allowed, decision.remaining, decision.retry_after, decision.reset_after)
        assert got == (allowed, remaining, approx(retry), approx(reset)), offset
        assert decision.limit == 5


def test_burst_then_steady_rate_over_ten_seconds() -> None:
    params = Gcra(limit=5, period=1.0, burst=10)
    state = GcraState()
    allowed_at: list[float] = []
    for i in range(1001):  # every 10 ms from 0 to 10 s inclusive
        now = T0 + i / 100
        decision, state = gcra(state, now, 1, params)
        if decision.allowed:
            allowed_at.append(round(now - T0, 6))
    # The burst of 10 in the first 10 requests, then one every 0.2 s: 0.2, ... 10.0.
    assert allowed_at[:10] == [round(0.01 * k, 6) for k in range(10)]
    assert allowed_at[10:] == [round(0.2 * k, 6) for k in range(1, 51)]
    assert len(allowed_at) == 60  # burst + rate * 10 s


def test_default_burst_is_the_limit() -> None:
    params = Gcra(limit=3, period=60.0)
    assert params.capacity == 3
    state = GcraState()
    results = []
    for _ in range(4):
        decision, state = gcra(state, T0, 1, params)
        results.append(decision.allowed)
    assert results == [True, True, True, False]
    assert decision.retry_after == approx(20.0)


def test_refused_request_consumes_nothing() -> None:
    params = Gcra(limit=1, period=1.0, burst=1)
    _, state = gcra(GcraState(), T0, 1, params)
    for offset in (0.0, 0.3, 0.6, 0.9):
        decision, after = gcra(state, T0 + offset, 1, params)
        assert not decision.allowed
        assert after is state
        assert decision.retry_after == approx(1.0 - offset)
    decision, _ = gcra(state, T0 + 1.0, 1, params)
    assert decision.allowed  # refusals did not push it further away


def test_cost_above_one() -> None:
    params = Gcra(limit=5, period=1.0, burst=5)
    decision, state = gcra(GcraState(), T0, 3, params)
    assert (decision.allowed, decision.remaining) == (True, 2)
    assert decision.reset_after == approx(0.6)
    decision, state2 = gcra(state, T0, 3, params)
    assert not decision.allowed and state2 is state
    assert decision.remaining == 2
    assert decision.retry_after == approx(0.2)  # one more token needed
    decision, _ = gcra(state, T0 + 0.2, 3, params)
    assert decision.allowed and decision.remaining == 0


def test_cost_above_burst_is_refused_forever() -> None:
    params = Gcra(limit=5, period=1.0, burst=5)
    state = GcraState()
    for offset in (0.0, 100.0, 1e6):
        decision, after = gcra(state, T0 + offset, 6, params)
        assert not decision.allowed
        assert decision.retry_after == NEVER and decision.never
        assert decision.remaining == 5
        assert after is state


def test_cost_zero_is_a_peek() -> None:
    params = Gcra(limit=5, period=1.0)
    _, state = gcra(GcraState(), T0, 2, params)
    decision, after = gcra(state, T0, 0, params)
    assert decision.allowed and decision.remaining == 3 and after == state


def test_clock_going_back_never_raises_remaining() -> None:
    params = Gcra(limit=5, period=1.0)
    _, state = gcra(GcraState(), T0, 5, params)
    decision, _ = gcra(state, T0 - 10, 0, params)
    assert decision.remaining == 0


def test_refund_gives_back_but_never_beyond_full() -> None:
    params = Gcra(limit=5, period=1.0)
    _, state = gcra(GcraState(), T0, 3, params)
    state = gcra_refund(state, T0, 2, params)
    assert gcra(state, T0, 0, params)[0].remaining == 4
    state = gcra_refund(state, T0, 100, params)
    assert gcra(state, T0, 0, params)[0].remaining == 5
    assert gcra_refund(GcraState(), T0, 1, params) == GcraState()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "period": 1.0},
        {"limit": 1, "period": 0.0},
        {"limit": 1, "period": 1.0, "burst": 0},
    ],
)
def test_invalid_params(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Gcra(**kwargs)  # type: ignore[arg-type]


def test_negative_cost_rejected() -> None:
    with pytest.raises(ValueError):
        gcra(GcraState(), T0, -1, Gcra(1, 1.0))


requests = st.lists(
    st.tuples(st.floats(0.0, 1.5, allow_nan=False), st.integers(0, 4)), min_size=1, max_size=80
)


@settings(max_examples=200, deadline=None)
@given(
    reqs=requests,
    limit=st.integers(1, 10),
    period=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.integers(1, 8),
)
def test_property_never_more_than_burst_plus_rate(
    reqs: list[tuple[float, int]], limit: int, period: float, burst: int
) -> None:
    params = Gcra(limit=limit, period=period, burst=burst)
    state = GcraState()
    now = T0
    spent = 0
    last_remaining: int | None = None
    for dt, cost in reqs:
        now += dt
        decision, new = gcra(state, now, cost, params)
        assert 0 <= decision.remaining <= burst
        if decision.allowed:
            spent += cost
            assert decision.retry_after == 0.0
            if dt == 0.0 and last_remaining is not None:
                assert decision.remaining <= last_remaining  # rises only with time
        else:
            assert new is state  # refused: nothing consumed
            assert decision.retry_after > 0
            if not math.isinf(decision.retry_after):  # it does pass after retry_after
                assert gcra(state, now + decision.retry_after + 1e-6, cost, params)[0].allowed
        last_remaining = decision.remaining
        state = new
        elapsed = now - T0
        assert spent <= math.floor(burst + elapsed * limit / period + 1e-4)

"""Concurrency limit: pure acquire/release and the MemoryLimiter's leases."""

from __future__ import annotations

import pytest

from tollway.limits import NEVER, Concurrency, ConcurrencyState, MemoryLimiter, acquire, release

TWO = Concurrency(limit=2, retry_hint=0.5)


def test_acquire_up_to_the_limit_then_refuse() -> None:
    state = ConcurrencyState()
    decision, state = acquire(state, 1, TWO)
    assert (decision.allowed, decision.remaining, decision.limit) == (True, 1, 2)
    decision, state = acquire(state, 1, TWO)
    assert (decision.allowed, decision.remaining) == (True, 0)
    decision, after = acquire(state, 1, TWO)
    assert not decision.allowed and after is state
    assert decision.retry_after == 0.5 and decision.remaining == 0
    state = release(state, 1)
    assert acquire(state, 1, TWO)[0].allowed


def test_cost_and_cost_above_limit() -> None:
    decision, state = acquire(ConcurrencyState(), 2, TWO)
    assert decision.allowed and state.in_flight == 2
    decision, after = acquire(ConcurrencyState(1), 2, TWO)
    assert not decision.allowed and decision.retry_after == 0.5 and after == ConcurrencyState(1)
    decision, _ = acquire(ConcurrencyState(), 3, TWO)
    assert not decision.allowed and decision.retry_after == NEVER


def test_release_never_goes_below_zero() -> None:
    assert release(ConcurrencyState(1), 5) == ConcurrencyState(0)


def test_invalid_params() -> None:
    with pytest.raises(ValueError):
        Concurrency(limit=0)
    with pytest.raises(ValueError):
        Concurrency(limit=1, retry_hint=-1)


def test_memory_leases() -> None:
    limiter = MemoryLimiter(clock=lambda: 0.0)
    d1, lease1 = limiter.acquire(["consumer", "c1"], TWO)
    d2, lease2 = limiter.acquire(["consumer", "c1"], TWO)
    d3, lease3 = limiter.acquire(["consumer", "c1"], TWO)
    assert (d1.allowed, d2.allowed, d3.allowed) == (True, True, False)
    assert lease1 is not None and lease2 is not None and lease3 is None
    # Another key has its own slots.
    other, other_lease = limiter.acquire(["consumer", "c2"], TWO)
    assert other.allowed and other_lease is not None
    assert lease1.release() is True
    assert lease1.release() is False  # idempotent: the slot is given back once
    decision, lease4 = limiter.acquire(["consumer", "c1"], TWO)
    assert decision.allowed and lease4 is not None
    assert not limiter.acquire(["consumer", "c1"], TWO)[0].allowed


def test_memory_lease_context_manager_and_cleanup() -> None:
    limiter = MemoryLimiter(clock=lambda: 0.0)
    one = Concurrency(limit=1)
    _, lease = limiter.acquire(["k"], one)
    assert lease is not None
    with lease:
        assert not limiter.acquire(["k"], one)[0].allowed
        assert len(limiter) == 1
    assert len(limiter) == 0  # nothing in flight: the entry is dropped
    _, lease = limiter.acquire(["k"], one, cost=1)
    assert lease is not None and lease.release()

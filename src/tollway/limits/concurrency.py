"""Concurrency limit: at most `limit` requests in flight per key.

Not time based: a slot is taken by acquire() and given back by release(), which
must be called exactly once per allowed acquire (when the response is done,
whatever its outcome). MemoryLimiter.acquire returns a Lease whose release() is
idempotent; with the pure functions the caller keeps that promise itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from tollway.limits.decision import NEVER, Decision, check_cost


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most `limit` in flight; `retry_hint` is the Retry-After given on refusal
    (nothing predicts when a slot frees)."""

    limit: int
    retry_hint: float = 1.0

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.retry_hint < 0:
            raise ValueError("retry_hint must be >= 0")


@dataclass(slots=True, init=False)
class ConcurrencyState:
    """A native record, not a NamedTuple (see GcraState). Never changed once made."""

    in_flight: int

    def __init__(self, in_flight: int = 0) -> None:
        self.in_flight = in_flight


def acquire(
    state: ConcurrencyState, cost: int, params: Concurrency
) -> tuple[Decision, ConcurrencyState]:
    """Take `cost` slots when they are free; a refusal returns `state` unchanged."""
    check_cost(cost)
    if state.in_flight + cost <= params.limit:
        in_flight = state.in_flight + cost
        decision = Decision(True, params.limit, params.limit - in_flight, 0.0, 0.0)
        return decision, ConcurrencyState(in_flight)
    retry = NEVER if cost > params.limit else params.retry_hint
    remaining = max(0, params.limit - state.in_flight)
    return Decision(False, params.limit, remaining, 0.0, retry), state


def release(state: ConcurrencyState, cost: int) -> ConcurrencyState:
    """Give back `cost` slots (never below zero in flight)."""
    check_cost(cost)
    return ConcurrencyState(max(0, state.in_flight - cost))

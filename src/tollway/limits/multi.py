"""Several windows on one request: all must allow, all or nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tollway.limits.decision import Decision
from tollway.limits.gcra import Gcra, GcraState, gcra, gcra_expires_at, gcra_refund
from tollway.limits.windows import (
    FixedState,
    FixedWindow,
    SlidingState,
    SlidingWindow,
    fixed_expires_at,
    fixed_refund,
    fixed_window,
    sliding_expires_at,
    sliding_refund,
    sliding_window,
)

Limit = Gcra | SlidingWindow | FixedWindow
State = GcraState | SlidingState | FixedState


def initial_state(limit: Limit) -> State:
    if isinstance(limit, Gcra):
        return GcraState()
    if isinstance(limit, SlidingWindow):
        return SlidingState()
    return FixedState()


def evaluate(limit: Limit, state: State, now: float, cost: int) -> tuple[Decision, State]:
    """Run the algorithm of `limit` on its own state type."""
    if isinstance(limit, Gcra) and isinstance(state, GcraState):
        return gcra(state, now, cost, limit)
    if isinstance(limit, SlidingWindow) and isinstance(state, SlidingState):
        return sliding_window(state, now, cost, limit)
    if isinstance(limit, FixedWindow) and isinstance(state, FixedState):
        return fixed_window(state, now, cost, limit)
    raise TypeError(f"state {state!r} does not belong to limit {limit!r}")


def refund(limit: Limit, state: State, now: float, cost: int, charged: State) -> State:
    """Give back `cost` charged when the state became `charged`; see each algorithm."""
    if isinstance(limit, Gcra) and isinstance(state, GcraState):
        return gcra_refund(state, now, cost, limit)
    if (
        isinstance(limit, SlidingWindow)
        and isinstance(state, SlidingState)
        and isinstance(charged, SlidingState)
    ):
        return sliding_refund(state, now, cost, limit, charged)
    if (
        isinstance(limit, FixedWindow)
        and isinstance(state, FixedState)
        and isinstance(charged, FixedState)
    ):
        return fixed_refund(state, now, cost, limit, charged)
    raise TypeError(f"state {state!r} does not belong to limit {limit!r}")


def expires_at(limit: Limit, state: State) -> float:
    """Instant from which `state` is as good as fresh and may be dropped."""
    if isinstance(limit, Gcra) and isinstance(state, GcraState):
        return gcra_expires_at(state, limit)
    if isinstance(limit, SlidingWindow) and isinstance(state, SlidingState):
        return sliding_expires_at(state, limit)
    if isinstance(limit, FixedWindow) and isinstance(state, FixedState):
        return fixed_expires_at(state, limit)
    raise TypeError(f"state {state!r} does not belong to limit {limit!r}")


@dataclass(frozen=True, slots=True)
class MultiDecision:
    """allowed: every window allowed. decision: the one to report in headers
    (the refusing window with the longest retry_after, else the window with the
    least remaining, ties to the longest reset_after). reported: its index.
    refused_by: index of the reported refusing window, None when allowed.
    decisions: one per limit; on a refusal those of the windows that would have
    allowed describe them without the request (nothing was consumed)."""

    allowed: bool
    decision: Decision
    reported: int
    refused_by: int | None
    decisions: tuple[Decision, ...]


def check_all(
    states: Sequence[State], now: float, cost: int, limits: Sequence[Limit]
) -> tuple[MultiDecision, tuple[State, ...]]:
    """Check every limit; consume in all of them only when all allow."""
    if len(states) != len(limits):
        raise ValueError("one state per limit")
    if not limits:
        raise ValueError("at least one limit")
    results = [
        evaluate(limit, state, now, cost) for limit, state in zip(limits, states, strict=True)
    ]
    decisions = [decision for decision, _ in results]
    if all(d.allowed for d in decisions):
        reported = min(
            range(len(decisions)),
            key=lambda i: (decisions[i].remaining, -decisions[i].reset_after),
        )
        multi = MultiDecision(True, decisions[reported], reported, None, tuple(decisions))
        return multi, tuple(new for _, new in results)
    refused = [i for i, d in enumerate(decisions) if not d.allowed]
    reported = max(refused, key=lambda i: (decisions[i].retry_after, -decisions[i].remaining))
    for i, d in enumerate(decisions):
        if d.allowed:  # describe it without this request: it consumed nothing
            decisions[i] = evaluate(limits[i], states[i], now, 0)[0]
    multi = MultiDecision(False, decisions[reported], reported, reported, tuple(decisions))
    return multi, tuple(states)

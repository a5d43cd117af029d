"""Several windows on one request: all must allow, all or nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from tollway.limits.decision import Decision, per_limit_costs, reported_index
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


@lru_cache(maxsize=4096)
def slot_id(limit: Limit) -> str:
    """The name of a limit's counter under one key.

    It names the window, not the allowance: a plan upgrade or a burst grant that
    only raises `limit` (or a GCRA `burst`) keeps the count already spent, so that
    "5 per day" raised to 8 at noon leaves 3 more, not 8. GCRA keeps its limit in
    the name because its state is counted in emission intervals (period / limit):
    a changed rate starts a fresh bucket.
    """
    if isinstance(limit, Gcra):
        return f"gcra:{limit.period!r}:{limit.limit}"
    if isinstance(limit, SlidingWindow):
        return f"sliding:{limit.period!r}"
    return f"fixed:{limit.per}:{limit.tz}"


class Windows(tuple[Limit, ...]):
    """Limits checked together, compiled once: a plugin keeps one per limit set so
    that a check does not work out the slot ids again for every request."""

    slots: tuple[str, ...]
    # Per limit: its fresh state, made once here rather than for every request.
    initials: tuple[State, ...]

    def __new__(cls, limits: Sequence[Limit]) -> Windows:
        self = super().__new__(cls, limits)
        self.slots = _slots(self)
        for limit in self:
            if type(limit) not in _EVALUATE:
                raise TypeError(f"{limit!r} is not a limit")
        self.initials = tuple(initial_state(limit) for limit in self)
        return self


def check_slots(limits: Sequence[Limit]) -> tuple[str, ...]:
    """The slot ids of `limits`; two limits of one check may not share a counter."""
    if isinstance(limits, Windows):
        return limits.slots
    return _slots(limits)


def _slots(limits: Sequence[Limit]) -> tuple[str, ...]:
    ids = tuple(slot_id(limit) for limit in limits)
    if len(set(ids)) != len(ids):
        raise ValueError(f"two limits of one check share a counter: {ids}")
    return ids


def initial_state(limit: Limit) -> State:
    if isinstance(limit, Gcra):
        return GcraState()
    if isinstance(limit, SlidingWindow):
        return SlidingState()
    return FixedState()


_EVALUATE: dict[type, tuple[type, Callable[..., tuple[Decision, State]]]] = {
    Gcra: (GcraState, gcra),
    SlidingWindow: (SlidingState, sliding_window),
    FixedWindow: (FixedState, fixed_window),
}
_EXPIRES: dict[type, Callable[..., float]] = {
    Gcra: gcra_expires_at,
    SlidingWindow: sliding_expires_at,
    FixedWindow: fixed_expires_at,
}


def evaluate(limit: Limit, state: State, now: float, cost: int) -> tuple[Decision, State]:
    """Run the algorithm of `limit` on its own state type."""
    # A dict by type rather than an isinstance chain: this runs once per window of
    # every limited request.
    entry = _EVALUATE.get(type(limit))
    if entry is None or type(state) is not entry[0]:
        raise TypeError(f"state {state!r} does not belong to limit {limit!r}")
    return entry[1](state, now, cost, limit)


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
    expires = _EXPIRES.get(type(limit))
    if expires is None:
        raise TypeError(f"{limit!r} is not a limit")
    return expires(state, limit)


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
    states: Sequence[State], now: float, cost: int | Sequence[int], limits: Sequence[Limit]
) -> tuple[MultiDecision, tuple[State, ...]]:
    """Check every limit; consume in all of them only when all allow.

    `cost` is one cost for every limit, or one per limit (a day quota may count a
    generation as 5 while the per-minute rate counts it as 1).
    """
    if len(states) != len(limits):
        raise ValueError("one state per limit")
    if not limits:
        raise ValueError("at least one limit")
    costs = per_limit_costs(cost, len(limits))
    results = [
        evaluate(limit, state, now, c)
        for limit, state, c in zip(limits, states, costs, strict=True)
    ]
    decisions = [decision for decision, _ in results]
    if all(d.allowed for d in decisions):
        reported = reported_index(decisions, True)
        multi = MultiDecision(True, decisions[reported], reported, None, tuple(decisions))
        return multi, tuple(new for _, new in results)
    reported = reported_index(decisions, False)
    for i, d in enumerate(decisions):
        if d.allowed:  # describe it without this request: it consumed nothing
            decisions[i] = evaluate(limits[i], states[i], now, 0)[0]
    multi = MultiDecision(False, decisions[reported], reported, reported, tuple(decisions))
    return multi, tuple(states)

"""GCRA, the generic cell rate algorithm (as redis-cell and throttled use it).

A token bucket expressed as one number, the theoretical arrival time (TAT):
the instant at which the bucket would be full again. Each request of cost c
moves the TAT forward by c * T (T = period / limit, the emission interval); the
request passes when the TAT would stay within burst * T of now. A state belongs
to one Gcra (its unit is that limit's T): a changed limit starts a fresh state.

Parameters map to redis-cell's ``CL.THROTTLE key max_burst count period`` as
``max_burst = burst - 1``, ``count / period = limit / period``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tollway.limits.decision import NEVER, TIME_EPSILON, Decision, check_cost


@dataclass(frozen=True, slots=True)
class Gcra:
    """`limit` requests per `period` seconds, with up to `burst` at once.

    burst defaults to limit (a client idle for a full period may spend it all).
    """

    limit: int
    period: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.period <= 0:
            raise ValueError("period must be > 0")
        if self.burst is not None and self.burst < 1:
            raise ValueError("burst must be >= 1")

    @property
    def capacity(self) -> int:
        return self.limit if self.burst is None else self.burst

    @property
    def emission_interval(self) -> float:
        return self.period / self.limit


@dataclass(slots=True, init=False)
class GcraState:
    """The TAT, counted in emission intervals since the epoch (seconds = tat * T).

    Counting in intervals keeps the TAT exact under sustained load: adding an
    integer cost to it never rounds, where adding cost * T seconds to an epoch
    timestamp drifts by up to a ULP (about 1e-7 s) per request. Any TAT <= now
    (e.g. 0.0) is a full bucket.

    A class with a written __init__ rather than a NamedTuple: mypyc builds it
    natively, where a NamedTuple is made by an interpreted __new__ (a third of a
    GCRA check). Never changed once made.
    """

    tat: float

    def __init__(self, tat: float = 0.0) -> None:
        self.tat = tat


def _remaining(ahead: float, capacity: int, eps: float) -> int:
    """Whole tokens left when the TAT is `ahead` intervals after now."""
    return max(0, min(capacity, math.floor(capacity - ahead + eps)))


def gcra(state: GcraState, now: float, cost: int, params: Gcra) -> tuple[Decision, GcraState]:
    """Check and (when allowed) consume `cost`; a refusal returns `state` unchanged."""
    # Written flat (no helper calls, positional Decision): this runs once per GCRA
    # window of every limited request.
    if cost < 0:
        check_cost(cost)
    interval = params.period / params.limit
    capacity = params.limit if params.burst is None else params.burst
    eps = TIME_EPSILON / interval
    now_u = now / interval
    tat = state.tat if state.tat > now_u else now_u
    new_tat = tat + cost
    if cost <= capacity and new_tat - now_u <= capacity + eps:
        ahead = new_tat - now_u
        left = math.floor(capacity - ahead + eps)
        remaining = 0 if left < 0 else (capacity if left > capacity else left)
        return Decision(True, capacity, remaining, ahead * interval, 0.0), GcraState(new_tat)
    ahead = tat - now_u
    retry = NEVER if cost > capacity else max(0.0, (new_tat - capacity - now_u) * interval)
    decision = Decision(
        allowed=False,
        limit=capacity,
        remaining=_remaining(ahead, capacity, eps),
        reset_after=ahead * interval,
        retry_after=retry,
    )
    return decision, state


def gcra_refund(state: GcraState, now: float, cost: int, params: Gcra) -> GcraState:
    """Give back `cost` (never beyond a full bucket)."""
    check_cost(cost)
    now_u = now / params.emission_interval
    if state.tat <= now_u:
        return state
    return GcraState(max(now_u, state.tat - cost))


def gcra_expires_at(state: GcraState, params: Gcra) -> float:
    """From this instant (epoch seconds) the state equals a fresh one and may be dropped."""
    return state.tat * params.emission_interval

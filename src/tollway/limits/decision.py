"""The answer every limit algorithm gives for one request."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# retry_after for a request that can never pass: its cost is larger than the
# limit (or burst). Callers must treat an infinite retry_after as "refused
# forever" (a 429 without a meaningful Retry-After, or a 400/413).
NEVER = math.inf

# Float tolerance. Times are float seconds since the epoch, whose resolution at
# today's epoch is about 0.25 microseconds; comparisons allow one microsecond.
TIME_EPSILON = 1e-6
COUNT_EPSILON = 1e-6


# init=False with a written __init__: mypyc compiles that natively, where a
# dataclass-made __init__ (and a frozen one's object.__setattr__ per field) runs as
# interpreted Python, on every window of every limited request. Not frozen for the
# same reason; nothing mutates a Decision once made.
@dataclass(slots=True, init=False)
class Decision:
    """Outcome of one check of one limit.

    allowed: the request may pass (and, when allowed, its cost was consumed).
    limit: the capacity reported to the client (limit, or burst for GCRA).
    remaining: requests of cost 1 that would pass right now after this one;
        never negative.
    reset_after: seconds until the limit is fully replenished (bucket full, or
        window over); 0 when nothing is consumed.
    retry_after: seconds until this request's cost would be allowed; 0 when
        allowed; NEVER (math.inf) when the cost exceeds the capacity.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float

    def __init__(
        self, allowed: bool, limit: int, remaining: int, reset_after: float, retry_after: float
    ) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_after = reset_after
        self.retry_after = retry_after

    @property
    def never(self) -> bool:
        """True when this request can never pass (cost above capacity)."""
        return math.isinf(self.retry_after)


def check_cost(cost: int) -> None:
    if cost < 0:
        raise ValueError(f"cost must be >= 0, not {cost}")


def per_limit_costs(cost: int | Sequence[int], count: int) -> tuple[int, ...]:
    """One cost per limit: the same for all, or given one by one."""
    if isinstance(cost, int):
        return (cost,) * count
    costs = tuple(cost)
    if len(costs) != count:
        raise ValueError("one cost per limit")
    return costs


def reported_index(decisions: Sequence[Decision], allowed: bool) -> int:
    """The window to report: when allowed, the one with the least remaining (ties to
    the longest reset); when refused, the refusing one with the longest wait (ties
    to the least remaining). The first wins a full tie. Written as loops (no key
    functions): it runs on every limited request."""
    if allowed:
        best = 0
        for i in range(1, len(decisions)):
            d = decisions[i]
            b = decisions[best]
            if d.remaining < b.remaining or (
                d.remaining == b.remaining and d.reset_after > b.reset_after
            ):
                best = i
        return best
    best = -1
    for i in range(len(decisions)):
        d = decisions[i]
        if d.allowed:
            continue
        if best < 0:
            best = i
            continue
        b = decisions[best]
        if d.retry_after > b.retry_after or (
            d.retry_after == b.retry_after and d.remaining < b.remaining
        ):
            best = i
    if best < 0:
        raise ValueError("a refusal needs a refusing decision")
    return best

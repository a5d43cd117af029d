"""Rate and concurrency limits: pure algorithms and their stores (no web imports).

Each algorithm is a pure function (state, now, cost, params) -> (Decision,
new_state) with a small immutable state, so a store can run the same logic
anywhere (in process, or later as a Redis Lua script).
"""

from tollway.limits.concurrency import Concurrency, ConcurrencyState, acquire, release
from tollway.limits.decision import NEVER, Decision
from tollway.limits.gcra import Gcra, GcraState, gcra, gcra_refund
from tollway.limits.memory import Charge, Lease, LimitResult, MemoryLimiter
from tollway.limits.multi import Limit, MultiDecision, State, check_all, evaluate, initial_state
from tollway.limits.windows import (
    FixedState,
    FixedWindow,
    Per,
    SlidingState,
    SlidingWindow,
    fixed_refund,
    fixed_window,
    sliding_refund,
    sliding_window,
    window_bounds,
)

__all__ = [
    "NEVER",
    "Charge",
    "Concurrency",
    "ConcurrencyState",
    "Decision",
    "FixedState",
    "FixedWindow",
    "Gcra",
    "GcraState",
    "Lease",
    "Limit",
    "LimitResult",
    "MemoryLimiter",
    "MultiDecision",
    "Per",
    "SlidingState",
    "SlidingWindow",
    "State",
    "acquire",
    "check_all",
    "evaluate",
    "fixed_refund",
    "fixed_window",
    "gcra",
    "gcra_refund",
    "initial_state",
    "release",
    "sliding_refund",
    "sliding_window",
    "window_bounds",
]

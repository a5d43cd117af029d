"""MemoryLimiter: the in-process store, exact within one process.

States live in a dict keyed by (key parts, slot id of the limit: see
multi.slot_id, so a raised allowance keeps its count); each entry records the
instant from which it is as good as fresh. Memory stays bounded by sweeping:
check() drops every expired entry once `sweep_interval` seconds (of the
injected clock) have passed since the last sweep, and sweep() does it on
demand. Between sweeps at most the keys seen in the last interval plus the
live ones are held, and never more than `max_entries`: a full table drops its
oldest tenth (those keys count afresh; `evicted` says how many). Concurrency
slots are not time based: an entry lives while something is in flight and is
dropped when its last lease is released.

Key parts are kept as a tuple, so ("a:b",) and ("a", "b") never share a counter.
The same window under the same key parts does share it: put the route in the
key parts when limits must be per route. Not thread-safe: a data-plane worker
checks from its event loop's thread only (a lock cost a tenth of a check).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from tollway.limits import multi
from tollway.limits.concurrency import Concurrency, ConcurrencyState, acquire, release
from tollway.limits.decision import Decision, per_limit_costs
from tollway.limits.gcra import Gcra, GcraState, gcra, gcra_expires_at
from tollway.limits.multi import Limit, MultiDecision, State
from tollway.limits.stats import LimitStats
from tollway.limits.windows import (
    FixedState,
    FixedWindow,
    SlidingState,
    SlidingWindow,
    fixed_expires_at,
    fixed_window,
    sliding_expires_at,
    sliding_window,
)

Key = tuple[str, ...]


# The records below spell out __init__ (init=False): mypyc compiles it natively,
# where a dataclass-made one runs as interpreted Python on every limited request.


@dataclass(slots=True, init=False)
class Charge:
    """What an allowed check consumed, to refund it (count_only_success,
    refund_on_status). refund() gives it back at most once."""

    key: Key
    limits: tuple[Limit, ...]
    costs: tuple[int, ...]  # one per limit
    charged: tuple[State, ...]
    refunded: bool

    def __init__(
        self,
        key: Key,
        limits: tuple[Limit, ...],
        costs: tuple[int, ...],
        charged: tuple[State, ...],
        refunded: bool = False,
    ) -> None:
        self.key = key
        self.limits = limits
        self.costs = costs
        self.charged = charged
        self.refunded = refunded


@dataclass(slots=True, init=False)
class LimitResult:
    """Not frozen (see above); nothing changes a result once made."""

    allowed: bool
    decision: Decision  # the most restrictive window, for the headers
    refused_by: Limit | None  # the window that refused (reported one)
    decisions: tuple[Decision, ...]
    charge: Charge | None  # None when refused (nothing consumed)

    def __init__(
        self,
        allowed: bool,
        decision: Decision,
        refused_by: Limit | None,
        decisions: tuple[Decision, ...],
        charge: Charge | None,
    ) -> None:
        self.allowed = allowed
        self.decision = decision
        self.refused_by = refused_by
        self.decisions = decisions
        self.charge = charge


@dataclass(slots=True, init=False)
class Lease:
    """A concurrency slot; release() must run once the request is done
    (it is idempotent: later calls do nothing and return False)."""

    _limiter: MemoryLimiter
    _slot: tuple[Key, Concurrency]
    cost: int
    released: bool

    def __init__(
        self,
        _limiter: MemoryLimiter,
        _slot: tuple[Key, Concurrency],
        cost: int,
        released: bool = False,
    ) -> None:
        self._limiter = _limiter
        self._slot = _slot
        self.cost = cost
        self.released = released

    def release(self) -> bool:
        if self.released:
            return False
        self.released = True
        self._limiter._release(self._slot, self.cost)
        return True

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class MemoryLimiter:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        sweep_interval: float = 10.0,
        max_entries: int = 1_000_000,
    ) -> None:
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._max_entries = max_entries
        # Live counters dropped because the table was full (see _sweep); also counted
        # in `stats` (the LimitService's, for tollway_limiter_store_events_total).
        self.evicted = 0
        self.stats: LimitStats | None = None
        # (key, slot) -> its state and the instant it is as good as fresh, updated in
        # place: one lookup per window and check, no new entry per request.
        self._states: dict[tuple[Key, str], _Cell] = {}
        self._in_flight: dict[tuple[Key, Concurrency], ConcurrencyState] = {}
        self._plans: dict[int, _WindowsPlan] = {}
        self._last_sweep = clock()

    def __len__(self) -> int:
        """Entries held (window states plus keys with requests in flight)."""
        return len(self._states) + len(self._in_flight)

    def check(
        self, key_parts: Sequence[str], limits: Sequence[Limit], cost: int | Sequence[int] = 1
    ) -> LimitResult:
        """Check every limit for this key; consume in all only if all allow.

        `cost`: one for every limit, or one per limit.
        """
        key = key_parts if type(key_parts) is tuple else tuple(key_parts)
        plan = self._plan_of(limits)
        count = plan.count
        costs: tuple[int, ...]
        if isinstance(cost, int):
            costs = (cost,) * count
        elif type(cost) is tuple and len(cost) == count:
            costs = cost
        else:
            costs = per_limit_costs(cost, count)
        held_states = self._states
        slots = plan.slots
        kinds = plan.kinds
        windows = plan.limits
        now = self._clock()
        if now - self._last_sweep >= self._sweep_interval or len(held_states) >= self._max_entries:
            self._sweep(now)
        # multi.check_all, inlined for the common case where every window allows
        # (this runs on every limited request); a refusal goes through check_all
        # itself, which also works out what to report.
        states: list[State] = []
        decisions: list[Decision] = []
        new_states: list[State] = []
        cells: list[_Cell | None] = []
        allowed = True
        for i in range(count):
            cell = held_states.get((key, slots[i]))
            state = cell.state if cell is not None and cell.until > now else plan.initials[i]
            cells.append(cell)
            decision, new = _evaluate(kinds[i], windows[i], state, now, costs[i])
            if not decision.allowed:
                allowed = False
            states.append(state)
            decisions.append(decision)
            new_states.append(new)
        if not allowed:
            outcome, _ = multi.check_all(states, now, costs, plan.windows)
            return self._result(outcome, plan.windows, None)
        for i in range(count):
            state = new_states[i]
            until = _expires(kinds[i], windows[i], state)
            cell = cells[i]
            if cell is None:
                held_states[(key, slots[i])] = _Cell(state, until)
            else:
                cell.state = state
                cell.until = until
        reported = 0
        if count > 1:
            best = decisions[0]
            for i in range(1, count):
                d = decisions[i]
                if d.remaining < best.remaining or (
                    d.remaining == best.remaining and d.reset_after > best.reset_after
                ):
                    best = d
                    reported = i
        return LimitResult(
            True,
            decisions[reported],
            None,
            tuple(decisions),
            Charge(key, plan.windows, costs, tuple(new_states)),
        )

    def _plan_of(self, limits: Sequence[Limit]) -> _WindowsPlan:
        """The check plan of `limits`, remembered per Windows object (a plugin keeps
        one per limit set, so nearly every check finds its plan here)."""
        if type(limits) is not multi.Windows:
            return _WindowsPlan(multi.Windows(limits))
        plans = self._plans
        plan = plans.get(id(limits))
        if plan is not None and plan.windows is limits:
            return plan
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[id(limits)] = _WindowsPlan(limits)  # holds `limits`: the id stays its own
        return plan

    def refund(self, charge: Charge, cost: int | None = None) -> None:
        """Give back what an allowed check consumed (with `cost`, at most that much
        per limit); at most once per charge; never makes remaining exceed the limit."""
        if charge.refunded:
            return
        charge.refunded = True
        now = self._clock()
        for limit, charged, spent in zip(charge.limits, charge.charged, charge.costs, strict=True):
            slot = (charge.key, multi.slot_id(limit))
            cell = self._states.get(slot)
            if cell is None:
                continue  # expired: nothing left to give back
            amount = spent if cost is None else min(cost, spent)
            state = multi.refund(limit, cell.state, now, amount, charged)
            cell.state = state
            cell.until = multi.expires_at(limit, state)

    def acquire(
        self, key_parts: Sequence[str], limit: Concurrency, cost: int = 1
    ) -> tuple[Decision, Lease | None]:
        """Take a concurrency slot; the Lease (None when refused) must be released."""
        slot = (tuple(key_parts), limit)
        state = self._in_flight.get(slot, ConcurrencyState())
        decision, new = acquire(state, cost, limit)
        if not decision.allowed:
            return decision, None
        self._in_flight[slot] = new
        return decision, Lease(self, slot, cost)

    def sweep(self) -> int:
        """Drop every expired state now; returns how many were dropped."""
        return self._sweep(self._clock())

    # -- internals ---------------------------------------------------------

    def _release(self, slot: tuple[Key, Concurrency], cost: int) -> None:
        state = release(self._in_flight.get(slot, ConcurrencyState()), cost)
        if state.in_flight:
            self._in_flight[slot] = state
        else:
            self._in_flight.pop(slot, None)

    def _sweep(self, now: float) -> int:
        self._last_sweep = now
        expired = [slot for slot, cell in self._states.items() if cell.until <= now]
        for slot in expired:
            del self._states[slot]
        excess = len(self._states) - self._max_entries
        if excess >= 0:
            # Still full of live counters (a flood of distinct IPs or header values
            # on a day quota): drop the tenth first created, so memory stays bounded.
            # Those keys start afresh: a bounded process beats an exact one that dies.
            drop = excess + max(1, self._max_entries // 10)
            for slot in list(itertools.islice(self._states, drop)):
                del self._states[slot]
            self.evicted += drop
            if self.stats is not None:
                self.stats.store_event("memory", "evicted", drop)
        return len(expired)

    @staticmethod
    def _result(
        outcome: MultiDecision, limits: tuple[Limit, ...], charge: Charge | None
    ) -> LimitResult:
        refused_by = None if outcome.refused_by is None else limits[outcome.refused_by]
        return LimitResult(outcome.allowed, outcome.decision, refused_by, outcome.decisions, charge)


# What check() evaluates, by kind of limit: native calls instead of a dict lookup and
# a Python-level call per window (multi.py, a tuple subclass, cannot be compiled).
_GCRA = 0
_SLIDING = 1
_FIXED = 2
# Windows objects whose plans a limiter remembers (a plugin holds one per limit set).
_MAX_PLANS = 4096


class _Cell:
    """One counter: its state and the instant from which it is as good as fresh."""

    def __init__(self, state: State, until: float) -> None:
        self.state = state
        self.until = until


class _WindowsPlan:
    """A multi.Windows readied for check(): its limits, slots, fresh states and kinds."""

    def __init__(self, windows: multi.Windows) -> None:
        self.windows = windows
        self.count = len(windows)
        self.limits: list[Limit] = list(windows)
        self.slots: list[str] = list(windows.slots)
        self.initials: list[State] = list(windows.initials)
        self.kinds: list[int] = [
            _GCRA if isinstance(w, Gcra) else _SLIDING if isinstance(w, SlidingWindow) else _FIXED
            for w in windows
        ]


def _evaluate(
    kind: int, limit: Limit, state: State, now: float, cost: int
) -> tuple[Decision, State]:
    if kind == _GCRA:
        return gcra(cast(GcraState, state), now, cost, cast(Gcra, limit))
    if kind == _SLIDING:
        return sliding_window(cast(SlidingState, state), now, cost, cast(SlidingWindow, limit))
    return fixed_window(cast(FixedState, state), now, cost, cast(FixedWindow, limit))


def _expires(kind: int, limit: Limit, state: State) -> float:
    if kind == _GCRA:
        return gcra_expires_at(cast(GcraState, state), cast(Gcra, limit))
    if kind == _SLIDING:
        return sliding_expires_at(cast(SlidingState, state), cast(SlidingWindow, limit))
    return fixed_expires_at(cast(FixedState, state), cast(FixedWindow, limit))

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
key parts when limits must be per route. Thread-safe (one lock).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tollway.limits import multi
from tollway.limits.concurrency import Concurrency, ConcurrencyState, acquire, release
from tollway.limits.decision import Decision
from tollway.limits.multi import Limit, MultiDecision, State

Key = tuple[str, ...]


@dataclass(slots=True)
class Charge:
    """What an allowed check consumed, to refund it (count_only_success,
    refund_on_status). refund() gives it back at most once."""

    key: Key
    limits: tuple[Limit, ...]
    costs: tuple[int, ...]  # one per limit
    charged: tuple[State, ...]
    refunded: bool = False


@dataclass(frozen=True, slots=True)
class LimitResult:
    allowed: bool
    decision: Decision  # the most restrictive window, for the headers
    refused_by: Limit | None  # the window that refused (reported one)
    decisions: tuple[Decision, ...]
    charge: Charge | None  # None when refused (nothing consumed)


@dataclass(slots=True)
class Lease:
    """A concurrency slot; release() must run once the request is done
    (it is idempotent: later calls do nothing and return False)."""

    _limiter: MemoryLimiter
    _slot: tuple[Key, Concurrency]
    cost: int
    released: bool = field(default=False)

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
        # Live counters dropped because the table was full (see _sweep).
        self.evicted = 0
        self._states: dict[tuple[Key, str], tuple[State, float]] = {}
        self._in_flight: dict[tuple[Key, Concurrency], ConcurrencyState] = {}
        self._lock = threading.Lock()
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
        windows = limits if type(limits) is multi.Windows else multi.Windows(limits)
        count = len(windows)
        costs = (cost,) * count if type(cost) is int else multi.per_limit_costs(cost, count)
        slots = windows.slots
        initials = windows.initials
        algorithms = windows.algorithms
        held_states = self._states
        with self._lock:
            now = self._clock()
            if (
                now - self._last_sweep >= self._sweep_interval
                or len(held_states) >= self._max_entries
            ):
                self._sweep(now)
            # multi.check_all, inlined for the common case where every window
            # allows (this runs on every limited request); a refusal goes through
            # check_all itself, which also works out what to report.
            states: list[State] = []
            decisions: list[Decision] = []
            new_states: list[State] = []
            allowed = True
            for i in range(count):
                held = held_states.get((key, slots[i]))
                state = held[0] if held is not None and held[1] > now else initials[i]
                decision, new = algorithms[i](state, now, costs[i], windows[i])
                allowed = allowed and decision.allowed
                states.append(state)
                decisions.append(decision)
                new_states.append(new)
            if not allowed:
                outcome, _ = multi.check_all(states, now, costs, windows)
                return self._result(outcome, windows, None)
            expirers = windows.expirers
            for i in range(count):
                state = new_states[i]
                held_states[(key, slots[i])] = (state, expirers[i](state, windows[i]))
        reported = multi.reported_index(decisions, True)
        return LimitResult(
            True,
            decisions[reported],
            None,
            tuple(decisions),
            Charge(key, windows, costs, tuple(new_states)),
        )

    def refund(self, charge: Charge, cost: int | None = None) -> None:
        """Give back what an allowed check consumed (with `cost`, at most that much
        per limit); at most once per charge; never makes remaining exceed the limit."""
        if charge.refunded:
            return
        charge.refunded = True
        with self._lock:
            now = self._clock()
            for limit, charged, spent in zip(
                charge.limits, charge.charged, charge.costs, strict=True
            ):
                slot = (charge.key, multi.slot_id(limit))
                held = self._states.get(slot)
                if held is None:
                    continue  # expired: nothing left to give back
                amount = spent if cost is None else min(cost, spent)
                state = multi.refund(limit, held[0], now, amount, charged)
                self._states[slot] = (state, multi.expires_at(limit, state))

    def acquire(
        self, key_parts: Sequence[str], limit: Concurrency, cost: int = 1
    ) -> tuple[Decision, Lease | None]:
        """Take a concurrency slot; the Lease (None when refused) must be released."""
        slot = (tuple(key_parts), limit)
        with self._lock:
            state = self._in_flight.get(slot, ConcurrencyState())
            decision, new = acquire(state, cost, limit)
            if not decision.allowed:
                return decision, None
            self._in_flight[slot] = new
        return decision, Lease(self, slot, cost)

    def sweep(self) -> int:
        """Drop every expired state now; returns how many were dropped."""
        with self._lock:
            return self._sweep(self._clock())

    # -- internals ---------------------------------------------------------

    def _release(self, slot: tuple[Key, Concurrency], cost: int) -> None:
        with self._lock:
            state = release(self._in_flight.get(slot, ConcurrencyState()), cost)
            if state.in_flight:
                self._in_flight[slot] = state
            else:
                self._in_flight.pop(slot, None)

    def _state(self, slot: tuple[Key, str], limit: Limit, now: float) -> State:
        held = self._states.get(slot)
        if held is None or held[1] <= now:
            return multi.initial_state(limit)
        return held[0]

    def _sweep(self, now: float) -> int:
        self._last_sweep = now
        expired = [slot for slot, (_, until) in self._states.items() if until <= now]
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
        return len(expired)

    @staticmethod
    def _result(
        outcome: MultiDecision, limits: tuple[Limit, ...], charge: Charge | None
    ) -> LimitResult:
        refused_by = None if outcome.refused_by is None else limits[outcome.refused_by]
        return LimitResult(outcome.allowed, outcome.decision, refused_by, outcome.decisions, charge)

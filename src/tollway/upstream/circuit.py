"""Circuit breakers for upstream services and targets.

closed     every request goes; `failure_threshold` consecutive failures, or a
           failure share of at least `failure_rate` over `min_requests` or more
           outcomes in the last `window` seconds, open it.
open       allow() is False (fail fast) until `open_time` has passed.
half_open  at most `half_open_probes` requests at once go as probes;
           `half_open_successes` successful probes close the breaker, one failed
           probe opens it again.

Pure bookkeeping on the monotonic time the caller passes as `now`: no I/O, no lock
(one event loop), no clock of its own, so tests drive it with plain numbers.

Hand-written rather than pybreaker/aiobreaker/purgatory: none of them takes an
injected time, none has a failure-rate window, and none bounds concurrent
half-open probes, which are the three things this gateway needs.

Transitions are reported to `on_transition(breaker, old, new, now)`. An open
learned from a peer node (`force_open`) is reported too, with
`breaker.last_transition_remote` True while (and after) the callback runs, so a
sharer publishes only opens with `last_transition_remote` False: a node never
re-publishes what it heard, and two nodes cannot echo an open back and forth.
A hook runs with the breaker already in its new state; it must not call the
breaker's state-changing methods. `opened_times` counts both kinds of opens.

Known approximation: outcomes carry no ticket, so a request admitted while closed
that answers only after the breaker turned half-open counts as a probe's outcome.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from tollway.config.upstream_schema import CircuitBreakerConfig


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# (breaker, old, new, now): metrics, logs and Redis sharing hang here.
Transition = Callable[["CircuitBreaker", BreakerState, BreakerState, float], None]


class RollingCounts:
    """Counters summed over the last `window` seconds, in fixed-width buckets.

    Between 10 and 60 buckets (1 s wide for windows of 10 to 60 s): an event ages
    out between window - width and window seconds after it happened, which is
    precise enough for rates and budgets, and memory stays bounded whatever the
    traffic. Adding and reading are O(1) amortized: each bucket is appended and
    dropped once. A window of 0 (the config's Duration allows it) counts nothing.
    """

    __slots__ = ("_buckets", "_n", "_width", "totals", "window")

    def __init__(self, window: float, fields: int) -> None:
        if not window >= 0:
            raise ValueError("window must not be negative")
        self.window = window
        self._n = min(60, max(10, math.ceil(window))) if window > 0 else 0
        self._width = window / self._n if window > 0 else 1.0
        # [bucket index, count of field 0, count of field 1, ...], oldest first.
        self._buckets: deque[list[int]] = deque()
        self.totals = [0] * fields

    def _expire(self, index: int) -> None:
        buckets = self._buckets
        while buckets and buckets[0][0] <= index - self._n:
            old = buckets.popleft()
            for i in range(len(self.totals)):
                self.totals[i] -= old[i + 1]

    def add(self, now: float, field: int, count: int = 1) -> None:
        if self._n == 0:
            return
        index = math.floor(now / self._width)
        buckets = self._buckets
        if buckets and buckets[-1][0] == index:
            # The hot case (many events a second): the newest bucket is this one,
            # so whatever could expire did when it was opened.
            buckets[-1][field + 1] += count
            self.totals[field] += count
            return
        self._expire(index)
        # A `now` older than the newest bucket (a caller's stale timestamp) is
        # counted in the newest bucket rather than rewriting history.
        if not buckets or buckets[-1][0] < index:
            buckets.append([index] + [0] * len(self.totals))
        buckets[-1][field + 1] += count
        self.totals[field] += count

    def counts(self, now: float) -> list[int]:
        """The totals of the window ending at `now` (a copy)."""
        self._expire(math.floor(now / self._width))
        return list(self.totals)

    def clear(self) -> None:
        self._buckets.clear()
        self.totals = [0] * len(self.totals)


_TOTAL, _FAILED = 0, 1
# A half-open probe unanswered this long (or open_time, if longer) is presumed lost.
PROBE_LEASH_MIN = 10.0


class CircuitBreaker:
    """One breaker; see the module docstring for states and the transition hook."""

    def __init__(
        self,
        config: CircuitBreakerConfig,
        name: str,
        on_transition: Transition | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.on_transition = on_transition
        self._state = BreakerState.CLOSED
        # True while closed and enabled: a caller's success path may then just count
        # into `pending_ok` and reset `consecutive` (upstream/cluster.py does).
        self.closed_fast = config.enabled
        # Successes not yet in the window: folded in by fold(), which the owner calls
        # a few times a second and every reading of the window calls first. Adding
        # each success to the window costs the hot path more than a plain count.
        self.pending_ok = 0
        self._open_until = 0.0
        self.consecutive = 0
        self._window = RollingCounts(config.window, fields=2)
        # Admission times of the probes not yet answered (half-open only).
        self._probes: deque[float] = deque()
        self._probe_successes = 0
        self.opened_times = 0
        # True when the last transition came from force_open (a peer's open).
        self.last_transition_remote = False

    # ---- state ------------------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        """The state at `now`; an open period that has ended turns half-open here."""
        if not self.config.enabled and self._state is not BreakerState.CLOSED:
            # Disabled by reconfigure(), which has no `now`: closed here instead.
            self._reset_counts()
            self._move(BreakerState.CLOSED, now)
        elif self._state is BreakerState.OPEN and now >= self._open_until:
            self._probes.clear()
            self._probe_successes = 0
            self._move(BreakerState.HALF_OPEN, now)
        return self._state

    def allow(self, now: float) -> bool:
        """May a request go now? In half_open each True is one outstanding probe,
        freed by its record() or abandon()."""
        if self._state is BreakerState.CLOSED and self.config.enabled:
            return True  # once per request: the common case first
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        # A probe nobody answered for long (a caller that forgot both record and
        # abandon) is presumed lost: without this one bug would keep the breaker
        # half-open, and the service unreachable, for good.
        leash = max(self.config.open_time, PROBE_LEASH_MIN)
        while self._probes and now - self._probes[0] >= leash:
            self._probes.popleft()
        if len(self._probes) >= self.config.half_open_probes:
            return False
        self._probes.append(now)
        return True

    def fold(self, now: float) -> None:
        """Move the pending successes into the window, as of `now`."""
        if self.pending_ok:
            count, self.pending_ok = self.pending_ok, 0
            if self._state is BreakerState.CLOSED:
                self._window.add(now, _TOTAL, count)

    def record(self, success: bool, now: float) -> None:
        """The outcome of a request allow() let through."""
        if not self.config.enabled:
            return
        self.fold(now)
        if success and self._state is BreakerState.CLOSED:
            # Once per request: a success while closed resets the run of failures,
            # and can only trip the rate when the window holds failures at all.
            self.consecutive = 0
            window = self._window
            window.add(now, _TOTAL)
            if window.totals[_FAILED] and self._rate_exceeded(now):
                self._open(now, self.config.open_time, remote=False)
            return
        state = self.state(now)
        if state is BreakerState.OPEN:
            # The late answer of a request admitted before the breaker opened: it
            # neither closes nor prolongs the open period.
            return
        if state is BreakerState.HALF_OPEN:
            if self._probes:
                self._probes.popleft()
            if not success:
                self._open(now, self.config.open_time, remote=False)
                return
            self._probe_successes += 1
            if self._probe_successes >= self.config.half_open_successes:
                self._reset_counts()
                self._move(BreakerState.CLOSED, now)
            return
        self._window.add(now, _TOTAL)
        if success:
            self.consecutive = 0
        else:
            self._window.add(now, _FAILED)
            self.consecutive += 1
        # The rate is judged on successes too: the one that brings the window to
        # min_requests may find it already failing.
        if self.consecutive >= self.config.failure_threshold or self._rate_exceeded(now):
            self._open(now, self.config.open_time, remote=False)

    def abandon(self, now: float) -> None:
        """An admitted request ended without an outcome (the client went away)."""
        if self.config.enabled and self.state(now) is BreakerState.HALF_OPEN and self._probes:
            self._probes.popleft()

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker turns half-open; 0.0 unless it is open."""
        if self.state(now) is not BreakerState.OPEN:
            return 0.0
        return self._open_until - now

    def force_open(self, seconds: float, now: float) -> None:
        """A peer node's open circuit: open until now + seconds.

        An open period of this breaker is extended, never shortened (no transition
        is reported then: the state did not change). A change to open is reported
        with `last_transition_remote` True so that it is not published again. A
        disabled breaker ignores it.
        """
        if not self.config.enabled or seconds <= 0:
            return
        until = now + seconds
        if self.state(now) is BreakerState.OPEN:
            self._open_until = max(self._open_until, until)
            return
        self._open(now, seconds, remote=True)

    def probe_now(self, now: float) -> None:
        """Evidence the target recovered (an active health check passed): the rest of
        an open period is skipped and half-open probes decide from here."""
        if self.state(now) is BreakerState.OPEN:
            self._open_until = now
            self.state(now)

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        """New settings; the state is kept (an open period keeps its end).

        A changed window starts empty (its buckets no longer fit). A disabled
        breaker never blocks: it turns closed at the next call given a `now`.
        """
        if config.window != self.config.window:
            self._window = RollingCounts(config.window, fields=2)
        self.config = config
        self.closed_fast = self._state is BreakerState.CLOSED and config.enabled

    def describe(self, now: float) -> dict[str, Any]:
        self.fold(now)
        state = self.state(now)
        total, failed = self._window.counts(now)
        return {
            "name": self.name,
            "enabled": self.config.enabled,
            "state": str(state),
            "consecutive_failures": self.consecutive,
            "window_requests": total,
            "window_failures": failed,
            "retry_after_seconds": round(self.retry_after(now), 3),
            "half_open_probes_outstanding": len(self._probes),
            "opened_times": self.opened_times,
        }

    # ---- internals --------------------------------------------------------------

    def _rate_exceeded(self, now: float) -> bool:
        rate = self.config.failure_rate
        if rate is None:
            return False
        total, failed = self._window.counts(now)
        return total >= self.config.min_requests and failed / total >= rate

    def _reset_counts(self) -> None:
        self.consecutive = 0
        self.pending_ok = 0
        self._window.clear()
        self._probes.clear()
        self._probe_successes = 0

    def _open(self, now: float, seconds: float, *, remote: bool) -> None:
        self._reset_counts()
        self._open_until = now + seconds
        self.opened_times += 1
        self._move(BreakerState.OPEN, now, remote=remote)

    def _move(self, new: BreakerState, now: float, *, remote: bool = False) -> None:
        old, self._state = self._state, new
        self.closed_fast = new is BreakerState.CLOSED and self.config.enabled
        self.last_transition_remote = remote
        # Called last, with the breaker consistent: a hook may read describe().
        if self.on_transition is not None:
            self.on_transition(self, old, new, now)

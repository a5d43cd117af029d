"""Window limits: fixed window and weighted sliding window, plus window_bounds.

Fixed window: at most `limit` per window; windows are aligned to multiples of
the period since the epoch (second, minute, hour) or to the calendar (day,
month) in an IANA time zone, so a "5 per day" quota resets at local midnight.

Sliding window (weighted, as Cloudflare describes it): the estimate at time t in
the window [start, start + P) is

    previous_count * (P - (t - start)) / P + current_count

and a request of cost c passes when estimate + c <= limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal, get_args
from zoneinfo import ZoneInfo

from tollway.limits.decision import COUNT_EPSILON, NEVER, TIME_EPSILON, Decision, check_cost

Per = Literal["second", "minute", "hour", "day", "month"]
PERS: tuple[str, ...] = get_args(Per)
_SECONDS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


@lru_cache(maxsize=64)
def _zone(tz: str) -> ZoneInfo:
    return ZoneInfo(tz)


def window_bounds(now: float, per: Per, tz: str | ZoneInfo | None = None) -> tuple[float, float]:
    """[start, end) in epoch seconds of the `per` window holding `now`.

    second/minute/hour: multiples of the period since the epoch (`tz` is not
    used: an hour window starts on the UTC hour). day/month: local midnight of
    the day / first day of the month in `tz` (default UTC); a day is 23 or 25
    hours long across a DST change.
    """
    if per in _SECONDS:
        period = _SECONDS[per]
        start = math.floor(now / period) * period
        return start, start + period
    # The calendar arithmetic costs microseconds; nearly every call falls in the
    # window of the previous call with the same zone, so that one is remembered.
    memo_key = (per, tz if isinstance(tz, str) or tz is None else tz.key)
    last_bounds = _last_calendar.get(memo_key)
    if last_bounds is not None and last_bounds[0] <= now < last_bounds[1]:
        return last_bounds
    bounds = _calendar_bounds(now, per, tz)
    if len(_last_calendar) > 256:
        _last_calendar.clear()
    _last_calendar[memo_key] = bounds
    return bounds


_last_calendar: dict[tuple[str, str | None], tuple[float, float]] = {}


def _calendar_bounds(now: float, per: Per, tz: str | ZoneInfo | None) -> tuple[float, float]:
    zone = _zone(tz or "UTC") if not isinstance(tz, ZoneInfo) else tz
    local = datetime.fromtimestamp(now, zone)
    if per == "day":
        first = datetime(local.year, local.month, local.day, tzinfo=zone)
        nxt = first.date() + timedelta(days=1)
        last = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    elif per == "month":
        first = datetime(local.year, local.month, 1, tzinfo=zone)
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        last = datetime(year, month, 1, tzinfo=zone)
    else:
        raise ValueError(f"unknown window {per!r}; use one of {', '.join(PERS)}")
    return first.timestamp(), last.timestamp()


# -- fixed window -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FixedWindow:
    """At most `limit` per calendar/epoch-aligned `per` window in time zone `tz`."""

    limit: int
    per: Per = "minute"
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.per not in PERS:
            raise ValueError(f"unknown window {self.per!r}; use one of {', '.join(PERS)}")
        _zone(self.tz)  # raises on an unknown zone


@dataclass(slots=True, init=False)
class FixedState:
    """A native record, not a NamedTuple (see GcraState). Never changed once made."""

    window_start: float
    used: int

    def __init__(self, window_start: float = -math.inf, used: int = 0) -> None:
        self.window_start = window_start
        self.used = used


class _Bounds:
    """The window of one FixedWindow that the last call fell in."""

    def __init__(self, params: FixedWindow, start: float, end: float) -> None:
        self.params = params  # held: the id keying this entry stays its own
        self.start = start
        self.end = end


# id(FixedWindow) -> its last window. A limit's window changes once a period, and
# window_bounds builds and hashes a (per, zone) key per call: this runs on every
# check of a fixed or calendar window (twice: the check and the state's expiry).
_BOUNDS: dict[int, _Bounds] = {}


def fixed_bounds(at: float, params: FixedWindow) -> tuple[float, float]:
    """window_bounds(at, params.per, params.tz), remembered per limit."""
    held = _BOUNDS.get(id(params))
    if held is not None and held.params is params and held.start <= at < held.end:
        return held.start, held.end
    start, end = window_bounds(at, params.per, params.tz)
    if held is not None and held.params is params:
        held.start = start
        held.end = end
    else:
        if len(_BOUNDS) >= 4096:
            _BOUNDS.clear()
        _BOUNDS[id(params)] = _Bounds(params, start, end)
    return start, end


def _fixed_current(state: FixedState, now: float, params: FixedWindow) -> tuple[float, float, int]:
    start, end = fixed_bounds(now, params)
    if state.window_start > start + TIME_EPSILON:
        # The clock went back: stay in the newer window already counted.
        start, end = fixed_bounds(state.window_start, params)
        return start, end, state.used
    if abs(state.window_start - start) <= TIME_EPSILON:
        return start, end, state.used
    return start, end, 0


def fixed_window(
    state: FixedState, now: float, cost: int, params: FixedWindow
) -> tuple[Decision, FixedState]:
    """Check and (when allowed) consume `cost`; a refusal returns `state` unchanged."""
    check_cost(cost)
    start, end, count = _fixed_current(state, now, params)
    left = max(0.0, end - now)
    if count + cost <= params.limit:
        count += cost
        decision = Decision(
            allowed=True,
            limit=params.limit,
            remaining=params.limit - count,
            reset_after=left if count else 0.0,
            retry_after=0.0,
        )
        return decision, FixedState(start, count)
    decision = Decision(
        allowed=False,
        limit=params.limit,
        remaining=max(0, params.limit - count),
        reset_after=left if count else 0.0,
        retry_after=NEVER if cost > params.limit else left,
    )
    return decision, state


def fixed_refund(
    state: FixedState, now: float, cost: int, params: FixedWindow, charged: FixedState
) -> FixedState:
    """Give back `cost` charged in window `charged.window_start` if it is still current."""
    check_cost(cost)
    start, _, count = _fixed_current(state, now, params)
    if abs(charged.window_start - start) > TIME_EPSILON or count == 0:
        return state
    return FixedState(start, max(0, count - cost))


def fixed_expires_at(state: FixedState, params: FixedWindow) -> float:
    if state.used == 0 or math.isinf(state.window_start):
        return -math.inf
    return fixed_bounds(state.window_start, params)[1]


# -- sliding window -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlidingWindow:
    """At most `limit` in any `period` seconds, estimated by weighting."""

    limit: int
    period: float

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be >= 1")
        if self.period <= 0:
            raise ValueError("period must be > 0")


@dataclass(slots=True, init=False)
class SlidingState:
    """A native record, not a NamedTuple (see GcraState). Never changed once made."""

    window_start: float
    previous_count: int
    current_count: int

    def __init__(
        self, window_start: float = -math.inf, previous_count: int = 0, current_count: int = 0
    ) -> None:
        self.window_start = window_start
        self.previous_count = previous_count
        self.current_count = current_count


def _sliding_roll(state: SlidingState, now: float, period: float) -> SlidingState:
    index = math.floor(now / period)
    if math.isinf(state.window_start):
        return SlidingState(index * period, 0, 0)
    held = round(state.window_start / period)
    if index <= held:  # same window (or the clock went back)
        return state
    if index == held + 1:
        return SlidingState(index * period, state.current_count, 0)
    return SlidingState(index * period, 0, 0)


def _estimate(state: SlidingState, elapsed: float, period: float) -> float:
    weight = (period - elapsed) / period
    return state.previous_count * weight + state.current_count


def _sliding_retry(state: SlidingState, elapsed: float, cost: int, params: SlidingWindow) -> float:
    period, limit = params.period, params.limit
    if cost > limit:
        return NEVER
    room = limit - state.current_count - cost
    if room >= 0 and state.previous_count > 0:
        # In this window, once the previous count's weight has decayed enough.
        at = period * (1.0 - room / state.previous_count)
        return max(0.0, at - elapsed)
    # In the next window, where the current count becomes the previous one.
    room = limit - cost
    at = 0.0
    if state.current_count > room:
        at = period * (1.0 - room / state.current_count)
    return (period - elapsed) + at


def _sliding_reset(state: SlidingState, elapsed: float, period: float) -> float:
    if state.current_count:
        return 2 * period - elapsed
    if state.previous_count:
        return period - elapsed
    return 0.0


def sliding_window(
    state: SlidingState, now: float, cost: int, params: SlidingWindow
) -> tuple[Decision, SlidingState]:
    """Check and (when allowed) consume `cost`; a refusal returns `state` unchanged."""
    check_cost(cost)
    period, limit = params.period, params.limit
    rolled = _sliding_roll(state, now, period)
    elapsed = min(period, max(0.0, now - rolled.window_start))
    estimate = _estimate(rolled, elapsed, period)
    if estimate + cost <= limit + COUNT_EPSILON:
        new = SlidingState(rolled.window_start, rolled.previous_count, rolled.current_count + cost)
        used = estimate + cost
        decision = Decision(
            allowed=True,
            limit=limit,
            remaining=max(0, math.floor(limit - used + COUNT_EPSILON)),
            reset_after=_sliding_reset(new, elapsed, period),
            retry_after=0.0,
        )
        return decision, new
    decision = Decision(
        allowed=False,
        limit=limit,
        remaining=max(0, math.floor(limit - estimate + COUNT_EPSILON)),
        reset_after=_sliding_reset(rolled, elapsed, period),
        retry_after=_sliding_retry(rolled, elapsed, cost, params),
    )
    return decision, state


def sliding_refund(
    state: SlidingState, now: float, cost: int, params: SlidingWindow, charged: SlidingState
) -> SlidingState:
    """Give back `cost` charged in window `charged.window_start`, wherever it now counts."""
    check_cost(cost)
    rolled = _sliding_roll(state, now, params.period)
    if math.isinf(charged.window_start):
        return state
    gap = round((rolled.window_start - charged.window_start) / params.period)
    if gap == 0:
        return SlidingState(
            rolled.window_start, rolled.previous_count, max(0, rolled.current_count - cost)
        )
    if gap == 1:
        return SlidingState(
            rolled.window_start, max(0, rolled.previous_count - cost), rolled.current_count
        )
    return state


def sliding_expires_at(state: SlidingState, params: SlidingWindow) -> float:
    if state.current_count:
        return state.window_start + 2 * params.period
    if state.previous_count:
        return state.window_start + params.period
    return -math.inf

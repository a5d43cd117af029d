"""Circuit breaker transitions, driven by plain `now` values (a fake monotonic clock)."""

from __future__ import annotations

from typing import Any

import pytest

from tollway.config.upstream_schema import CircuitBreakerConfig
from tollway.upstream.circuit import (
    PROBE_LEASH_MIN,
    BreakerState,
    CircuitBreaker,
    RollingCounts,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
T0 = 1000.0


class Recorder:
    """An on_transition hook that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[BreakerState, BreakerState, float, bool]] = []

    def __call__(
        self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState, now: float
    ) -> None:
        self.calls.append((old, new, now, breaker.last_transition_remote))

    @property
    def moves(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(old, new) for old, new, _, _ in self.calls]


def make(**settings: Any) -> tuple[CircuitBreaker, Recorder]:
    base: dict[str, Any] = {
        "failure_threshold": 3,
        "failure_rate": None,
        "open_time": 5.0,
        "half_open_successes": 2,
        "half_open_probes": 1,
    }
    base.update(settings)
    rec = Recorder()
    return CircuitBreaker(CircuitBreakerConfig(**base), "images", on_transition=rec), rec


def fail(breaker: CircuitBreaker, times: int, now: float) -> None:
    for _ in range(times):
        assert breaker.allow(now)
        breaker.record(False, now)


def open_breaker(breaker: CircuitBreaker, now: float = T0) -> None:
    fail(breaker, breaker.config.failure_threshold, now)
    assert breaker.state(now) is OPEN


# ---- closed -> open ---------------------------------------------------------------


def test_consecutive_failures_open_the_breaker() -> None:
    breaker, rec = make(failure_threshold=3)
    fail(breaker, 2, T0)
    assert breaker.state(T0) is CLOSED
    assert breaker.describe(T0)["consecutive_failures"] == 2
    fail(breaker, 1, T0 + 0.1)
    assert breaker.state(T0 + 0.1) is OPEN
    assert rec.moves == [(CLOSED, OPEN)]
    assert rec.calls[0][2] == T0 + 0.1
    assert breaker.opened_times == 1


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, rec = make(failure_threshold=3)
    for i in range(10):
        fail(breaker, 2, T0 + i)
        breaker.record(True, T0 + i)
    assert breaker.state(T0 + 10) is CLOSED
    assert rec.calls == []
    assert breaker.describe(T0 + 10)["consecutive_failures"] == 0


def test_failure_rate_opens_the_breaker() -> None:
    # Never three failures in a row, but half of 20 outcomes failed.
    breaker, rec = make(failure_threshold=3, failure_rate=0.5, min_requests=20, window=10.0)
    now = T0
    for i in range(19):
        assert breaker.allow(now)
        breaker.record(i % 2 == 0, now)  # 10 successes, 9 failures
        now += 0.1
    assert breaker.state(now) is CLOSED
    assert breaker.describe(now)["window_requests"] == 19
    assert breaker.describe(now)["window_failures"] == 9
    breaker.record(False, now)  # 20 outcomes, 10 failed
    assert breaker.state(now) is OPEN
    assert rec.moves == [(CLOSED, OPEN)]


def test_failure_rate_needs_min_requests() -> None:
    breaker, rec = make(failure_threshold=100, failure_rate=0.5, min_requests=20)
    # 19 outcomes, all but one failed (never 100 in a row): too few to judge.
    for i in range(19):
        breaker.record(i == 0, T0)
    assert breaker.state(T0) is CLOSED
    assert rec.calls == []


def test_failure_rate_window_slides_old_failures_age_out() -> None:
    breaker, rec = make(failure_threshold=100, failure_rate=0.5, min_requests=10, window=10.0)
    for _ in range(9):
        breaker.record(False, T0)
    breaker.record(True, T0)  # 10 outcomes, 90 % failed: would open...
    assert breaker.state(T0) is OPEN
    # ...so the same at a slower pace: the old failures are gone from the window.
    breaker, rec = make(failure_threshold=100, failure_rate=0.5, min_requests=10, window=10.0)
    for _ in range(9):
        breaker.record(False, T0)
    later = T0 + 11.0
    assert breaker.describe(later)["window_requests"] == 0
    for _ in range(9):
        breaker.record(True, later)
    breaker.record(False, later)  # 10 in the window, 1 failed
    assert breaker.state(later) is CLOSED
    assert breaker.describe(later)["window_failures"] == 1
    assert rec.calls == []


def test_window_keeps_recent_outcomes() -> None:
    breaker, _ = make(failure_threshold=100, failure_rate=0.5, min_requests=4, window=10.0)
    breaker.record(False, T0)
    breaker.record(False, T0 + 3)
    breaker.record(True, T0 + 6)
    assert breaker.state(T0 + 8) is CLOSED
    breaker.record(False, T0 + 8.5)  # 4 outcomes in 8.5 s, 3 failed
    assert breaker.state(T0 + 8.5) is OPEN


# ---- open ---------------------------------------------------------------------------


def test_open_fails_fast_and_retry_after_counts_down() -> None:
    breaker, _ = make(open_time=5.0)
    open_breaker(breaker)
    assert not breaker.allow(T0)
    assert breaker.retry_after(T0) == pytest.approx(5.0)
    assert not breaker.allow(T0 + 2)
    assert breaker.retry_after(T0 + 2) == pytest.approx(3.0)
    assert breaker.retry_after(T0 + 4.999) == pytest.approx(0.001)
    assert breaker.describe(T0 + 1)["retry_after_seconds"] == 4.0
    assert breaker.describe(T0 + 1)["state"] == "open"


def test_late_outcomes_while_open_are_ignored() -> None:
    breaker, rec = make(open_time=5.0)
    open_breaker(breaker)
    breaker.record(True, T0 + 1)
    breaker.record(False, T0 + 2)
    assert breaker.state(T0 + 2) is OPEN
    assert breaker.retry_after(T0 + 2) == pytest.approx(3.0)  # not prolonged
    assert rec.moves == [(CLOSED, OPEN)]


def test_open_turns_half_open_at_open_time() -> None:
    breaker, rec = make(open_time=5.0)
    open_breaker(breaker)
    assert breaker.state(T0 + 4.99) is OPEN
    assert breaker.state(T0 + 5.0) is HALF_OPEN
    assert breaker.retry_after(T0 + 5.0) == 0.0
    assert rec.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert rec.calls[1][2] == T0 + 5.0
    # Asking again reports nothing new.
    breaker.state(T0 + 6)
    breaker.allow(T0 + 6)
    assert len(rec.calls) == 2


# ---- half-open ------------------------------------------------------------------------


def half_open(**settings: Any) -> tuple[CircuitBreaker, Recorder, float]:
    breaker, rec = make(**settings)
    open_breaker(breaker)
    now = T0 + breaker.config.open_time
    assert breaker.state(now) is HALF_OPEN
    return breaker, rec, now


def test_half_open_admits_at_most_the_probes_and_abandon_frees_one() -> None:
    breaker, _, now = half_open(half_open_probes=2)
    assert breaker.allow(now)
    assert breaker.allow(now)
    assert not breaker.allow(now)
    assert breaker.describe(now)["half_open_probes_outstanding"] == 2
    breaker.abandon(now)  # a probe's client went away
    assert breaker.describe(now)["half_open_probes_outstanding"] == 1
    assert breaker.allow(now)
    assert not breaker.allow(now)
    assert breaker.state(now) is HALF_OPEN


def test_a_probe_outcome_frees_its_slot() -> None:
    breaker, _, now = half_open(half_open_probes=1, half_open_successes=3)
    assert breaker.allow(now)
    assert not breaker.allow(now)
    breaker.record(True, now)
    assert breaker.allow(now)


def test_half_open_closes_after_the_successes() -> None:
    breaker, rec, now = half_open(half_open_probes=1, half_open_successes=2)
    assert breaker.allow(now)
    breaker.record(True, now)
    assert breaker.state(now) is HALF_OPEN
    assert breaker.allow(now)
    breaker.record(True, now + 0.5)
    assert breaker.state(now + 0.5) is CLOSED
    assert rec.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    info = breaker.describe(now + 0.5)
    assert info["consecutive_failures"] == 0
    assert info["window_requests"] == 0
    assert info["half_open_probes_outstanding"] == 0
    # A fresh start: it takes the full threshold to open again.
    fail(breaker, 2, now + 1)
    assert breaker.state(now + 1) is CLOSED


def test_one_failed_probe_opens_again() -> None:
    breaker, rec, now = half_open(half_open_probes=2, half_open_successes=2, open_time=5.0)
    assert breaker.allow(now)
    breaker.record(True, now)
    assert breaker.allow(now)
    breaker.record(False, now + 1)
    assert breaker.state(now + 1) is OPEN
    assert not breaker.allow(now + 1)
    assert breaker.retry_after(now + 1) == pytest.approx(5.0)
    assert breaker.opened_times == 2
    assert rec.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_successes_from_an_earlier_half_open_do_not_carry_over() -> None:
    breaker, _, now = half_open(half_open_successes=2, open_time=5.0)
    assert breaker.allow(now)
    breaker.record(True, now)
    assert breaker.allow(now)
    breaker.record(False, now)  # open again
    now += 5.0
    assert breaker.allow(now)
    breaker.record(True, now)
    assert breaker.state(now) is HALF_OPEN  # one success of this round, not two


def test_a_probe_never_answered_is_presumed_lost() -> None:
    breaker, _, now = half_open(half_open_probes=1, open_time=5.0)
    assert breaker.allow(now)
    assert not breaker.allow(now + PROBE_LEASH_MIN - 0.1)
    assert breaker.allow(now + PROBE_LEASH_MIN)


# ---- disabled, force_open, reconfigure, describe ------------------------------------------


def test_disabled_breaker_always_allows() -> None:
    breaker, rec = make(enabled=False, failure_threshold=1)
    for i in range(50):
        assert breaker.allow(T0 + i)
        breaker.record(False, T0 + i)
    breaker.force_open(30.0, T0)
    assert breaker.allow(T0 + 1)
    assert breaker.state(T0 + 1) is CLOSED
    assert rec.calls == []


def test_force_open_opens_with_the_remote_flag() -> None:
    breaker, rec = make(open_time=5.0)
    breaker.force_open(12.0, T0)
    assert breaker.state(T0) is OPEN
    assert not breaker.allow(T0 + 11)
    assert breaker.retry_after(T0 + 2) == pytest.approx(10.0)
    assert breaker.state(T0 + 12) is HALF_OPEN
    # (old, new, now, remote): the open is flagged as a peer's, the lazy
    # half-open that follows is this node's own.
    assert rec.calls == [(CLOSED, OPEN, T0, True), (OPEN, HALF_OPEN, T0 + 12, False)]


def test_own_opens_are_not_flagged_remote() -> None:
    breaker, rec = make()
    open_breaker(breaker)
    assert rec.calls == [(CLOSED, OPEN, T0, False)]
    assert breaker.last_transition_remote is False


def test_force_open_extends_but_never_shortens_an_open() -> None:
    breaker, rec = make(open_time=5.0)
    open_breaker(breaker)  # open until T0 + 5
    breaker.force_open(1.0, T0 + 1)  # would end at T0 + 2: ignored
    assert breaker.retry_after(T0 + 1) == pytest.approx(4.0)
    breaker.force_open(10.0, T0 + 1)  # ends at T0 + 11
    assert breaker.retry_after(T0 + 1) == pytest.approx(10.0)
    assert breaker.state(T0 + 10.9) is OPEN
    # The state never changed, so no transition (and nothing to publish) was reported.
    assert rec.moves == [(CLOSED, OPEN)]
    assert breaker.opened_times == 1


def test_force_open_from_half_open() -> None:
    breaker, rec, now = half_open(half_open_probes=1)
    assert breaker.allow(now)
    breaker.force_open(3.0, now)
    assert breaker.state(now) is OPEN
    assert rec.calls[-1] == (HALF_OPEN, OPEN, now, True)
    # The probe admitted before answers late: ignored while open.
    breaker.record(True, now + 1)
    assert breaker.state(now + 1) is OPEN


def test_reconfigure_keeps_the_state() -> None:
    breaker, rec = make(failure_threshold=3, open_time=5.0)
    open_breaker(breaker)
    breaker.reconfigure(CircuitBreakerConfig(failure_threshold=10, open_time=60.0))
    assert breaker.state(T0 + 1) is OPEN
    assert breaker.retry_after(T0 + 1) == pytest.approx(4.0)  # the open keeps its end
    assert breaker.state(T0 + 5) is HALF_OPEN
    # The new settings apply from now on: a failed probe opens for 60 s.
    assert breaker.allow(T0 + 5)
    breaker.record(False, T0 + 5)
    assert breaker.retry_after(T0 + 5) == pytest.approx(60.0)
    assert rec.moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_reconfigure_keeps_consecutive_failures() -> None:
    breaker, _ = make(failure_threshold=5)
    fail(breaker, 3, T0)
    breaker.reconfigure(CircuitBreakerConfig(failure_threshold=4, failure_rate=None))
    assert breaker.state(T0) is CLOSED
    fail(breaker, 1, T0)
    assert breaker.state(T0) is OPEN


def test_disabling_closes_an_open_breaker() -> None:
    breaker, rec = make()
    open_breaker(breaker)
    breaker.reconfigure(CircuitBreakerConfig(enabled=False))
    assert breaker.allow(T0 + 1)
    assert breaker.state(T0 + 1) is CLOSED
    assert rec.moves == [(CLOSED, OPEN), (OPEN, CLOSED)]


def test_describe_is_json_able() -> None:
    import json

    breaker, _ = make(failure_threshold=2)
    breaker.record(False, T0)
    info = breaker.describe(T0)
    assert json.loads(json.dumps(info)) == info
    assert info == {
        "name": "images",
        "enabled": True,
        "state": "closed",
        "consecutive_failures": 1,
        "window_requests": 1,
        "window_failures": 1,
        "retry_after_seconds": 0.0,
        "half_open_probes_outstanding": 0,
        "opened_times": 0,
    }


def test_default_config_works() -> None:
    breaker = CircuitBreaker(CircuitBreakerConfig(), "images/127.0.0.1:9001")
    assert breaker.allow(T0)
    for _ in range(5):
        breaker.record(False, T0)
    assert not breaker.allow(T0)


# ---- the rolling window itself -----------------------------------------------------------


def test_rolling_counts_expire_by_bucket() -> None:
    counts = RollingCounts(10.0, fields=2)
    counts.add(T0, 0)
    counts.add(T0 + 4.5, 0)
    counts.add(T0 + 4.5, 1, 3)
    assert counts.counts(T0 + 9.5) == [2, 3]
    assert counts.counts(T0 + 10.5) == [1, 3]  # the first event aged out
    assert counts.counts(T0 + 15) == [0, 0]
    counts.add(T0 + 100, 1)
    assert counts.counts(T0 + 100) == [0, 1]


def test_rolling_counts_of_a_zero_window_count_nothing() -> None:
    counts = RollingCounts(0.0, fields=1)
    counts.add(T0, 0)
    assert counts.counts(T0) == [0]

"""StoreBreaker transitions on a fake clock."""

from __future__ import annotations

import pytest

from support.clock import FakeClock
from tollway.limits.breaker import StoreBreaker


def make(threshold: int = 3, open_seconds: float = 1.0) -> tuple[StoreBreaker, FakeClock]:
    clock = FakeClock(100.0)
    return StoreBreaker(threshold, open_seconds, clock), clock


def trip(breaker: StoreBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        assert breaker.allow()
        breaker.failure()


def test_closed_until_threshold_consecutive_failures() -> None:
    breaker, _ = make()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed" and breaker.consecutive_failures == 2
    breaker.success()  # not consecutive any more
    assert breaker.consecutive_failures == 0
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and breaker.opened == 1


def test_open_fails_fast_for_open_seconds() -> None:
    breaker, clock = make(open_seconds=2.0)
    trip(breaker)
    for _ in range(5):
        assert not breaker.allow()
    clock.now += 1.999
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 0.001
    assert breaker.state == "half_open"


def test_half_open_lets_exactly_one_probe_through() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.now += 1.0
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()
    assert breaker.state == "half_open"


def test_probe_success_closes() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.now += 1.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert all(breaker.allow() for _ in range(10))
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"  # the count started again from zero


def test_probe_failure_reopens_for_a_full_period() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.now += 1.5
    assert breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and breaker.opened == 2
    clock.now += 0.999
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()  # the next probe
    breaker.success()
    assert breaker.state == "closed"


def test_late_answers_while_open_change_nothing() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.now += 0.5
    breaker.success()  # a call allowed before the breaker opened
    breaker.failure()
    assert breaker.state == "open"
    clock.now += 0.5
    assert breaker.state == "half_open"  # not prolonged by the late failure


def test_a_probe_that_never_reports_does_not_block_forever() -> None:
    breaker, clock = make()
    trip(breaker)
    clock.now += 1.0
    assert breaker.allow()  # its caller was cancelled and never reports
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()


def test_threshold_one() -> None:
    breaker, _ = make(threshold=1)
    breaker.failure()
    assert breaker.state == "open"


@pytest.mark.parametrize(("threshold", "open_seconds"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_bad_parameters(threshold: int, open_seconds: float) -> None:
    with pytest.raises(ValueError):
        StoreBreaker(threshold, open_seconds)

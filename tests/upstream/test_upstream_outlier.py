"""Passive outlier detection: ejection from real traffic outcomes, on a fake clock."""

from __future__ import annotations

import json

from support.clock import FakeClock
from tollway.config.upstream_schema import PassiveHealthCheck
from tollway.upstream.health import Outcome, OutlierDetector, TargetHealth, allowed_ejected


def config(**kw: object) -> PassiveHealthCheck:
    base: dict[str, object] = {
        "consecutive_5xx": 3,
        "consecutive_failures": 2,
        "base_ejection_time": 10.0,
        "max_ejection_time": 35.0,
        "max_ejection_percent": 100,
    }
    base.update(kw)
    return PassiveHealthCheck.model_validate(base)


class Ejections:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, health: TargetHealth, seconds: float) -> None:
        self.calls.append((health.key, seconds))


def pool(n: int) -> list[TargetHealth]:
    return [TargetHealth(f"10.0.0.{i}:80") for i in range(1, n + 1)]


def fail(det: OutlierDetector, h: TargetHealth, clock: FakeClock, pop: list[TargetHealth],
         outcome: Outcome = Outcome.HTTP_5XX, times: int = 1) -> list[bool]:
    return [det.record(h, outcome, clock(), pop) for _ in range(times)]


def test_ejected_after_n_consecutive_5xx() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    assert fail(det, h, clock, pop, times=2) == [False, False]
    assert h.available(clock())
    assert det.record(h, Outcome.HTTP_5XX, clock(), pop) is True
    assert not h.available(clock())
    assert ej.calls == [(h.key, 10.0)]
    # Counters start over at ejection.
    assert h.consecutive_5xx == 0 and h.consecutive_failures == 0
    assert pop[1].available(clock())


def test_ejected_after_n_connect_failures_or_timeouts() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    assert det.record(h, Outcome.CONNECT_FAILURE, clock(), pop) is False
    assert det.record(h, Outcome.TIMEOUT, clock(), pop) is True
    assert not h.available(clock())
    assert ej.calls == [(h.key, 10.0)]


def test_gateway_failures_also_count_as_5xx() -> None:
    # Envoy's default: a local-origin failure is a 503/504 to the 5xx counter.
    clock = FakeClock()
    det = OutlierDetector(config(consecutive_failures=0))
    pop = pool(2)
    h = pop[0]
    assert fail(det, h, clock, pop, Outcome.TIMEOUT, times=2) == [False, False]
    assert det.record(h, Outcome.HTTP_5XX, clock(), pop) is True


def test_success_in_between_resets_the_counts() -> None:
    clock = FakeClock()
    det = OutlierDetector(config())
    pop = pool(2)
    h = pop[0]
    for _ in range(5):
        fail(det, h, clock, pop, Outcome.HTTP_5XX, times=2)
        det.record(h, Outcome.SUCCESS, clock(), pop)
        fail(det, h, clock, pop, Outcome.CONNECT_FAILURE)
        det.record(h, Outcome.SUCCESS, clock(), pop)
    assert h.available(clock())
    assert h.ejections == 0


def test_zero_thresholds_turn_ejection_off() -> None:
    clock = FakeClock()
    det = OutlierDetector(config(consecutive_5xx=0, consecutive_failures=0))
    pop = pool(2)
    assert not any(fail(det, pop[0], clock, pop, Outcome.HTTP_5XX, times=50))
    assert not any(fail(det, pop[0], clock, pop, Outcome.TIMEOUT, times=50))
    assert pop[0].available(clock())


def test_returns_by_itself_at_ejected_until() -> None:
    clock = FakeClock()
    det = OutlierDetector(config())
    pop = pool(2)
    h = pop[0]
    start = clock()
    fail(det, h, clock, pop, times=3)
    assert h.ejected_until == start + 10.0
    clock.advance(9.999)
    assert not h.available(clock())
    clock.advance(0.001)
    assert h.available(clock())


def test_ejection_time_grows_and_is_capped() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    for _ in range(5):
        # Fails again the moment it is back: no time to decay.
        assert fail(det, h, clock, pop, times=3)[-1] is True
        clock.now = h.ejected_until
    assert [s for _, s in ej.calls] == [10.0, 20.0, 30.0, 35.0, 35.0]
    assert h.ejections == 5


def test_multiplier_decays_while_available() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config())
    det_ej = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    fail(det, h, clock, pop, times=3)  # 10 s
    clock.now = h.ejected_until
    fail(det, h, clock, pop, times=3)  # 20 s
    clock.now = h.ejected_until
    assert h.ejections == 2
    # One base_ejection_time available (and a bit): one step down.
    clock.advance(14.0)
    det.record(h, Outcome.SUCCESS, clock(), pop)
    assert h.ejections == 1
    # The 4 s already served count toward the next step.
    clock.advance(6.0)
    det.record(h, Outcome.SUCCESS, clock(), pop)
    assert h.ejections == 0
    fail(det_ej, h, clock, pop, times=3)
    assert ej.calls == [(h.key, 10.0)]


def test_multiplier_decay_stops_at_zero_and_applies_at_ejection() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    for _ in range(3):
        fail(det, h, clock, pop, times=3)
        clock.now = h.ejected_until
    assert h.ejections == 3
    # Long healthy: decays all the way down, computed by the failing record itself.
    clock.advance(1000.0)
    fail(det, h, clock, pop, times=3)
    assert ej.calls[-1] == (h.key, 10.0)
    assert h.ejections == 1


def test_max_ejection_percent_50_of_3_ejects_one() -> None:
    clock = FakeClock()
    det = OutlierDetector(config(max_ejection_percent=50))
    pop = pool(3)
    assert fail(det, pop[0], clock, pop, times=3)[-1] is True
    assert fail(det, pop[1], clock, pop, times=3) == [False, False, False]
    assert fail(det, pop[2], clock, pop, times=5) == [False] * 5
    assert [h.available(clock()) for h in pop] == [False, True, True]
    # The refused ejection is tried again once there is room.
    clock.now = pop[0].ejected_until
    assert det.record(pop[1], Outcome.HTTP_5XX, clock(), pop) is True
    assert [h.available(clock()) for h in pop] == [True, False, True]


def test_max_ejection_percent_67_of_3_ejects_two() -> None:
    clock = FakeClock()
    det = OutlierDetector(config(max_ejection_percent=67))
    pop = pool(3)
    assert fail(det, pop[0], clock, pop, times=3)[-1] is True
    assert fail(det, pop[1], clock, pop, times=3)[-1] is True
    assert not any(fail(det, pop[2], clock, pop, times=5))
    assert [h.available(clock()) for h in pop] == [False, False, True]


def test_single_target_never_ejected_at_50_percent() -> None:
    clock = FakeClock()
    det = OutlierDetector(config(max_ejection_percent=50))
    pop = pool(1)
    assert not any(fail(det, pop[0], clock, pop, Outcome.CONNECT_FAILURE, times=20))
    assert pop[0].available(clock())


def test_allowed_ejected_rule() -> None:
    assert allowed_ejected(3, 50) == 1
    assert allowed_ejected(3, 67) == 2
    assert allowed_ejected(1, 50) == 0
    assert allowed_ejected(1, 100) == 1
    assert allowed_ejected(2, 10) == 1
    assert allowed_ejected(5, 0) == 0
    assert allowed_ejected(10, 50) == 5


def test_outcomes_while_ejected_are_ignored() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(config(), on_eject=ej)
    pop = pool(2)
    h = pop[0]
    fail(det, h, clock, pop, times=3)
    until = h.ejected_until
    # Late answers of requests sent before the ejection.
    assert not any(fail(det, h, clock, pop, Outcome.TIMEOUT, times=10))
    assert h.ejected_until == until and len(ej.calls) == 1
    assert h.consecutive_5xx == 0 and h.consecutive_failures == 0


def test_passive_off_does_nothing() -> None:
    clock, ej = FakeClock(), Ejections()
    det = OutlierDetector(None, on_eject=ej)
    pop = pool(2)
    assert not any(fail(det, pop[0], clock, pop, Outcome.HTTP_5XX, times=20))
    assert not any(fail(det, pop[0], clock, pop, Outcome.TIMEOUT, times=20))
    assert pop[0].available(clock())
    assert pop[0].consecutive_5xx == 0 and ej.calls == []


def test_reconfigure_swaps_thresholds_and_can_turn_off() -> None:
    clock = FakeClock()
    det = OutlierDetector(None)
    pop = pool(2)
    assert not any(fail(det, pop[0], clock, pop, times=5))
    det.reconfigure(config(consecutive_5xx=1))
    assert det.record(pop[0], Outcome.HTTP_5XX, clock(), pop) is True
    det.reconfigure(None)
    assert not any(fail(det, pop[1], clock, pop, times=5))
    # An ejection in progress keeps its end.
    assert not pop[0].available(clock())


def test_available_needs_active_health_too() -> None:
    h = TargetHealth("10.0.0.1:80")
    assert h.available(0.0)
    h.active_healthy = False
    assert not h.available(0.0)


def test_describe_is_json() -> None:
    clock = FakeClock()
    det = OutlierDetector(config())
    pop = pool(2)
    h = pop[0]
    fail(det, h, clock, pop, times=3)
    clock.advance(4.0)
    d = h.describe(clock())
    json.dumps(d)
    assert d["healthy"] is False and d["ejected"] is True
    assert d["ejected_for_seconds"] == 6.0 and d["ejections"] == 1
    clock.advance(6.0)
    d = h.describe(clock())
    assert d["healthy"] is True and d["ejected"] is False and d["ejected_for_seconds"] == 0.0

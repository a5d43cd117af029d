"""Per-target health: passive outlier detection from real traffic (Envoy's semantics).

A `TargetHealth` is the one record of a target's state; the cluster owns it, the
passive `OutlierDetector` and the active checker (active_check.py) both write it,
and the balancer asks `available(now)`. Time is always passed in (monotonic
seconds) so that every rule here is tested with a fake clock.

Decisions worth knowing:

* Gateway failures (CONNECT_FAILURE, TIMEOUT) count toward `consecutive_failures`
  AND `consecutive_5xx`: Envoy's default (split_external_local_origin_errors off)
  maps a local-origin failure onto a 503/504 and counts it as a 5xx. So a target
  alternating 500s and timeouts is still ejected after `consecutive_5xx` bad
  attempts, and `consecutive_failures: 0` alone does not stop failures from
  ejecting (set both to 0 for that). Only SUCCESS resets the counters.
* An ejection refused by max_ejection_percent keeps the counters: the next bad
  outcome tries again, and succeeds once another target has returned.
* Outcomes of a target that is ejected are ignored: they are requests that left
  before the ejection, and must neither re-eject it nor pre-load its counters.
* The ejection multiplier (`ejections`) decays lazily: each `base_ejection_time`
  spent available since `decay_from` (the end of the last ejection, or the moment
  an active check cleared it) lowers it by one. It is settled on each record()
  call, so `describe()` may show a value that the next outcome will lower.
* Only passive ejections count toward max_ejection_percent (as in Envoy): a target
  an active check marked unhealthy is not "ejected".
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tollway.config.upstream_schema import PassiveHealthCheck


class Outcome(enum.Enum):
    SUCCESS = "success"  # any response not counted as failure
    HTTP_5XX = "http_5xx"  # the upstream answered a 5xx
    CONNECT_FAILURE = "connect_failure"  # refused, reset, closed before a response
    TIMEOUT = "timeout"  # connect/read/write timeout


@dataclass(slots=True, eq=False)
class TargetHealth:
    key: str  # the target's "host:port"
    active_healthy: bool = True  # targets start healthy (route at once; Kong's default)
    ejected_until: float = 0.0  # monotonic seconds; ejected while now < ejected_until
    ejections: int = 0  # the ejection multiplier (decays, see the module doc)
    # Where the multiplier's decay is counted from (monotonic seconds).
    decay_from: float = 0.0
    # Passive counters.
    consecutive_5xx: int = 0
    consecutive_failures: int = 0
    # Active counters and the last probe's result ("200", "timeout", ...).
    active_successes: int = 0
    active_failures: int = 0
    last_check: str | None = None
    last_check_ok: bool | None = None

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def available(self, now: float) -> bool:
        return self.active_healthy and now >= self.ejected_until

    def clear_ejection(self, now: float) -> None:
        """End a passive ejection early (a passing active check): decay starts now."""
        if self.ejected(now):
            self.ejected_until = 0.0
            self.decay_from = now

    def describe(self, now: float) -> dict[str, Any]:
        ejected = self.ejected(now)
        return {
            "healthy": self.available(now),
            "active_healthy": self.active_healthy,
            "ejected": ejected,
            "ejected_for_seconds": round(self.ejected_until - now, 3) if ejected else 0.0,
            "ejections": self.ejections,
            "consecutive_5xx": self.consecutive_5xx,
            "consecutive_failures": self.consecutive_failures,
            "last_check": self.last_check,
            "last_check_ok": self.last_check_ok,
        }


def allowed_ejected(population: int, percent: int) -> int:
    """How many of `population` targets may be ejected at once.

    Rounded down, but a service of two or more may always lose one (Envoy's rule;
    otherwise 50 % of three would let a dead target take a third of the traffic).
    """
    floor = population * percent // 100
    return max(floor, 1 if population >= 2 and percent > 0 else 0)


class OutlierDetector:
    def __init__(
        self,
        config: PassiveHealthCheck | None,
        on_eject: Callable[[TargetHealth, float], None] | None = None,
    ) -> None:
        self._config = config
        self._on_eject = on_eject

    def reconfigure(self, config: PassiveHealthCheck | None) -> None:
        # Ejections in progress keep their end time; the new thresholds apply from
        # the next outcome.
        self._config = config

    def record(
        self,
        health: TargetHealth,
        outcome: Outcome,
        now: float,
        population: Sequence[TargetHealth],
    ) -> bool:
        """Count one attempt's outcome; True when this call ejected the target.

        `population` is every target of the service, this one included.
        """
        config = self._config
        if config is None or health.ejected(now):
            return False
        self._decay(health, config, now)
        if outcome is Outcome.SUCCESS:
            health.consecutive_5xx = 0
            health.consecutive_failures = 0
            return False
        health.consecutive_5xx += 1
        if outcome is not Outcome.HTTP_5XX:
            health.consecutive_failures += 1
        tripped = (
            0 < config.consecutive_5xx <= health.consecutive_5xx
            or 0 < config.consecutive_failures <= health.consecutive_failures
        )
        if not tripped:
            return False
        ejected_now = sum(1 for h in population if h is not health and h.ejected(now))
        if ejected_now + 1 > allowed_ejected(len(population), config.max_ejection_percent):
            return False
        self._eject(health, config, now)
        return True

    @staticmethod
    def _decay(health: TargetHealth, config: PassiveHealthCheck, now: float) -> None:
        if health.ejections == 0 or config.base_ejection_time <= 0:
            return
        steps = math.floor((now - health.decay_from) / config.base_ejection_time)
        if steps <= 0:
            return
        if steps >= health.ejections:
            health.ejections = 0
        else:
            health.ejections -= steps
            # Keep the partial interval already served toward the next step.
            health.decay_from += steps * config.base_ejection_time

    def _eject(self, health: TargetHealth, config: PassiveHealthCheck, now: float) -> None:
        seconds = min(config.base_ejection_time * (health.ejections + 1), config.max_ejection_time)
        health.ejections += 1
        health.ejected_until = now + seconds
        health.decay_from = health.ejected_until
        health.consecutive_5xx = 0
        health.consecutive_failures = 0
        # A passing active check must see healthy_threshold fresh successes after the
        # ejection before it clears it (active_check.py).
        health.active_successes = 0
        if self._on_eject is not None:
            self._on_eject(health, seconds)

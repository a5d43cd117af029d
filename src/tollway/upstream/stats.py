"""Per-target upstream counters, as plain ints on the request path.

The exchange and the clusters bump these dicts; observability/upstream_metrics.py
moves what changed into Prometheus about once a second (the limiter's habit: a
`labels().inc()` costs microseconds, a dict bump a tenth of that).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tollway.upstream.health import Outcome

# Upper bounds in seconds of the per-target latency histogram (time to response head).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class UpstreamStats:
    __slots__ = (
        "attempts",
        "breaker_transitions",
        "budget_exhausted",
        "ejections",
        "health_flips",
        "latency",
        "retries",
    )

    def __init__(self) -> None:
        # (service, target, outcome) -> attempts ended so
        self.attempts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (service, target) -> [count per bucket..., +Inf count, sum]
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.ejections: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (service, target or "", new state) -> transitions
        self.breaker_transitions: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (service, target, "healthy" | "unhealthy") -> active-check flips
        self.health_flips: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (service, reason) -> retries sent
        self.retries: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.budget_exhausted: defaultdict[str, int] = defaultdict(int)

    def attempt(self, service: str, target: str, outcome: Outcome) -> None:
        self.attempts[service, target, outcome.value] += 1

    def latency_slots(self, service: str, target: str) -> list[float]:
        """The histogram of one target, made on first use (a Host keeps a reference)."""
        slots = self.latency.get((service, target))
        if slots is None:
            slots = self.latency[service, target] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        return slots

    def observe(self, service: str, target: str, seconds: float) -> None:
        slots = self.latency_slots(service, target)
        slots[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        slots[-1] += seconds

    def ejection(self, service: str, target: str) -> None:
        self.ejections[service, target] += 1

    def breaker_transition(self, service: str, target: str, state: str) -> None:
        self.breaker_transitions[service, target, state] += 1

    def health_flip(self, service: str, target: str, healthy: bool) -> None:
        self.health_flips[service, target, "healthy" if healthy else "unhealthy"] += 1

    def retry(self, service: str, reason: str) -> None:
        self.retries[service, reason] += 1

    def exhausted(self, service: str) -> None:
        self.budget_exhausted[service] += 1

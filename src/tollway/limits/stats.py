"""What the limiter did, counted as plain ints for the metrics flusher.

The hot path bumps dict entries only; `GatewayMetrics` reads the cumulative
counts on its timer and exports what changed (prometheus_client calls cost
microseconds each, and mmap writes with --workers).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

# Limiter latency buckets (seconds): a memory check takes microseconds, a Redis one
# a fraction of a millisecond on loopback; the top buckets catch a sick Redis.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip


class LimitStats:
    """Cumulative counters of one process's limiter."""

    def __init__(self) -> None:
        # (route, window, outcome "allowed" | "refused") -> count
        self.decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        # (store, what) -> count: ("redis", "error"), ("redis", "breaker_open"),
        # ("redis", "fail_open"), ("redis", "fail_closed"), ("redis", "degraded")
        self.store_events: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (store,) -> [count per bucket..., +Inf count, sum]
        self.latency: dict[str, list[float]] = {}

    def decided(self, route: str, window: str, allowed: bool) -> None:
        self.decisions[(route, window, "allowed" if allowed else "refused")] += 1

    def store_event(self, store: str, what: str) -> None:
        self.store_events[(store, what)] += 1

    def observe(self, store: str, seconds: float) -> None:
        slots = self.latency.get(store)
        if slots is None:
            slots = self.latency[store] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        slots[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        slots[-1] += seconds

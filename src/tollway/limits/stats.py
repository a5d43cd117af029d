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


class DecisionCount:
    """Allowed and refused checks of one route's window."""

    def __init__(self) -> None:
        self.allowed = 0
        self.refused = 0


class LimitStats:
    """Cumulative counters of one process's limiter."""

    def __init__(self) -> None:
        # route -> window -> counts: two lookups by string (their hashes are kept),
        # where a (route, window, outcome) key would be built and hashed per request.
        self._decisions: dict[str, dict[str, DecisionCount]] = {}
        # (store, what) -> count: ("redis", "error"), ("redis", "breaker_open"),
        # ("redis", "fail_open"), ("redis", "fail_closed"), ("redis", "degraded"),
        # ("memory", "evicted": counters dropped from a full table)
        self.store_events: defaultdict[tuple[str, str], int] = defaultdict(int)
        # (store,) -> [count per bucket..., +Inf count, sum]
        self.latency: dict[str, list[float]] = {}

    @property
    def decisions(self) -> dict[tuple[str, str, str], int]:
        """(route, window, outcome "allowed" | "refused") -> count, for the metrics."""
        out: dict[tuple[str, str, str], int] = {}
        for route, windows in list(self._decisions.items()):
            for window, count in list(windows.items()):
                if count.allowed:
                    out[(route, window, "allowed")] = count.allowed
                if count.refused:
                    out[(route, window, "refused")] = count.refused
        return out

    def decided(self, route: str, window: str, allowed: bool) -> None:
        windows = self._decisions.get(route)
        if windows is None:
            windows = self._decisions[route] = {}
        count = windows.get(window)
        if count is None:
            count = windows[window] = DecisionCount()
        if allowed:
            count.allowed += 1
        else:
            count.refused += 1

    def store_event(self, store: str, what: str, count: int = 1) -> None:
        self.store_events[(store, what)] += count

    def observe(self, store: str, seconds: float) -> None:
        slots = self.latency.get(store)
        if slots is None:
            slots = self.latency[store] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        slots[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        slots[-1] += seconds

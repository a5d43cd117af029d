"""Upstream metrics per service and target, exported from the clusters' plain counters.

`UpstreamStats` (upstream/stats.py) is bumped on the request path; `flush()`, called
by `GatewayMetrics.flush` about once a second, adds what changed since the last call:

    tollway_upstream_attempts_total{service,target,outcome}    attempts by how they ended
        (success, http_5xx, connect_failure, timeout)
    tollway_upstream_latency_seconds{service,target}           time to the response head
    tollway_upstream_ejections_total{service,target}           outlier ejections
    tollway_upstream_health_changes_total{service,target,state} active-check flips
    tollway_upstream_breaker_transitions_total{service,target,state}  (target "" = service)
    tollway_upstream_retries_total{service,reason}             retries sent
    tollway_upstream_retry_budget_exhausted_total{service}     retries the budget refused

Built lazily, and again when metrics.setup_multiprocess switched prometheus_client's
value class (with `--workers N` /metrics sums the workers' files).
"""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

from tollway.observability.families import PerValueClass
from tollway.observability.metrics import add_observations
from tollway.upstream.stats import LATENCY_BUCKETS, UpstreamStats


class _Families:
    def __init__(self) -> None:
        labels = ("service", "target")
        self.attempts = Counter(
            "tollway_upstream_attempts", "Upstream attempts by outcome", (*labels, "outcome")
        )
        self.latency = Histogram(
            "tollway_upstream_latency_seconds",
            "Time from sending a request to the target to its response head",
            labels,
            buckets=LATENCY_BUCKETS,
        )
        self.ejections = Counter(
            "tollway_upstream_ejections", "Targets ejected by outlier detection", labels
        )
        self.health = Counter(
            "tollway_upstream_health_changes",
            "Targets turned healthy or unhealthy by active checks",
            (*labels, "state"),
        )
        self.breaker = Counter(
            "tollway_upstream_breaker_transitions",
            "Circuit breaker transitions (target empty: the service breaker)",
            (*labels, "state"),
        )
        self.retries = Counter(
            "tollway_upstream_retries", "Retries sent, by reason", ("service", "reason")
        )
        self.exhausted = Counter(
            "tollway_upstream_retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent",
            ("service",),
        )
        self.all = (
            self.attempts, self.latency, self.ejections, self.health, self.breaker,
            self.retries, self.exhausted,
        )


_families = PerValueClass(_Families)


K = TypeVar("K")


def _deltas(current: dict[K, int], seen: dict[K, int]) -> list[tuple[K, int]]:
    out = []
    for key, count in list(current.items()):
        delta = count - seen.get(key, 0)
        if delta > 0:
            seen[key] = count
            out.append((key, delta))
    return out


class UpstreamMetrics:
    """Exports one process's UpstreamStats at each metrics flush."""

    def __init__(self, stats: UpstreamStats) -> None:
        self._stats = stats
        self._seen: dict[str, dict[Any, int]] = {}
        self._seen_latency: dict[tuple[str, str], list[float]] = {}

    def flush(self) -> None:
        stats = self._stats
        fam = _families.get()
        seen = self._seen
        for key, n in _deltas(stats.attempts, seen.setdefault("attempts", {})):
            fam.attempts.labels(*key).inc(n)
        for key2, n in _deltas(stats.ejections, seen.setdefault("ejections", {})):
            fam.ejections.labels(*key2).inc(n)
        for key, n in _deltas(stats.health_flips, seen.setdefault("health", {})):
            fam.health.labels(*key).inc(n)
        for key, n in _deltas(stats.breaker_transitions, seen.setdefault("breaker", {})):
            fam.breaker.labels(*key).inc(n)
        for key2, n in _deltas(stats.retries, seen.setdefault("retries", {})):
            fam.retries.labels(*key2).inc(n)
        for service, n in _deltas(stats.budget_exhausted, seen.setdefault("exhausted", {})):
            fam.exhausted.labels(service).inc(n)
        self._flush_latency(fam)

    def _flush_latency(self, fam: _Families) -> None:
        for key, slots in list(self._stats.latency.items()):
            before = self._seen_latency.get(key)
            if before == slots:
                continue
            delta = [now - then for now, then in zip(slots, before or [0.0] * len(slots),
                                                     strict=True)]
            self._seen_latency[key] = list(slots)
            add_observations(fam.latency.labels(*key), delta)

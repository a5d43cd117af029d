"""Abuse-detection metrics: the ban store's plain counters, exported on a timer.

The store (limits/bans.py) counts in plain ints on the request path; `flush()`,
called by `GatewayMetrics.flush` about once a second, adds what changed since the
previous call to prometheus_client counters, as the usage counters are:

    tollway_abuse_bans_total{kind}            bans this process issued (automatic or manual)
    tollway_abuse_blocked_total{kind}         requests refused because their source is banned
    tollway_abuse_store_errors_total          failed calls to the shared ban store (Redis)
    tollway_abuse_failures_dropped_total      failures left uncounted (queue full, store down)

With `--workers N` the counters live in prometheus_client's multiprocess files and
/metrics sums them. They are built on first flush, and again when
`metrics.setup_multiprocess` has switched prometheus_client's value class since
(the same reason metrics.py builds its families lazily).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import Counter

from tollway.observability.families import PerValueClass


class _Families:
    def __init__(self) -> None:
        self.bans = Counter(
            "tollway_abuse_bans", "Bans issued by this process (automatic or manual)", ("kind",)
        )
        self.blocked = Counter(
            "tollway_abuse_blocked", "Requests refused because their source is banned", ("kind",)
        )
        self.store_errors = Counter(
            "tollway_abuse_store_errors", "Failed calls to the shared ban store"
        )
        self.dropped = Counter(
            "tollway_abuse_failures_dropped",
            "Failed requests not counted: queue full, or the shared store down",
        )
        self.all = (self.bans, self.blocked, self.store_errors, self.dropped)


_families = PerValueClass(_Families)


class AbuseMetrics:
    """Exports one ban store's counters (`BanStore.counters`) at each flush."""

    def __init__(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._source = source
        self._seen: dict[str, int] = {}

    def flush(self) -> None:
        stats = self._source()
        fam: _Families | None = None
        for name, count in stats.items():
            delta = count - self._seen.get(name, 0)
            self._seen[name] = count
            if delta <= 0:
                continue
            fam = fam or _families.get()
            what, _, kind = name.partition(":")
            if what == "bans":
                fam.bans.labels(kind).inc(delta)
            elif what == "blocked":
                fam.blocked.labels(kind).inc(delta)
            elif what == "store_errors":
                fam.store_errors.inc(delta)
            elif what == "dropped":
                fam.dropped.inc(delta)

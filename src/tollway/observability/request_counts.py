"""The counters every proxied request adds to, compiled with mypyc.

`GatewayMetrics` (metrics.py) owns one `RequestCounts` and moves it into
prometheus_client at each flush; the data plane calls `request()` once per
request, in native code rather than through an interpreted method.
"""

from __future__ import annotations

from bisect import bisect_left

# Generation calls take minutes, so the buckets reach 5 min; proxied API calls
# still get millisecond resolution at the low end.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip

# One slot per finite bound, one for +Inf, and the last slot holds the sum.
HIST_SLOTS = len(LATENCY_BUCKETS) + 2
SUM = -1


def new_hist() -> list[float]:
    return [0.0] * HIST_SLOTS


class RequestCounts:
    """Requests by (route, service, status) and latency histograms since a flush."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.route_hist: dict[str, list[float]] = {}
        self.upstream_hist: dict[str, list[float]] = {}

    def request(
        self,
        route: str,
        service: str,
        status: int,
        seconds: float,
        upstream_seconds: float | None,
    ) -> None:
        key = (route, service, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.route_hist.get(route)
        if hist is None:
            hist = self.route_hist[route] = new_hist()
        hist[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[SUM] += seconds
        if upstream_seconds is not None:
            hist = self.upstream_hist.get(service)
            if hist is None:
                hist = self.upstream_hist[service] = new_hist()
            hist[bisect_left(LATENCY_BUCKETS, upstream_seconds)] += 1
            hist[SUM] += upstream_seconds

"""The pieces of the retry policy: which methods may go again, how long to wait,
and a budget that stops retries from multiplying an outage.

The budget is Finagle's and Linkerd's: retries within the last `window` seconds
may reach `ratio` times the first attempts of that window, plus
`min_per_second * window` so that a quiet service still retries. Under a storm of
failures the retries then add at most `ratio` to the load instead of multiplying
it by the attempts. Time is the monotonic `now` the caller passes.
"""

from __future__ import annotations

import random
from typing import Any

from tollway.upstream.circuit import RollingCounts

# Idempotent methods of RFC 9110 §9.2.2: sending one twice has the effect of once.
# Method names are case-sensitive (RFC 9110 §9.1): "get" is not GET.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# 2 ** 64 times any base is beyond every cap; the float product must not overflow.
_MAX_EXPONENT = 64
# Float slack of the budget's comparison: 0.29 * 100 is 28.999999999999996.
_EPSILON = 1e-9


def may_retry_method(method: str, has_idempotency_key: bool, non_idempotent: bool) -> bool:
    """May a request with this method be sent again after it may have reached the
    upstream? Idempotent methods may; others only with an Idempotency-Key (the
    upstream deduplicates) or when the service says so (`non_idempotent`)."""
    return method in IDEMPOTENT_METHODS or has_idempotency_key or non_idempotent


def backoff_delay(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry number `retry` (1 for the first retry).

    Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): uniform
    in [0, min(cap, base * 2 ** (retry - 1))], so clients that failed together do
    not retry together.
    """
    if retry < 1:
        raise ValueError("retry counts from 1")
    bound = min(cap, base * 2 ** min(retry - 1, _MAX_EXPONENT))
    if bound <= 0:
        return 0.0
    return rng.uniform(0.0, bound)


_REQUESTS, _RETRIES = 0, 1


class RetryBudget:
    """How many retries the recent traffic affords; see the module docstring.

    `exhausted` counts the retries refused, for the metrics; it never resets.
    """

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        self._check(ratio, min_per_second, window)
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._counts = RollingCounts(window, fields=2)
        self.exhausted = 0
        # First attempts counted but not yet in the window (see record_request).
        self.pending = 0

    @property
    def window(self) -> float:
        return self._counts.window

    def fold(self, now: float) -> None:
        """Move the requests counted in `pending` into the window, as of `now`."""
        if self.pending:
            count, self.pending = self.pending, 0
            self._counts.add(now, _REQUESTS, count)

    def record_request(self, now: float) -> None:
        """A first attempt (retries are counted by try_spend, not here).

        The data plane's hot path does `budget.pending += 1` instead, and its
        sweeper calls fold() a few times a second: the same count, without a
        window update per request."""
        self._counts.add(now, _REQUESTS)

    def try_spend(self, now: float) -> bool:
        """True, counting one retry, when the budget affords one more; else False,
        counting one exhaustion."""
        self.fold(now)
        requests, retries = self._counts.counts(now)
        if retries + 1 <= self._allowed(requests) + _EPSILON:
            self._counts.add(now, _RETRIES)
            return True
        self.exhausted += 1
        return False

    def reconfigure(self, ratio: float, min_per_second: float, window: float) -> None:
        """New settings; the counts are kept unless the window changed (then its
        buckets no longer fit and it starts empty)."""
        self._check(ratio, min_per_second, window)
        self.ratio = ratio
        self.min_per_second = min_per_second
        if window != self._counts.window:
            self._counts = RollingCounts(window, fields=2)

    def describe(self, now: float) -> dict[str, Any]:
        self.fold(now)
        requests, retries = self._counts.counts(now)
        return {
            "requests": requests,
            "retries": retries,
            "allowed_retries": int(self._allowed(requests) + _EPSILON),
            "exhausted": self.exhausted,
            "window_seconds": self._counts.window,
        }

    def _allowed(self, requests: int) -> float:
        return self.ratio * requests + self.min_per_second * self._counts.window

    @staticmethod
    def _check(ratio: float, min_per_second: float, window: float) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ValueError("ratio and min_per_second must not be negative")
        # A window of 0 is allowed (the config's Duration allows it): no retries.
        if not window >= 0:
            raise ValueError("window must not be negative")

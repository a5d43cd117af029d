"""StoreBreaker: stop asking a limit store that keeps failing, then probe it.

closed     every call goes through; `failure_threshold` consecutive failures open it.
open       allow() is False for `open_seconds` (fail fast: no timeout per request).
half_open  after that, allow() lets exactly one probe through at a time; its
           success() closes the breaker, its failure() opens it again.

Pure bookkeeping on an injected clock: no I/O, no lock (one event loop). A
success or failure reported while open is the late answer of a call allowed
earlier: it neither closes nor prolongs the open period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


class StoreBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        open_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if open_seconds <= 0:
            raise ValueError("open_seconds must be > 0")
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self._clock = clock
        self._failures = 0  # consecutive, while closed
        self._opened_at: float | None = None  # None: closed
        # When the half-open probe was let through; None: no probe in flight.
        self._probe_since: float | None = None
        self.opened = 0  # times the breaker opened (for metrics)

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.open_seconds:
            return "open"
        return "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """May a call go to the store now? In half_open, True for the one probe."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        # A probe whose caller never reported (cancelled) would block the breaker
        # forever: after open_seconds without an answer another probe may go.
        if self._probe_since is not None and now - self._probe_since < self.open_seconds:
            return False
        self._probe_since = now
        return True

    def success(self) -> None:
        state = self.state
        if state == "open":
            return
        self._failures = 0
        self._opened_at = None
        self._probe_since = None

    def failure(self) -> None:
        state = self.state
        if state == "open":
            return
        if state == "half_open":
            self._open()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probe_since = None
        self._failures = 0
        self.opened += 1

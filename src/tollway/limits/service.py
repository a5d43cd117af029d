"""The process's limiter: the memory store, or Redis behind a breaker.

One per process (in the Runtime), so that counters outlive config reloads, which
rebuild every plugin. Without Redis every check is the memory store's, synchronous
and exact within the process. With Redis the shared store decides, one round trip
per request; the breaker turns a dead Redis into an immediate LimiterUnavailable
after a few failures, so that a request never waits on it for longer than one
socket timeout while it is down. What a caller does then (allow, refuse, or count
locally with a share of each limit) is the caller's choice: the plugin's
`on_store_error`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from tollway.limits.breaker import StoreBreaker
from tollway.limits.concurrency import Concurrency
from tollway.limits.decision import Decision
from tollway.limits.errors import LimiterUnavailable
from tollway.limits.gcra import Gcra
from tollway.limits.memory import Charge, Lease, LimitResult, MemoryLimiter
from tollway.limits.multi import Limit
from tollway.limits.stats import LimitStats

if TYPE_CHECKING:  # redis-py is imported only where Redis is configured
    from tollway.limits.redis_store import RedisLease, RedisLimiter, SentCheck


def scaled(limit: Limit, share: float) -> Limit:
    """`limit` cut to `share` of its allowance (never below 1): one node's part of a
    limit that Redis would have shared between all of them."""
    if share >= 1.0:
        return limit
    if isinstance(limit, Gcra):
        burst = None if limit.burst is None else max(1, math.floor(limit.burst * share))
        return replace(limit, limit=max(1, math.floor(limit.limit * share)), burst=burst)
    return replace(limit, limit=max(1, math.floor(limit.limit * share)))


class LimitService:
    def __init__(
        self,
        memory: MemoryLimiter,
        redis: RedisLimiter | None = None,
        breaker: StoreBreaker | None = None,
        stats: LimitStats | None = None,
    ) -> None:
        self.memory = memory
        self.redis = redis
        self.breaker = breaker or StoreBreaker()
        self.stats = stats or LimitStats()
        memory.stats = self.stats
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def shared(self) -> bool:
        """True when checks go to Redis (and must be awaited)."""
        return self.redis is not None

    def store_ready(self) -> bool:
        """False while the breaker says Redis is down: callers skip the await."""
        if self.breaker.allow():
            return True
        self.stats.store_event("redis", "breaker_open")
        return False

    async def check_shared(
        self, key: Sequence[str], limits: Sequence[Limit], costs: Sequence[int]
    ) -> LimitResult:
        """Check in Redis; LimiterUnavailable when it fails (the breaker counts it).

        Call only after store_ready() said True (it may have let this call through
        as the half-open probe).
        """
        redis = self.redis
        assert redis is not None
        started = time.perf_counter()
        try:
            result = await redis.check(key, limits, costs)
        except LimiterUnavailable:
            self.breaker.failure()
            self.stats.store_event("redis", "error")
            raise
        self.breaker.success()
        self.stats.observe("redis", time.perf_counter() - started)
        return result

    def send_check(
        self, key: tuple[str, ...], limits: tuple[Limit, ...], costs: tuple[int, ...]
    ) -> SentCheck | None:
        """check_shared() without a coroutine: the check is sent now; None when no
        Redis connection is open yet (call check_shared). Call only after
        store_ready() said True; then sent_result() once its future is done."""
        redis = self.redis
        assert redis is not None
        return redis.send_check(key, limits, costs)

    def sent_result(self, sent: SentCheck) -> LimitResult | None:
        """The decision of a sent check, counted like check_shared's (breaker,
        latency); LimiterUnavailable when Redis failed; None when Redis did not
        know the script (nothing ran: check_shared loads it and checks again)."""
        try:
            result = sent.result()
        except LimiterUnavailable:
            self.breaker.failure()
            self.stats.store_event("redis", "error")
            raise
        if result is not None:
            self.breaker.success()
            self.stats.observe("redis", time.perf_counter() - sent.started)
        return result

    async def acquire_shared(
        self, key: Sequence[str], limit: Concurrency, lease_ttl: float
    ) -> tuple[Decision, RedisLease | None]:
        """A concurrency slot in Redis; LimiterUnavailable when it fails. Call only
        after store_ready() said True."""
        redis = self.redis
        assert redis is not None
        try:
            result = await redis.acquire(key, limit, lease_ttl=lease_ttl)
        except LimiterUnavailable:
            self.breaker.failure()
            self.stats.store_event("redis", "error")
            raise
        self.breaker.success()
        return result

    def release(self, lease: Lease | RedisLease) -> None:
        """Give a concurrency slot back; a Redis release runs in the background (if
        it fails, the lease expires by itself after its ttl)."""
        if isinstance(lease, Lease):
            lease.release()
            return
        self._background(self._release_shared(lease))

    async def _release_shared(self, lease: RedisLease) -> None:
        try:
            await lease.release()
        except LimiterUnavailable:
            self.stats.store_event("redis", "error")

    def refund(self, charge: Charge, shared: bool) -> None:
        """Give back what `charge` consumed; a Redis refund runs in the background
        (a failure to refund only leaves the count a little high)."""
        if not shared:
            self.memory.refund(charge)
            return
        self._background(self._refund_shared(charge))

    def _background(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refund_shared(self, charge: Charge) -> None:
        redis = self.redis
        if redis is None or not self.breaker.allow():
            return
        try:
            await redis.refund(charge)
        except LimiterUnavailable:
            self.breaker.failure()
            self.stats.store_event("redis", "error")
        else:
            self.breaker.success()

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self.redis is not None:
            await self.redis.aclose()

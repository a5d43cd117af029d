"""A service's targets with their live state: Envoy's cluster, one per service per process.

A cluster outlives config snapshots (like the connection pools): a reload that keeps
a service keeps what its cluster learned (ejections, open breakers, the retry budget).
It holds

- the hosts: the union of the service's target sources (the config file or its
  environment override, DNS, admin registrations), each with its health record,
  its breaker and its in-flight count;
- the balancer, built over the hosts available right now and rebuilt only when that
  set changes (a health flip, an ejection, a breaker opening), or when a time-driven
  change is due (an ejection or an open circuit ending): `recheck_at` says when, so
  the hot path reads one float instead of every host's state;
- the service breaker, the retry budget, the outlier detector and the active checker.

Nothing here imports the data plane: the exchange asks `admit` and `pick`, then
reports each attempt's end with `attempt_done` / `attempt_abandoned`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from tollway.config.schema import ServiceConfig
from tollway.upstream.active_check import ActiveChecker
from tollway.upstream.balancers import Balancer, make_balancer
from tollway.upstream.circuit import BreakerState, CircuitBreaker
from tollway.upstream.health import Outcome, OutlierDetector, TargetHealth
from tollway.upstream.retry import RetryBudget
from tollway.upstream.service import Target
from tollway.upstream.stats import LATENCY_BUCKETS, UpstreamStats

log = structlog.get_logger("tollway.upstream")

# Target sources, in the order their weights win when two name one address.
SOURCES = ("config", "dns", "registration")


class Host:
    """One target of a cluster: where it is and what this process knows of it."""

    __slots__ = (
        "active", "breaker", "health", "key", "latency", "ok_key", "sources", "target", "weight",
    )  # fmt: skip

    def __init__(self, target: Target, breaker: CircuitBreaker, stats: UpstreamStats,
                 service: str) -> None:
        self.target = target
        self.key = target.key
        self.weight = target.weight
        # Requests in flight to this target (least_connections and power_of_two read it).
        self.active = 0
        self.health = TargetHealth(target.key)
        self.breaker = breaker
        self.sources: set[str] = set()
        # Made once: the success path bumps these without building a key.
        self.ok_key = (service, target.key, Outcome.SUCCESS.value)
        self.latency = stats.latency_slots(service, target.key)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request cannot go to any target now: the exchange answers it."""

    code: str  # no_healthy_upstream | circuit_open
    retry_after: float = 0.0


class Cluster:
    def __init__(
        self,
        config: ServiceConfig,
        stats: UpstreamStats,
        share: Callable[[str, float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        # The time the paths that have no `now` at hand read; loop.time() is this
        # clock too (CLOCK_MONOTONIC), so both compare.
        self.clock = time.monotonic
        self.stats = stats
        # Publishes an own circuit opening to the other nodes (CircuitShare), if any.
        self._share = share
        self._rng = rng or random.Random()
        self.hosts: dict[str, Host] = {}
        self._population: tuple[TargetHealth, ...] = ()
        self._sources: dict[str, tuple[Target, ...]] = {}
        self.available: tuple[Host, ...] = ()
        self.balancer: Balancer[Host] = make_balancer(config.balancer, (), self._rng)
        # When the available set may change by the clock alone; 0 forces a rebuild.
        self.recheck_at = 0.0
        self.breaker = CircuitBreaker(config.circuit_breaker, config.name, self._transition)
        self.outlier = OutlierDetector(config.healthchecks.passive, self._ejected)
        retries = config.retries
        self.budget = RetryBudget(
            retries.budget_ratio, retries.budget_min_per_second, retries.budget_window
        )
        self.checker: ActiveChecker | None = None
        # Statuses below this need no decision (not a breaker failure, not retried,
        # not a 5xx for outlier detection): they take the short path.
        self.plain_below = _plain_below(config)

    # ---- configuration and target sources ------------------------------------------

    def reconfigure(self, config: ServiceConfig) -> None:
        """A new snapshot's settings for this service; learned state stays."""
        old, self.config = self.config, config
        self.plain_below = _plain_below(config)
        if config.circuit_breaker != old.circuit_breaker:
            self.breaker.reconfigure(config.circuit_breaker)
            for host in self.hosts.values():
                host.breaker.reconfigure(config.circuit_breaker)
        if config.healthchecks.passive != old.healthchecks.passive:
            self.outlier.reconfigure(config.healthchecks.passive)
        r = config.retries
        if r != old.retries:
            self.budget.reconfigure(r.budget_ratio, r.budget_min_per_second, r.budget_window)
        self.recheck_at = 0.0

    def set_targets(self, source: str, targets: Iterable[Target]) -> None:
        """Replace what one source says the targets are; hosts keep their state by key."""
        self._sources[source] = tuple(targets)
        wanted: dict[str, Target] = {}
        origin: dict[str, set[str]] = {}
        for name in SOURCES:
            for target in self._sources.get(name, ()):
                wanted.setdefault(target.key, target)
                origin.setdefault(target.key, set()).add(name)
        hosts: dict[str, Host] = {}
        for key, target in wanted.items():
            host = self.hosts.get(key)
            if host is None or host.target != target:
                fresh = Host(target, self._target_breaker(key), self.stats, self.name)
                if host is not None:  # same address, new weight: keep what was learned
                    fresh.health, fresh.breaker, fresh.active = (
                        host.health, host.breaker, host.active
                    )
                host = fresh
            host.sources = origin[key]
            hosts[key] = host
        if hosts.keys() != self.hosts.keys():
            log.info("upstream targets changed", service=self.name, source=source,
                     targets=sorted(hosts))
        self.hosts = hosts
        # max_ejection_percent is a share of every target of the service.
        self._population = tuple(h.health for h in hosts.values())
        self.recheck_at = 0.0

    def _target_breaker(self, key: str) -> CircuitBreaker:
        return CircuitBreaker(
            self.config.circuit_breaker, f"{self.name}/{key}", self._transition
        )

    def health_targets(self) -> list[tuple[Target, TargetHealth]]:
        """What the active checker probes: every host, available or not."""
        return [(h.target, h.health) for h in self.hosts.values()]

    def health_changed(self, health: TargetHealth, healthy: bool) -> None:
        """The active checker flipped a target."""
        self.stats.health_flip(self.name, health.key, healthy)
        host = self.hosts.get(health.key)
        if healthy and host is not None:
            # A passing check is the evidence an open circuit waits for: it comes
            # back within one interval rather than at the end of its open time.
            host.breaker.probe_now(asyncio.get_running_loop().time())
        log.warning(
            "upstream target healthy" if healthy else "upstream target unhealthy",
            service=self.name, target=health.key, check="active",
        )
        self.recheck_at = 0.0

    # ---- the request path ----------------------------------------------------------

    def admit(self, now: float) -> Refusal | None:
        """The service breaker's say, before any target is picked."""
        breaker = self.breaker
        if breaker.allow(now):
            return None
        return Refusal("circuit_open", max(breaker.retry_after(now), 1.0))

    def pick(
        self, now: float, hash_key: bytes | None = None, exclude: Collection[str] | None = None
    ) -> Host | Refusal:
        if now >= self.recheck_at:
            self._rebuild(now)
        balancer = self.balancer
        host = balancer.pick(hash_key, exclude)
        if host is not None and host.breaker.closed_fast:
            return host  # the common case
        if host is None and exclude:
            # Every other target was tried: another go at one of them beats failing.
            host = balancer.pick(hash_key)
        skipped: set[str] | None = None
        while host is not None:
            if host.breaker.allow(now):
                return host
            # Half-open with its probes all out: the others take this request.
            skipped = skipped or set(exclude or ())
            skipped.add(host.key)
            host = balancer.pick(hash_key, skipped)
        return self._refusal(now)

    def has_available(self, now: float, besides: Collection[str] = ()) -> bool:
        """Whether a retry would find a target now (a breaker may just have opened),
        one not in `besides` when that is given."""
        if now >= self.recheck_at:
            self._rebuild(now)
        if besides:
            return any(h.key not in besides for h in self.available)
        return bool(self.available)

    def succeeded(self, host: Host, seconds: float) -> None:
        """An attempt answered with a status below `plain_below`: the whole request
        succeeded as far as this target and the service breaker are concerned.

        The hot path (once per ordinary request), so it does in one call what
        attempt_done plus request_done would.
        """
        self.stats.attempts[host.ok_key] += 1
        slots = host.latency
        slots[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        slots[-1] += seconds
        health = host.health
        if health.consecutive_5xx or health.consecutive_failures:
            self.outlier.record(health, Outcome.SUCCESS, self.clock(), self._population)
        # A closed breaker takes a success as a count, folded into its window by
        # tick(): record() per request cost more than the rest of this method.
        breaker = host.breaker
        if breaker.closed_fast:
            breaker.pending_ok += 1
            breaker.consecutive = 0
        else:
            breaker.record(True, self.clock())
        breaker = self.breaker
        if breaker.closed_fast:
            breaker.pending_ok += 1
            breaker.consecutive = 0
        else:
            breaker.record(True, self.clock())

    def tick(self, now: float) -> None:
        """A few times a second: counts taken on the hot path join their windows."""
        self.budget.fold(now)
        self.breaker.fold(now)
        for host in self.hosts.values():
            host.breaker.fold(now)

    def attempt_done(
        self, host: Host, now: float, status: int | None, error: Outcome | None = None
    ) -> None:
        """One attempt's result: a response status, or the error that ended it."""
        if error is not None:
            outcome = error
            failed = True
        else:
            assert status is not None
            outcome = Outcome.HTTP_5XX if status >= 500 else Outcome.SUCCESS
            failed = status in self.config.circuit_breaker.failure_statuses
        self.stats.attempt(self.name, host.key, outcome)
        if self.outlier.record(host.health, outcome, now, self._population):
            self.recheck_at = 0.0
        host.breaker.record(not failed, now)

    def attempt_abandoned(self, host: Host, now: float) -> None:
        host.breaker.abandon(now)

    def request_done(self, now: float, failed: bool | None) -> None:
        """The request's final outcome for the service breaker (None: none known)."""
        if failed is None:
            self.breaker.abandon(now)
        else:
            self.breaker.record(not failed, now)

    # ---- internals -----------------------------------------------------------------

    def _rebuild(self, now: float) -> None:
        available: list[Host] = []
        next_change = math.inf
        for host in self.hosts.values():
            health = host.health
            if not health.active_healthy:
                continue  # the checker's next flip resets recheck_at
            if health.ejected_until > now:
                next_change = min(next_change, health.ejected_until)
                continue
            if host.breaker.state(now) is BreakerState.OPEN:
                next_change = min(next_change, now + host.breaker.retry_after(now))
                continue
            available.append(host)
        if tuple(available) != self.available or self.balancer.hosts != tuple(available):
            self.available = tuple(available)
            self.balancer = make_balancer(self.config.balancer, self.available, self._rng)
        self.recheck_at = next_change

    def _refusal(self, now: float) -> Refusal:
        waits = [
            h.breaker.retry_after(now)
            for h in self.hosts.values()
            if h.health.available(now) and h.breaker.state(now) is not BreakerState.CLOSED
        ]
        if waits:
            return Refusal("circuit_open", max(min(waits), 1.0))
        return Refusal("no_healthy_upstream")

    def _ejected(self, health: TargetHealth, seconds: float) -> None:
        self.stats.ejection(self.name, health.key)
        log.warning(
            "upstream target ejected", service=self.name, target=health.key,
            seconds=round(seconds, 3), ejections=health.ejections,
        )
        self.recheck_at = 0.0

    def _transition(
        self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState, now: float
    ) -> None:
        target = breaker.name.partition("/")[2]
        self.stats.breaker_transition(self.name, target, new.value)
        log.warning(
            "circuit breaker", service=self.name, target=target or None,
            old=old.value, new=new.value,
        )
        self.recheck_at = 0.0
        # A peer's opening (force_open) is not sent back out.
        if new is BreakerState.OPEN and self._share is not None and not (
            breaker.last_transition_remote
        ):
            self._share(breaker.name, breaker.retry_after(now))

    def force_open(self, name: str, seconds: float, now: float) -> None:
        """Another node opened `name` (this service's breaker, or one target's)."""
        if name == self.name:
            self.breaker.force_open(seconds, now)
        else:
            host = self.hosts.get(name.partition("/")[2])
            if host is not None:
                host.breaker.force_open(seconds, now)
        self.recheck_at = 0.0

    def describe(self, now: float) -> dict[str, Any]:
        """What /upstreams and /health/detailed show of this service, JSON-able."""
        if now >= self.recheck_at:
            self._rebuild(now)  # no traffic may have brought time-driven changes in
        return {
            "balancer": self.config.balancer,
            "circuit": self.breaker.describe(now),
            "retry_budget": self.budget.describe(now),
            "targets": [
                {
                    "target": h.key,
                    "weight": h.weight,
                    "sources": sorted(h.sources),
                    "available": h in self.available and h.health.available(now),
                    "in_flight": h.active,
                    "health": h.health.describe(now),
                    "circuit": h.breaker.describe(now),
                }
                for h in self.hosts.values()
            ],
        }


def _plain_below(config: ServiceConfig) -> int:
    return min(
        500, *config.circuit_breaker.failure_statuses, *config.retries.on_statuses
    )

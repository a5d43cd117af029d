"""Every cluster of one process, kept across config snapshots, and their background work.

`apply(services)` runs for each new snapshot: it makes a cluster for a new service,
reconfigures a kept one (what it learned stays), binds each snapshot Service to its
cluster, and starts or stops the per-service background work: active health
checks and DNS watchers. Admin registrations (one watcher for the process) and
shared circuit openings (Redis) reach the clusters through here too, so a target
list changes without a reload and without touching in-flight requests (they hold
their Host).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from tollway.upstream.active_check import ActiveChecker
from tollway.upstream.circuit_share import CircuitShare
from tollway.upstream.cluster import Cluster
from tollway.upstream.registrations import RegistrationStore, RegistrationWatcher
from tollway.upstream.service import Service, Target
from tollway.upstream.stats import UpstreamStats

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from tollway.storage.database import Database
    from tollway.upstream.dns_watcher import DnsWatcher

log = structlog.get_logger("tollway.upstream")


class ClusterManager:
    def __init__(
        self, stats: UpstreamStats | None = None, rng: random.Random | None = None
    ) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.stats = stats or UpstreamStats()
        self._rng = rng or random.Random()
        self._checkers: dict[str, ActiveChecker] = {}
        self._dns: dict[str, DnsWatcher] = {}
        # The latest registrations by service, for a service that appears after them.
        self._registered: dict[str, tuple[Target, ...]] = {}
        self.registrations: RegistrationWatcher | None = None
        self.share: CircuitShare | None = None

    async def connect_shared(
        self, database: Database | None, redis: Redis | None, node_id: str
    ) -> None:
        """Admin registrations from the database; circuit openings shared through Redis."""
        if database is not None and self.registrations is None:
            self.registrations = RegistrationWatcher(
                RegistrationStore(database), self.registrations_changed
            )
            self.registrations.start()
        if redis is not None and self.share is None:
            share = CircuitShare(redis, node_id, self.remote_open)
            await share.start()
            self.share = share

    def apply(self, services: Mapping[str, Service]) -> None:
        """Make the clusters match a snapshot's services (called with the loop running)."""
        for name in [n for n in self.clusters if n not in services]:
            self._stop_background(name)
            del self.clusters[name]
        for name, service in services.items():
            config = service.config
            cluster = self.clusters.get(name)
            if cluster is None:
                cluster = self.clusters[name] = Cluster(
                    config, self.stats, self._publish_open, self._rng
                )
            elif cluster.config is not config:
                cluster.reconfigure(config)
            cluster.set_targets("config", service.targets)
            # A reload may turn registration on (the live ones join) or off (they go).
            cluster.set_targets(
                "registration", self._registered.get(name, ()) if config.registration else ()
            )
            service.cluster = cluster
            self._sync_checker(cluster)
            self._sync_dns(cluster, service.from_env)

    def _sync_checker(self, cluster: Cluster) -> None:
        check = cluster.config.healthchecks.active
        checker = self._checkers.get(cluster.name)
        if check is None:
            if checker is not None:
                self._checkers.pop(cluster.name)
                _close_later(checker.aclose())
            return
        if checker is None:
            # The loop's clock: ejections and breakers are timed with it too.
            checker = self._checkers[cluster.name] = ActiveChecker(
                check, cluster.health_targets, cluster.health_changed,
                clock=asyncio.get_running_loop().time,
            )
            checker.start()
        else:
            checker.reconfigure(check)

    def _sync_dns(self, cluster: Cluster, from_env: bool) -> None:
        # An environment override replaces the file's targets, DNS included.
        dns = None if from_env else cluster.config.dns
        watcher = self._dns.get(cluster.name)
        if watcher is not None and (dns is None or watcher.config != dns):
            self._dns.pop(cluster.name)
            _close_later(watcher.aclose())
            watcher = None
            if dns is None:
                cluster.set_targets("dns", ())
        if dns is not None and watcher is None:
            # Imported here: dnspython is loaded only when a service asks for DNS.
            from tollway.upstream.dns_watcher import DnsWatcher

            watcher = self._dns[cluster.name] = DnsWatcher(cluster.name, dns, self._dns_changed)
            watcher.start()

    def _dns_changed(self, service: str, targets: tuple[Target, ...]) -> None:
        cluster = self.clusters.get(service)
        if cluster is not None:
            cluster.set_targets("dns", targets)

    def registrations_changed(self, service: str, targets: tuple[Target, ...]) -> None:
        self._registered[service] = targets
        cluster = self.clusters.get(service)
        if cluster is not None and cluster.config.registration:
            cluster.set_targets("registration", targets)

    def _publish_open(self, name: str, seconds: float) -> None:
        if self.share is not None:
            self.share.publish_open(name, seconds)

    def remote_open(self, name: str, seconds: float) -> None:
        """Another node opened a circuit: `service` or `service/host:port`."""
        cluster = self.clusters.get(name.partition("/")[0])
        if cluster is not None:
            cluster.force_open(name, seconds, asyncio.get_running_loop().time())

    def tick(self, now: float) -> None:
        for cluster in self.clusters.values():
            cluster.tick(now)

    def describe(self, now: float) -> dict[str, Any]:
        return {name: c.describe(now) for name, c in sorted(self.clusters.items())}

    def _stop_background(self, name: str) -> None:
        checker = self._checkers.pop(name, None)
        if checker is not None:
            _close_later(checker.aclose())
        watcher = self._dns.pop(name, None)
        if watcher is not None:
            _close_later(watcher.aclose())

    async def aclose(self) -> None:
        closing = [c.aclose() for c in self._checkers.values()]
        closing += [w.aclose() for w in self._dns.values()]
        self._checkers.clear()
        self._dns.clear()
        if self.registrations is not None:
            closing.append(self.registrations.aclose())
            self.registrations = None
        if self.share is not None:
            closing.append(self.share.aclose())
            self.share = None
        await asyncio.gather(*closing, return_exceptions=True)


_closing: set[asyncio.Task[None]] = set()


def _close_later(coro: Any) -> None:
    # apply() runs from synchronous reload code: the old checker stops in the
    # background, held here so that it is not collected mid-close.
    task = asyncio.get_running_loop().create_task(coro)
    _closing.add(task)
    task.add_done_callback(_closing.discard)

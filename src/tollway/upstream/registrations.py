"""Self-registered targets: a store in the database, and a watcher that reports changes.

A target registers for a service with a TTL and stays live while it heart-beats;
one that stops is dropped when its TTL runs out, without anyone acting. The rows
live in the database (not in a process) so that every worker and node sees the
same registrations, whichever admin API the target talked to.

Times are UTC datetimes from the application clock of whichever process writes or
reads: nodes are expected to run NTP, as a skew of a second or two only shifts an
expiry by as much, while a large one would expire registrations early or late.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm.exc import StaleDataError

from tollway.storage.change_probe import DataVersionProbe
from tollway.storage.database import Database
from tollway.storage.models import UpstreamTarget, utcnow
from tollway.upstream.discovery import TargetsChanged, format_host_port, parse_host_port
from tollway.upstream.service import Target

__all__ = [
    "Registration",
    "RegistrationStore",
    "RegistrationWatcher",
    "canonical_target",
]

log = structlog.get_logger("tollway.upstream.registrations")

MAX_WEIGHT = 65535
SERVICE_MAX = 128  # ServiceConfig.name's bound
MAX_TAGS = 32
MAX_TAG_LENGTH = 64
# Two writers racing on one (service, target): the loser retries as a refresh.
_UPSERT_ATTEMPTS = 3
# A database that does not answer is an outage like one that refuses.
_POLL_TIMEOUT = 10.0
_DB_ERRORS = (SQLAlchemyError, OSError)


def canonical_target(target: str) -> str:
    """ "Host:9001" -> "host:9001", "[::0:1]:80" -> "[::1]:80"; ValueError when it
    is not host:port. One spelling per address, so that a heartbeat finds its row."""
    return format_host_port(*parse_host_port(target))


@dataclass(frozen=True, slots=True)
class Registration:
    service: str
    target: str  # canonical "host:port"
    weight: int
    tags: tuple[str, ...]
    expires_at: datetime
    registered_at: datetime
    ttl_seconds: float

    def to_target(self) -> Target:
        host, port = parse_host_port(self.target)
        return Target(host, port, self.weight)

    @classmethod
    def of(cls, row: UpstreamTarget) -> Registration:
        return cls(
            service=row.service,
            target=row.target,
            weight=row.weight,
            tags=tuple(row.tags),
            expires_at=row.expires_at,
            registered_at=row.registered_at,
            ttl_seconds=row.ttl_seconds,
        )


def _check_service(service: str) -> str:
    if not 0 < len(service) <= SERVICE_MAX:
        raise ValueError(f"a service name has 1 to {SERVICE_MAX} characters")
    return service


def _check_ttl(ttl: float) -> float:
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    return float(ttl)


def _check_weight(weight: int) -> int:
    if not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be from 0 to {MAX_WEIGHT}")
    return weight


def _check_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS or any(not t or len(t) > MAX_TAG_LENGTH for t in tags):
        raise ValueError(f"at most {MAX_TAGS} tags of 1 to {MAX_TAG_LENGTH} characters")
    return tuple(tags)


class RegistrationStore:
    """The registrations of every service; each method is one transaction."""

    def __init__(
        self, database: Database, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._db = database
        # Must return timezone-aware UTC datetimes (tests pass a fake one).
        self._clock = clock

    def now(self) -> datetime:
        """The store's clock: what expiry is judged by."""
        return self._clock()

    def change_probe(self) -> DataVersionProbe | None:
        return self._db.change_probe()

    async def register(
        self,
        service: str,
        target: str,
        ttl: float,
        weight: int = 100,
        tags: tuple[str, ...] = (),
    ) -> tuple[Registration, bool]:
        """Register, or refresh an existing (service, target): (row, created).

        A refresh is a heartbeat that also takes the new ttl, weight and tags. A
        registration that had expired (but was not yet purged) counts as created,
        with a new registered_at: to its clients it had gone.
        """
        service = _check_service(service)
        key = canonical_target(target)
        ttl = _check_ttl(ttl)
        weight = _check_weight(weight)
        tags = _check_tags(tags)
        for attempt in range(1, _UPSERT_ATTEMPTS + 1):
            now = self._clock()
            async with self._db.sessions() as session:
                row = await session.get(UpstreamTarget, (service, key), with_for_update=True)
                created = row is None or row.expires_at <= now
                if row is None:
                    row = UpstreamTarget(service=service, target=key, registered_at=now)
                    session.add(row)
                elif created:
                    row.registered_at = now
                row.weight = weight
                row.tags = list(tags)
                row.ttl_seconds = ttl
                row.expires_at = now + timedelta(seconds=ttl)
                try:
                    await session.commit()
                except (IntegrityError, StaleDataError):
                    # Another writer inserted (or deleted) the row since we read it;
                    # read again and take the other path.
                    if attempt == _UPSERT_ATTEMPTS:
                        raise
                    continue
                return Registration.of(row), created
        raise AssertionError("unreachable")  # pragma: no cover

    async def heartbeat(
        self, service: str, target: str, ttl: float | None = None
    ) -> Registration | None:
        """Move the expiry on by `ttl` (the registration's own when None); None
        when the registration is unknown or already expired (it must register)."""
        key = canonical_target(target)
        if ttl is not None:
            ttl = _check_ttl(ttl)
        now = self._clock()
        async with self._db.sessions() as session:
            row = await session.get(UpstreamTarget, (service, key), with_for_update=True)
            if row is None or row.expires_at <= now:
                return None
            if ttl is not None:
                row.ttl_seconds = ttl
            row.expires_at = now + timedelta(seconds=row.ttl_seconds)
            try:
                await session.commit()
            except StaleDataError:  # deregistered meanwhile
                return None
            return Registration.of(row)

    async def deregister(self, service: str, target: str) -> bool:
        """Remove it; False when there was no live registration."""
        key = canonical_target(target)
        now = self._clock()
        where = (UpstreamTarget.service == service, UpstreamTarget.target == key)
        async with self._db.sessions() as session:
            live = await session.execute(
                delete(UpstreamTarget).where(*where, UpstreamTarget.expires_at > now)
            )
            # An expired leftover goes too, but was no registration to report.
            await session.execute(delete(UpstreamTarget).where(*where))
            await session.commit()
        return bool(getattr(live, "rowcount", 0))

    async def live(self, service: str | None = None) -> list[Registration]:
        """Registrations not expired now, by service then target."""
        query = select(UpstreamTarget).where(UpstreamTarget.expires_at > self._clock())
        if service is not None:
            query = query.where(UpstreamTarget.service == service)
        query = query.order_by(UpstreamTarget.service, UpstreamTarget.target)
        async with self._db.sessions() as session:
            rows = (await session.scalars(query)).all()
        return [Registration.of(r) for r in rows]

    async def purge_expired(self) -> int:
        """Delete the expired rows; how many went."""
        async with self._db.sessions() as session:
            result = await session.execute(
                delete(UpstreamTarget).where(UpstreamTarget.expires_at <= self._clock())
            )
            await session.commit()
        return int(getattr(result, "rowcount", 0) or 0)


class RegistrationWatcher:
    """Polls the live registrations and reports each service whose set changed.

    Polling (each `interval`) rather than a change feed: expiry is a change nobody
    writes, so only reading at the time can see it. Each poll is one indexed query.
    Expired rows are purged every `purge_interval` seconds so the table stays small.
    On SQLite a poll reads only when something committed (storage/change_probe.py)
    or when the first of the registrations read last time has expired since.
    """

    def __init__(
        self,
        store: RegistrationStore,
        on_change: TargetsChanged,
        interval: float = 1.0,
        *,
        purge_interval: float = 60.0,
    ) -> None:
        self._store = store
        self._on_change = on_change
        self._interval = interval
        self._purge_interval = purge_interval
        self._last: dict[str, tuple[Target, ...]] = {}
        self._failing = False
        self._next_purge = 0.0
        self._task: asyncio.Task[None] | None = None
        self._probe = store.change_probe()
        # The probe's version when the last successful read began, and the first
        # expiry among the registrations it returned.
        self._read_version: int | None = None
        self._next_expiry: datetime | None = None
        self.skipped_polls = 0

    @property
    def current(self) -> Mapping[str, tuple[Target, ...]]:
        """Each service with live registrations, as last read."""
        return dict(self._last)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="registration-watcher"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._probe is not None:
            self._probe.close()

    async def poll_once(self) -> None:
        """Read the live registrations; report every service whose set changed
        since the last poll (to empty when its last target expired or left)."""
        version = self._probe.version() if self._probe is not None else None
        if (
            version is not None
            and version == self._read_version
            and (self._next_expiry is None or self._store.now() < self._next_expiry)
        ):
            self.skipped_polls += 1  # nothing committed, nothing expired
            await self._maybe_purge()
            return
        try:
            async with asyncio.timeout(_POLL_TIMEOUT):
                registrations = await self._store.live()
        except (*_DB_ERRORS, TimeoutError) as exc:
            # Keep the last known targets: a database outage is no reason to drop
            # every registered target from the gateway.
            if not self._failing:
                self._failing = True
                log.warning(
                    "registrations_poll_failed", error=str(exc) or type(exc).__name__
                )
            return
        if self._failing:
            self._failing = False
            log.info("registrations_poll_recovered")
        # Taken before the read: a commit during the read moves the version again.
        self._read_version = version
        self._next_expiry = min((r.expires_at for r in registrations), default=None)
        grouped: dict[str, list[Target]] = {}
        for r in registrations:
            grouped.setdefault(r.service, []).append(r.to_target())
        current = {
            service: tuple(sorted(targets, key=lambda t: (t.host, t.port)))
            for service, targets in grouped.items()
        }
        previous, self._last = self._last, current
        for service in sorted(previous.keys() | current.keys()):
            targets = current.get(service, ())
            if targets != previous.get(service, ()):
                self._notify(service, targets)
        await self._maybe_purge()

    async def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + self._purge_interval
        try:
            purged = await self._store.purge_expired()
        except _DB_ERRORS as exc:
            log.warning("registrations_purge_failed", error=str(exc) or type(exc).__name__)
            return
        if purged:
            log.info("registrations_purged", count=purged)

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

    def _notify(self, service: str, targets: tuple[Target, ...]) -> None:
        try:
            self._on_change(service, targets)
        # Boundary: the consumer's callback. Its bug must not stop the watcher (and
        # with it every other service's updates).
        except Exception:
            log.exception("targets_changed_callback_failed", service=service)

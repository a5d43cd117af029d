"""How a change to a key or consumer reaches every key cache, in every process and node.

Three paths, from fastest to surest:

- in process: `Announcer.announce` hands the changes straight to the resolvers of
  its own process (the single-process gateway, where the admin API and the data
  plane share one event loop), so that they forget at once even without Redis;
- Redis pub/sub (when configured): one JSON `[kind, ref]` message per change on
  channel `tollway:invalidate`, heard by every subscribed process within
  milliseconds;
- the outbox (`cache_invalidations`, written by identity/changes.py in the same
  transaction as the change): every process polls it, so a change is never lost
  when Redis is down, a message is dropped, or the publisher died between commit
  and publish.

`OutboxReader` reads the outbox in id order without missing rows that commit out
of id order. On PostgreSQL two transactions can take ids 10 and 11 and commit 11
first; a reader that only asks for `id > last` would then skip 10 forever. So the
ids a read jumps over are remembered as gaps and asked for again until they show
up or a deadline passes (a rolled-back transaction leaves a gap for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from sqlalchemy import delete, func, or_, select

from tollway.storage.database import Database
from tollway.storage.models import CacheInvalidation, utcnow
from tollway.storage.redis_pubsub import listen

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("tollway.invalidation")

CHANNEL = "tollway:invalidate"
KINDS = frozenset({"key", "consumer", "plan", "grant"})

Change = tuple[str, str]

# How long an id skipped by a read is asked for again: longer than any transaction
# that writes an outbox row should stay open between its insert and its commit.
GAP_TTL = 30.0
# Ids skipped in one jump beyond this are not tracked (a sequence jump after a
# PostgreSQL crash is 32); the cache TTL still bounds what such a miss costs.
MAX_GAPS = 10_000
READ_BATCH = 1000
# Outbox rows older than this are deleted; a process whose poll is further behind
# than that forgets its whole cache when it catches up (see ChangeFeed).
PURGE_AGE = 3600.0
PURGE_INTERVAL = 600.0
# With a live Redis subscription the poll is only the safety net, for the
# failures no subscriber can see: a publisher that could not reach Redis, a message
# lost in a reconnect. Once a second keeps even those near the 1 s refusal bound,
# for one indexed query per second per process.
REDIS_POLL_INTERVAL = 1.0
# Redis pub/sub liveness (storage/redis_pubsub.py): silence past its deadline means
# the connection is dead even if the socket does not say so (a blackholed network),
# and the fast poll takes over.
REDIS_CONNECT_TIMEOUT = 5.0
PUBLISH_TIMEOUT = 1.0


def encode(change: Change) -> str:
    return json.dumps([change[0], change[1]], separators=(",", ":"))


def decode(data: bytes | str) -> list[Change]:
    """The changes in one message: `[kind, ref]` or a list of those; junk gives []."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(value, list):
        return []
    items = value if value and isinstance(value[0], list) else [value]
    changes: list[Change] = []
    for item in items:
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], str)
        ):
            changes.append((item[0], item[1]))
    return changes


class ChangeListener(Protocol):
    def invalidate(self, kind: str, ref: str) -> None: ...


# Resolvers of this process, told directly by Announcer. Weak, so a resolver that
# is gone is no longer told.
_local: weakref.WeakSet[Any] = weakref.WeakSet()


def listen_locally(listener: ChangeListener) -> None:
    _local.add(listener)


def stop_listening_locally(listener: ChangeListener) -> None:
    _local.discard(listener)


class Announcer:
    """Tells every key cache that something changed; call it after the commit.

    Never raises: the change is committed already and the outbox poll delivers it
    anyway, so a Redis outage makes invalidation slower, never an API call fail.
    """

    def __init__(self, redis: Redis | None, *, timeout: float = PUBLISH_TIMEOUT) -> None:
        self.redis = redis
        self.timeout = timeout

    async def announce(self, changes: Iterable[Change]) -> int:
        """Deliver the changes; returns how many went out on Redis."""
        items = list(dict.fromkeys(changes))
        if not items:
            return 0
        for listener in list(_local):
            for kind, ref in items:
                try:
                    listener.invalidate(kind, ref)
                except Exception:  # a listener bug must not fail the caller
                    log.exception("local invalidation failed", kind=kind, ref=ref)
        if self.redis is None:
            return 0
        try:
            # Bounded: a Redis that accepts the connection and never answers would
            # otherwise hold the admin request forever.
            async with asyncio.timeout(self.timeout):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for change in items:
                        pipe.publish(CHANNEL, encode(change))
                    await pipe.execute()
        except Exception as exc:  # noqa: BLE001 (the outbox poll delivers them anyway)
            log.warning(
                "invalidation publish failed; the outbox poll will deliver it",
                error=f"{type(exc).__name__}: {exc}",
                changes=len(items),
            )
            return 0
        return len(items)


class OutboxReader:
    """Reads new cache_invalidations rows, in id order, missing none that commit late."""

    def __init__(
        self,
        database: Database,
        *,
        gap_ttl: float = GAP_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.database = database
        self.gap_ttl = gap_ttl
        self.clock = clock
        # Highest id read; None until the starting position is known.
        self.last_id: int | None = None
        # Skipped ids -> until when they are asked for again.
        self.gaps: dict[int, float] = {}

    async def start_position(self, lookback: int = 200) -> None:
        """Start after the newest row; ids missing among the last few are gaps, since
        their transactions may still be about to commit."""
        async with self.database.sessions() as session:
            newest = (await session.execute(select(func.max(CacheInvalidation.id)))).scalar()
            last = int(newest or 0)
            present: set[int] = set()
            if last:
                rows = await session.execute(
                    select(CacheInvalidation.id).where(CacheInvalidation.id > last - lookback)
                )
                present = {int(r) for r in rows.scalars()}
        deadline = self.clock() + self.gap_ttl
        first = max(1, last - lookback + 1)
        self.gaps = {i: deadline for i in range(first, last) if i not in present}
        self.last_id = last

    async def read(self) -> list[Change]:
        """The changes committed since the last read (call start_position first)."""
        assert self.last_id is not None, "start_position() first"
        now = self.clock()
        self.gaps = {i: until for i, until in self.gaps.items() if until > now}
        changes: list[Change] = []
        async with self.database.sessions() as session:
            while True:
                cond = CacheInvalidation.id > self.last_id
                if self.gaps:
                    cond = or_(cond, CacheInvalidation.id.in_(sorted(self.gaps)))
                rows = (
                    await session.execute(
                        select(CacheInvalidation.id, CacheInvalidation.kind, CacheInvalidation.ref)
                        .where(cond)
                        .order_by(CacheInvalidation.id)
                        .limit(READ_BATCH)
                    )
                ).all()
                beyond = 0
                for raw_id, kind, ref in rows:
                    row_id = int(raw_id)
                    changes.append((kind, ref))
                    if row_id in self.gaps:
                        del self.gaps[row_id]
                    elif row_id > self.last_id:
                        beyond += 1
                        self._skip_to(row_id, now)
                if len(rows) < READ_BATCH or beyond == 0:
                    break
        return changes

    def _skip_to(self, row_id: int, now: float) -> None:
        assert self.last_id is not None
        skipped = row_id - self.last_id - 1
        if 0 < skipped <= MAX_GAPS and len(self.gaps) + skipped <= MAX_GAPS:
            until = now + self.gap_ttl
            for i in range(self.last_id + 1, row_id):
                self.gaps[i] = until
        self.last_id = row_id

    async def purge(self, older_than: float = PURGE_AGE) -> int:
        """Delete rows older than `older_than` seconds; returns how many went.

        The newest row always stays: SQLite hands out max(id)+1 for a table without
        AUTOINCREMENT, so an emptied table would restart at 1, below every reader's
        position, and its next changes would never be read.
        """
        cutoff = utcnow() - timedelta(seconds=older_than)
        newest = select(func.max(CacheInvalidation.id)).scalar_subquery()
        async with self.database.sessions() as session:
            result = await session.execute(
                delete(CacheInvalidation).where(
                    CacheInvalidation.created_at < cutoff, CacheInvalidation.id < newest
                )
            )
            await session.commit()
        return int(getattr(result, "rowcount", 0) or 0)


class ChangeFeed:
    """Runs the outbox poll (and the Redis subscription) for one process's key cache.

    `on_change(kind, ref)` is called for every change, possibly more than once (the
    same change arrives through Redis and then through the outbox); `on_reset()`
    when continuity cannot be vouched for (the starting position was unknown while
    entries were cached, or the poll fell further behind than the purge age), so
    that the cache forgets everything.
    """

    def __init__(
        self,
        database: Database,
        redis: Redis | None,
        on_change: Callable[[str, str], None],
        on_reset: Callable[[], None],
        *,
        poll_interval: float,
        redis_poll_interval: float = REDIS_POLL_INTERVAL,
        purge_interval: float = PURGE_INTERVAL,
        purge_age: float = PURGE_AGE,
    ) -> None:
        self.reader = OutboxReader(database)
        self.probe = database.change_probe()
        # The probe's version when the last successful read began (None: unknown).
        self._read_version: int | None = None
        self.skipped_polls = 0
        self.redis = redis
        self.on_change = on_change
        self.on_reset = on_reset
        self.poll_interval = poll_interval
        self.redis_poll_interval = max(poll_interval, redis_poll_interval)
        self.purge_interval = purge_interval
        self.purge_age = purge_age
        # True while a Redis subscription is confirmed alive.
        self.subscribed = False
        self.polls = 0
        # The outbox id up to which every change has been handed to on_change.
        self.applied_id: int | None = None
        self.poll_errors = 0
        self.redis_messages = 0
        self._last_ok = time.monotonic()
        self._last_purge = 0.0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        try:
            await self.reader.start_position()
        except Exception as exc:  # noqa: BLE001 (the poll loop retries; auth keeps working)
            log.warning(
                "outbox position unknown; will retry", error=f"{type(exc).__name__}: {exc}"
            )
        self._last_ok = time.monotonic()
        # A purge soon after start, then every purge_interval.
        self._last_purge = time.monotonic() - self.purge_interval + 30.0
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="tollway-outbox-poll"))
        if self.redis is not None:
            self._tasks.append(
                asyncio.create_task(self._redis_loop(), name="tollway-invalidate-sub")
            )

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.subscribed = False
        if self.probe is not None:
            self.probe.close()

    def poke(self) -> None:
        """Poll now rather than at the next interval."""
        self._wake.set()

    async def poll_once(self, force: bool = False) -> int:
        """One read of the outbox; returns the number of changes applied.

        On SQLite the read is skipped while the file's data version has not moved
        (storage/change_probe.py): nothing committed, so nothing can be new, and the
        continuity the reset rule below asks for holds. `force` reads anyway.
        """
        reader = self.reader
        probe = self.probe
        version = probe.version() if probe is not None else None
        if (
            not force
            and version is not None
            and version == self._read_version
            and reader.last_id is not None
        ):
            self._last_ok = time.monotonic()
            self.skipped_polls += 1
            return 0
        if reader.last_id is None:
            await reader.start_position()
            # Entries may have been cached while the position was unknown.
            self.on_reset()
        changes = await reader.read()
        now = time.monotonic()
        if now - self._last_ok > self.purge_age / 2:
            # Rows this process never read may have been purged meanwhile.
            self.on_reset()
        self._last_ok = now
        self.polls += 1
        for kind, ref in changes:
            self.on_change(kind, ref)
        self.applied_id = reader.last_id
        # Taken before the read: a commit during the read moves it again.
        self._read_version = version
        return len(changes)

    async def _poll_loop(self) -> None:
        while True:
            interval = self.redis_poll_interval if self.subscribed else self.poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            forced = self._wake.is_set()
            self._wake.clear()
            try:
                await self.poll_once(force=forced)
            except Exception as exc:  # noqa: BLE001 (database down: keep the cache, retry)
                self.poll_errors += 1
                if self.poll_errors == 1 or self.poll_errors % 100 == 0:
                    log.warning(
                        "outbox poll failed", error=f"{type(exc).__name__}: {exc}",
                        failures=self.poll_errors,
                    )
            if time.monotonic() - self._last_purge >= self.purge_interval:
                self._last_purge = time.monotonic()
                try:
                    await self.reader.purge(self.purge_age)
                except Exception as exc:  # noqa: BLE001 (the next run retries)
                    log.warning("outbox purge failed", error=f"{type(exc).__name__}: {exc}")

    async def _redis_loop(self) -> None:
        assert self.redis is not None
        backoff = 0.5
        while True:
            pubsub = self.redis.pubsub()
            try:
                async with asyncio.timeout(REDIS_CONNECT_TIMEOUT):
                    await pubsub.subscribe(CHANNEL)
                    # The confirmation proves the subscription is live.
                    while (await pubsub.get_message(timeout=REDIS_CONNECT_TIMEOUT)) is None:
                        pass
                self.subscribed = True
                backoff = 0.5
                # Whatever changed before the subscription took hold: from the outbox.
                self.poke()
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (Redis down: the fast poll takes over)
                if self.subscribed:
                    log.warning(
                        "redis invalidation subscription lost; polling the outbox",
                        error=f"{type(exc).__name__}: {exc}",
                    )
                self.subscribed = False
                self.poke()
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):
                    await _close_pubsub(pubsub)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _listen(self, pubsub: Any) -> None:
        await listen(pubsub, self._heard)

    def _heard(self, data: bytes) -> None:
        self.redis_messages += 1
        for kind, ref in decode(data):
            self.on_change(kind, ref)


async def _close_pubsub(pubsub: Any) -> None:
    close: Callable[[], Awaitable[None]] | None = getattr(pubsub, "aclose", None)
    if close is None:
        close = pubsub.close
    async with asyncio.timeout(1.0):
        await close()

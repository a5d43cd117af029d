"""Raw API key -> key record, cached per process, so warm requests never touch the database.

The warm path is one dict lookup keyed by the raw key bytes and one clock read:
no checksum, no HMAC (each costs microseconds), no await. `resolve` then returns
the cached `ResolvedKey` itself; only a miss returns an awaitable, so the plugin
pipeline stays on its synchronous fast path for every warm request.

A miss checks the key's shape and checksum (a typo or made-up key never reaches
the database), hashes it with the pepper and looks the hash up, with:

- single flight: concurrent misses for one key share one query;
- a negative cache, separate and bounded, so that a flood of unknown keys (each
  of which would otherwise cost a query) cannot evict the keys in use, and a
  repeated unknown key costs one query per `key_cache_negative_ttl`;
- a bound on concurrent queries and on distinct keys waiting, so that a flood of
  distinct made-up keys queues here rather than in the database's pool; past the
  bound a miss is answered "unavailable" at once;
- stale-while-revalidate: an entry past its TTL (but not invalidated) answers at
  once while one background lookup refreshes it, so a hot key never makes a
  request wait, and the TTL (a bound on a missed invalidation) is extended by one
  lookup at most;
- stale-if-error: when the database does not answer, such an entry keeps serving
  for up to STALE_IF_ERROR seconds past its TTL, retried once per
  RETRY_AFTER_ERROR. That is safe: a change cannot commit while the database is
  down, and one that did commit before reached the cache through invalidation.
  A key with no entry is answered "unavailable" (503), at once for
  RETRY_AFTER_ERROR after a failure, so requests do not pile up on a dead
  database; every lookup is bounded by LOOKUP_TIMEOUT.

Time-based states are checked per request from the cached record, never by a
refresh: a key past `key_expires_at` answers key_expired, and an old secret whose
rotation grace (`secret_expires_at`) ended stops at that instant (invalid_api_key).
Each entry keeps the earliest instant at which anything about it changes
(`valid_until`), so the warm path compares one float.

Changes reach the cache through identity/invalidation.py (in process, Redis
pub/sub, and the database outbox poll); entries are indexed by key id and by
consumer id so a change drops exactly the raw keys it concerns. A lookup that was
in flight while any change arrived is answered but not cached: it may have read
the row from before the change.

Lookups are by keyed hashes only (SipHash with a per-process secret for the dict,
HMAC-SHA256 with the pepper for the database, then a constant-time comparison of
the stored hash), so response timing tells an attacker nothing about stored keys.

last_used_at is noted in a dict (key id -> time of last successful use) and
written in batches every `last_used_flush_interval`, and at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote
from uuid import UUID

import structlog

from tollway.identity.apikeys import hash_key, is_well_formed
from tollway.identity.invalidation import ChangeFeed, listen_locally, stop_listening_locally
from tollway.identity.keys import KeyLookup, lookup_secret, touch_last_used
from tollway.settings import Settings
from tollway.storage.database import Database

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("tollway.keys")

# Seconds past its TTL an entry may still answer while the database is down.
STALE_IF_ERROR = 300.0
# After a failed lookup: seconds before the database is tried again (for a stale
# entry, and for keys with none, which get "unavailable" at once meanwhile).
RETRY_AFTER_ERROR = 1.0
# A lookup (waiting for a slot included) that takes longer has failed.
LOOKUP_TIMEOUT = 5.0
# Database lookups at once per process; more wait their turn (single flight
# already merges the same key).
MAX_CONCURRENT_LOOKUPS = 8
# Distinct keys waiting for a lookup; past this a miss is refused at once.
MAX_PENDING_LOOKUPS = 1024
# How long stop() waits for the last last_used_at batch and in-flight lookups.
STOP_TIMEOUT = 5.0

_INF = float("inf")


class KeyStoreUnavailable(Exception):
    """A key not in the cache cannot be checked now (database down or overloaded)."""


class ConsumerIdentity:
    """What an authenticated request carries as `ctx.consumer`.

    `id` is a string so that consumer-level plugin attachments in tollway.yaml match
    it as written; `username` is the email (consumers have no other name).
    """

    __slots__ = ("email", "id", "name", "plan", "username")

    def __init__(self, id: str, email: str, name: str, plan: str | None) -> None:
        self.id = id
        self.email = email
        self.username = email
        self.name = name
        self.plan = plan

    def __repr__(self) -> str:
        return f"ConsumerIdentity(id={self.id!r}, email={self.email!r})"


def header_value(text: str) -> bytes:
    """`text` as a safe header value: ASCII as is, anything else percent-encoded."""
    if text.isascii() and text.isprintable():
        return text.encode("ascii")
    return quote(text, safe="@+._-!#$&'*/=?^`{|}~").encode("ascii")


def _ts(value: datetime | None) -> float:
    return _INF if value is None else value.timestamp()


class ResolvedKey:
    """One cache entry, and the answer `resolve` gives: `error` None means admitted.

    Otherwise `error` is the refusal code (invalid_api_key, key_disabled,
    key_expired). Everything a request needs is precomputed here, once per fill.
    """

    __slots__ = (
        "all_routes",
        "consumer",
        "consumer_ref",
        "error",
        "expired",
        "forward",
        "fresh_until",
        "header_values",
        "key_expires",
        "key_id",
        "key_ref",
        "lookup",
        "routes",
        "secret_expires",
        "stale_until",
        "tags",
        "valid_until",
    )

    lookup: KeyLookup
    consumer: ConsumerIdentity
    key_id: UUID
    key_ref: str
    consumer_ref: str
    header_values: tuple[bytes, bytes, bytes]
    # Memo of the forwarded header pairs, per plugin configuration of header names.
    forward: dict[str, list[tuple[bytes, bytes]]]

    def __init__(self, error: str | None) -> None:
        self.error = error
        self.expired: ResolvedKey | None = None
        self.all_routes = True
        self.routes: frozenset[str] = frozenset()
        self.tags: frozenset[str] = frozenset()
        self.fresh_until = _INF
        self.stale_until = _INF
        self.valid_until = _INF
        self.key_expires = _INF
        self.secret_expires = _INF

    @classmethod
    def of(cls, lookup: KeyLookup, now: float, ttl: float) -> ResolvedKey:
        disabled = lookup.key_status != "active" or lookup.consumer_status != "active"
        entry = cls("key_disabled" if disabled else None)
        entry.lookup = lookup
        entry.key_id = lookup.key_id
        entry.key_ref = str(lookup.key_id)
        entry.consumer_ref = str(lookup.consumer_id)
        entry.consumer = ConsumerIdentity(
            entry.consumer_ref, lookup.consumer_email, lookup.consumer_name, lookup.consumer_plan
        )
        entry.header_values = (
            entry.consumer_ref.encode("ascii"),
            header_value(lookup.consumer_email),
            entry.key_ref.encode("ascii"),
        )
        entry.forward = {}
        scopes = lookup.scopes
        entry.all_routes = not scopes
        entry.routes = frozenset(s for s in scopes if not s.startswith("tag:"))
        entry.tags = frozenset(s[4:] for s in scopes if s.startswith("tag:"))
        entry.fresh_until = now + ttl
        entry.stale_until = entry.fresh_until + STALE_IF_ERROR
        entry.key_expires = _ts(lookup.key_expires_at)
        entry.secret_expires = _ts(lookup.secret_expires_at)
        entry.valid_until = min(entry.fresh_until, entry.key_expires, entry.secret_expires)
        return entry

    def at(self, now: float) -> ResolvedKey:
        """The answer at `now`, time-based states included (freshness aside)."""
        if now >= self.secret_expires:
            return INVALID
        if self.error is None and now >= self.key_expires:
            expired = self.expired
            if expired is None:
                expired = ResolvedKey("key_expired")
                for name in ResolvedKey.__slots__:
                    if name not in ("error", "expired"):
                        setattr(expired, name, getattr(self, name))
                self.expired = expired
            return expired
        return self

    def allows(self, route_name: str, route_tags: tuple[str, ...]) -> bool:
        """Whether the key's scopes admit the route (by name, or `tag:<t>`)."""
        return (
            self.all_routes
            or route_name in self.routes
            or (bool(self.tags) and not self.tags.isdisjoint(route_tags))
        )


INVALID = ResolvedKey("invalid_api_key")


class KeyResolver:
    """The per-process key cache in front of identity.keys.lookup_secret."""

    def __init__(
        self,
        database: Database,
        pepper: bytes,
        settings: Settings,
        redis: Redis | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.pepper = pepper
        self.settings = settings
        self.redis = redis
        # Wall-clock seconds: key and secret expiries are wall-clock instants.
        self.clock = clock
        self.size = settings.key_cache_size
        self.ttl = settings.key_cache_ttl
        self.negative_ttl = settings.key_cache_negative_ttl
        # raw key -> entry. Insertion order is the eviction order: a refill moves an
        # entry to the end, and every entry is refilled once per TTL, so the oldest
        # insertion is also the entry nearest to expiry (LRU's choice, without
        # LRU's per-hit reordering cost).
        # Public for one reader only: the key-auth plugin inlines the warm branch of
        # `resolve` (an entry answers as it is while clock() < entry.valid_until,
        # noting the use in `used`), because on the hot path a Python call costs
        # as much as the lookup. Nothing else may read or write it.
        self.cache: dict[bytes, ResolvedKey] = {}
        # raw key -> until when it is known not to exist.
        self._negative: dict[bytes, float] = {}
        self._by_key: dict[str, set[bytes]] = {}
        self._by_consumer: dict[str, set[bytes]] = {}
        self._inflight: dict[bytes, asyncio.Task[ResolvedKey]] = {}
        self._slots: asyncio.Semaphore | None = None
        # Bumped by every invalidation: a lookup that saw it change is not cached.
        self._epoch = 0
        # Until when the database counts as down (after a failed lookup).
        self._unavailable_until = 0.0
        # key id (as a string: its hash is cached, a UUID's is computed in Python on
        # every use) -> wall time of its last admitted use, until the next flush.
        self.used: dict[str, float] = {}
        # Other caches of this process (the PlanBook) that ride on this feed: they get
        # every change of a kind the key cache does not use, and every reset.
        self._listeners: list[tuple[Callable[[str, str], None], Callable[[], None]]] = []
        self.feed = ChangeFeed(
            database,
            redis,
            self.invalidate,
            self.reset,
            poll_interval=settings.invalidation_poll_interval,
        )
        self._flusher: asyncio.Task[None] | None = None
        self._started = False
        # Counters, for tests and metrics.
        self.misses = 0
        self.db_lookups = 0
        self.lookup_errors = 0
        self.malformed = 0
        self.invalidations = 0
        self.last_used_writes = 0

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        listen_locally(self)
        await self.feed.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="tollway-last-used")

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        stop_listening_locally(self)
        await self.feed.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        inflight = list(self._inflight.values())
        if inflight:
            await asyncio.wait(inflight, timeout=STOP_TIMEOUT)
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.flush_last_used()
        except TimeoutError:
            log.warning("last_used_at not written at stop: the database did not answer")

    # ---- the request path ----------------------------------------------------------------

    def resolve(self, raw: bytes) -> ResolvedKey | Awaitable[ResolvedKey]:
        """The key's state now: the entry itself when warm, else an awaitable of it.

        Raises KeyStoreUnavailable (here or from the awaitable) when a key that is
        not cached cannot be checked.
        """
        entry = self.cache.get(raw)
        if entry is not None:
            now = self.clock()
            if now < entry.valid_until:
                if entry.error is None:
                    self.used[entry.key_ref] = now
                return entry
            return self._recheck(raw, entry, now)
        return self._miss(raw, self.clock())

    def _recheck(
        self, raw: bytes, entry: ResolvedKey, now: float
    ) -> ResolvedKey | Awaitable[ResolvedKey]:
        answer = entry.at(now)
        if answer is INVALID:
            # The secret's grace is over; it can never come back.
            self._drop(raw)
            self._put_negative(raw, now)
            return INVALID
        if now >= entry.fresh_until:
            if now >= entry.stale_until:
                return self._miss(raw, now)
            # Stale: answer now, refresh in the background.
            if raw not in self._inflight and now >= self._unavailable_until:
                self._start_lookup(raw, raw.decode("ascii"))
        if answer.error is None:
            self.used[answer.key_ref] = now
        return answer

    def _miss(self, raw: bytes, now: float) -> ResolvedKey | Awaitable[ResolvedKey]:
        self.misses += 1
        until = self._negative.get(raw)
        if until is not None:
            if now < until:
                return INVALID
            del self._negative[raw]
        task = self._inflight.get(raw)
        if task is None:
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                text = ""
            if not is_well_formed(text):
                self.malformed += 1
                return INVALID
            if now < self._unavailable_until:
                raise KeyStoreUnavailable("the key store is not answering")
            if len(self._inflight) >= MAX_PENDING_LOOKUPS:
                raise KeyStoreUnavailable("too many keys waiting for a lookup")
            task = self._start_lookup(raw, text)
        return self._wait(task)

    def _start_lookup(self, raw: bytes, text: str) -> asyncio.Task[ResolvedKey]:
        task = asyncio.get_running_loop().create_task(self._load(raw, text))
        self._inflight[raw] = task
        task.add_done_callback(lambda t: self._landed(raw, t))
        return task

    async def _wait(self, task: asyncio.Task[ResolvedKey]) -> ResolvedKey:
        # Shielded: one waiter going away (its client hung up) must not cancel the
        # lookup the others are waiting for.
        return await asyncio.shield(task)

    def _landed(self, raw: bytes, task: asyncio.Task[ResolvedKey]) -> None:
        if self._inflight.get(raw) is task:
            del self._inflight[raw]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it

    async def _load(self, raw: bytes, text: str) -> ResolvedKey:
        epoch = self._epoch
        key_hash = hash_key(self.pepper, text)
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_CONCURRENT_LOOKUPS)
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT), self._slots:
                self.db_lookups += 1
                at = datetime.fromtimestamp(self.clock(), UTC)
                async with self.database.sessions() as session:
                    lookup = await lookup_secret(session, key_hash, at)
        except Exception as exc:
            self.lookup_errors += 1
            now = self.clock()
            self._unavailable_until = now + RETRY_AFTER_ERROR
            stale = self.cache.get(raw)
            usable = stale is not None and now < stale.stale_until
            if self.lookup_errors == 1 or self.lookup_errors % 100 == 0:
                log.warning(
                    "API key lookup failed",
                    error=f"{type(exc).__name__}: {exc}",
                    failures=self.lookup_errors,
                    stale_served=usable,
                )
            if stale is not None and usable:
                # Served from the cache until the next try.
                stale.fresh_until = min(now + RETRY_AFTER_ERROR, stale.stale_until)
                stale.valid_until = min(
                    stale.fresh_until, stale.key_expires, stale.secret_expires
                )
                answer = stale.at(now)
                if answer.error is None:
                    self.used[answer.key_ref] = now
                return answer
            raise KeyStoreUnavailable("the key store did not answer") from exc
        now = self.clock()
        if lookup is None:
            self._drop(raw)
            self._put_negative(raw, now)
            return INVALID
        entry = ResolvedKey.of(lookup, now, self.ttl)
        if epoch == self._epoch:
            self._put(raw, entry)
        else:
            self._drop(raw)
        answer = entry.at(now)
        if answer.error is None:
            self.used[answer.key_ref] = now
        return answer

    # ---- the cache -----------------------------------------------------------------------

    def _put(self, raw: bytes, entry: ResolvedKey) -> None:
        cache = self.cache
        old = cache.pop(raw, None)
        if old is not None:
            self._unindex(raw, old)
        elif len(cache) >= self.size:
            oldest = next(iter(cache))
            self._unindex(oldest, cache.pop(oldest))
        cache[raw] = entry
        self._by_key.setdefault(entry.key_ref, set()).add(raw)
        self._by_consumer.setdefault(entry.consumer_ref, set()).add(raw)

    def _put_negative(self, raw: bytes, now: float) -> None:
        negative = self._negative
        if negative.pop(raw, None) is None and len(negative) >= self.size:
            del negative[next(iter(negative))]
        negative[raw] = now + self.negative_ttl

    def _drop(self, raw: bytes) -> None:
        entry = self.cache.pop(raw, None)
        if entry is not None:
            self._unindex(raw, entry)

    def _unindex(self, raw: bytes, entry: ResolvedKey) -> None:
        for index, ref in ((self._by_key, entry.key_ref), (self._by_consumer, entry.consumer_ref)):
            raws = index.get(ref)
            if raws is not None:
                raws.discard(raw)
                if not raws:
                    del index[ref]

    def add_change_listener(
        self, on_change: Callable[[str, str], None], on_reset: Callable[[], None]
    ) -> None:
        """Hand every change of another kind than key/consumer (plan, grant) to
        `on_change`, and every reset to `on_reset`: one feed (in process, Redis, the
        outbox poll) serves every cache of the process."""
        self._listeners.append((on_change, on_reset))

    def remove_change_listener(
        self, on_change: Callable[[str, str], None], on_reset: Callable[[], None]
    ) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove((on_change, on_reset))

    def invalidate(self, kind: str, ref: str) -> None:
        """Forget every cached raw key of a key (kind "key") or consumer ("consumer");
        other kinds go to the change listeners.

        Negative entries stay: a secret that was unknown cannot become known (a new
        secret is new random), and one whose grace ended cannot come back.
        """
        self.invalidations += 1
        if kind == "key":
            index = self._by_key
        elif kind == "consumer":
            index = self._by_consumer
        else:
            for on_change, _ in list(self._listeners):
                try:
                    on_change(kind, ref)
                except Exception:  # the feed must go on to the next change regardless
                    log.exception("change listener failed", kind=kind, ref=ref)
            return
        self._epoch += 1
        try:
            ref = str(UUID(ref))
        except ValueError:
            return
        raws = index.get(ref)
        if not raws:
            return
        for raw in list(raws):
            self._drop(raw)

    def clear(self) -> None:
        """Forget every positive entry."""
        self._epoch += 1
        self.cache.clear()
        self._by_key.clear()
        self._by_consumer.clear()

    def reset(self) -> None:
        """Continuity of changes was lost: forget everything, and tell the listeners."""
        self.clear()
        for _, on_reset in list(self._listeners):
            try:
                on_reset()
            except Exception:  # the feed must go on regardless
                log.exception("change listener reset failed")

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self.cache),
            "negative_entries": len(self._negative),
            "inflight": len(self._inflight),
            "misses": self.misses,
            "db_lookups": self.db_lookups,
            "lookup_errors": self.lookup_errors,
            "malformed": self.malformed,
            "invalidations": self.invalidations,
            "last_used_writes": self.last_used_writes,
        }

    # ---- last_used_at ----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.last_used_flush_interval)
            await self.flush_last_used()

    async def flush_last_used(self) -> int:
        """Write the noted uses in one batch; on failure keep them for the next one."""
        if not self.used:
            return 0
        batch, self.used = self.used, {}
        try:
            async with self.database.sessions() as session:
                await touch_last_used(
                    session, {UUID(k): datetime.fromtimestamp(t, UTC) for k, t in batch.items()}
                )
                await session.commit()
        except BaseException as exc:
            # Merged back, newest time wins; bounded by the number of keys in use.
            # Cancellation too (stop() cancels the loop mid-write): the batch is
            # then written by stop's own final flush.
            for key_id, at in batch.items():
                if self.used.get(key_id, 0.0) < at:
                    self.used[key_id] = at
            if not isinstance(exc, Exception):
                raise
            log.warning("last_used_at batch not written", error=f"{type(exc).__name__}: {exc}")
            return 0
        self.last_used_writes += 1
        return len(batch)

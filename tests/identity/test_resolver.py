"""The key resolver against a real database (SQLite and PostgreSQL).

Queries are counted with a SQLAlchemy event listener on the engine, so "no
database round trip" means no statement reached the driver. Time is an injected
clock, so TTLs and expiries are tested without waiting.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from sqlalchemy import event, func, select, update

from support.db import PG_PORT, pg_schema_database
from support.relay import FaultRelay
from tollway.identity import consumers, keys
from tollway.identity import resolver as resolver_module
from tollway.identity.apikeys import generate_key
from tollway.identity.changes import pending_changes
from tollway.identity.invalidation import Announcer
from tollway.identity.resolver import (
    INVALID,
    RETRY_AFTER_ERROR,
    STALE_IF_ERROR,
    KeyResolver,
    KeyStoreUnavailable,
    ResolvedKey,
)
from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.storage.models import ApiKey, CacheInvalidation

PEPPER = b"test-pepper"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StatementCounter:
    """Counts SQL statements that start with `prefix` and mention `needle`, as the
    driver receives them."""

    def __init__(self, db: Database, needle: str, prefix: str = "") -> None:
        self.needle = needle
        self.prefix = prefix
        self.count = 0
        self.executemany = 0
        self._engine = db.engine.sync_engine
        event.listen(self._engine, "before_cursor_execute", self._before)

    def _before(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith(self.prefix) and self.needle in statement:
            self.count += 1
            self.executemany += many

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._before)


@pytest.fixture
def secret_queries(database: Database) -> Any:
    counter = StatementCounter(database, "api_key_secrets", "SELECT")
    yield counter
    counter.close()


def settings(**kw: Any) -> Settings:
    values: dict[str, Any] = {
        "key_cache_ttl": 60.0,
        "key_cache_negative_ttl": 10.0,
        "invalidation_poll_interval": 0.05,
        "last_used_flush_interval": 3600.0,
    }
    values.update(kw)
    return Settings(**values)


@pytest.fixture
async def clock() -> Clock:
    return Clock()


def make_resolver(database: Database, clock: Callable[[], float], **kw: Any) -> KeyResolver:
    return KeyResolver(database, PEPPER, settings(**kw), None, clock=clock)


@pytest.fixture
async def resolver(database: Database, clock: Clock) -> AsyncIterator[KeyResolver]:
    r = make_resolver(database, clock)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def new_consumer(db: Database, email: str = "alice@example.com") -> UUID:
    async with db.sessions() as s:
        consumer, _ = await consumers.create_or_get(s, email=email, name="Alice", plan="gold")
        await s.commit()
        return consumer.id


async def new_key(db: Database, consumer_id: UUID, **kw: Any) -> keys.NewKey:
    async with db.sessions() as s:
        new = await keys.create_key(s, PEPPER, consumer_id=consumer_id, **kw)
        await s.commit()
        return new


async def change(db: Database, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run one identity change, commit, and announce it (as the admin API does)."""
    async with db.sessions() as s:
        result = await fn(s, *args, **kw)
        changes = pending_changes(s)
        await s.commit()
    await Announcer(None).announce(changes)
    return result


async def settle(r: KeyResolver, db: Database) -> None:
    """Wait until the resolver's outbox poll has read every change so far, so that a
    change announced directly is not delivered again (harmlessly) mid-test."""
    async with db.sessions() as s:
        newest = (await s.execute(select(func.max(CacheInvalidation.id)))).scalar() or 0
    async with asyncio.timeout(5):
        while (r.feed.applied_id or 0) < newest:
            await asyncio.sleep(0.01)


async def resolve(r: KeyResolver, raw: str) -> ResolvedKey:
    result = r.resolve(raw.encode())
    if inspect.isawaitable(result):
        return await result
    assert isinstance(result, ResolvedKey)
    return result


def cold(r: KeyResolver, raw: str) -> bool:
    """True when the key is not answered from the cache (the lookup it starts lands
    in the background)."""
    result = r.resolve(raw.encode())
    if inspect.iscoroutine(result):
        result.close()
        return True
    return False


def warm(r: KeyResolver, raw: str) -> ResolvedKey:
    """A resolve that must be answered synchronously (from the cache)."""
    result = r.resolve(raw.encode())
    assert isinstance(result, ResolvedKey), "expected a synchronous (cached) answer"
    return result


# ---- hits, misses, and what a warm hit costs -------------------------------------------


async def test_miss_awaits_once_then_warm_hits_are_synchronous(
    database: Database, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    cid = await new_consumer(database)
    new = await new_key(database, cid, name="ci", scopes=["api", "tag:public"])
    first = resolver.resolve(new.raw.encode())
    assert inspect.isawaitable(first)
    entry = await first
    assert entry.error is None
    assert entry.lookup.key_id == new.key.id
    assert entry.consumer.id == str(cid)
    assert entry.consumer.email == entry.consumer.username == "alice@example.com"
    assert entry.consumer.plan == "gold"
    assert entry.routes == {"api"} and entry.tags == {"public"}
    assert entry.allows("api", ()) and entry.allows("other", ("public",))
    assert not entry.allows("other", ("internal",))
    for _ in range(100):
        assert warm(resolver, new.raw) is entry
    assert secret_queries.count == 1
    assert resolver.db_lookups == 1


async def test_malformed_and_typo_keys_never_reach_the_database(
    database: Database, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    cid = await new_consumer(database)
    good = (await new_key(database, cid)).raw
    typo = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
    for raw in (typo, "tw_live_short", "", "x" * 57, good + "x", good.upper(), "tw_live_é" * 6):
        assert warm(resolver, raw) is INVALID
    assert secret_queries.count == 0
    assert resolver.malformed == 7


async def test_non_ascii_bytes_are_invalid(resolver: KeyResolver) -> None:
    assert resolver.resolve(b"tw_live_\xff\xfe") is INVALID


async def test_concurrent_misses_share_one_query(
    database: Database, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    cid = await new_consumer(database)
    raw = (await new_key(database, cid)).raw
    pending = [resolver.resolve(raw.encode()) for _ in range(50)]
    assert all(inspect.isawaitable(p) for p in pending)
    results = await asyncio.gather(*pending)  # type: ignore[arg-type]
    assert {r.error for r in results} == {None}
    assert len({id(r) for r in results}) == 1
    assert secret_queries.count == 1


async def test_one_waiter_cancelled_does_not_cancel_the_others(
    database: Database, resolver: KeyResolver
) -> None:
    cid = await new_consumer(database)
    raw = (await new_key(database, cid)).raw
    first = asyncio.ensure_future(resolver.resolve(raw.encode()))  # type: ignore[arg-type]
    second = asyncio.ensure_future(resolver.resolve(raw.encode()))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).error is None
    assert warm(resolver, raw).error is None


# ---- negative cache --------------------------------------------------------------------


async def test_unknown_keys_cost_one_query_per_key_per_negative_ttl(
    database: Database, clock: Clock, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    flood = [generate_key() for _ in range(50)]
    for _ in range(20):
        for raw in flood:
            assert (await resolve(resolver, raw)) is INVALID
    assert secret_queries.count == 50
    # Still within the negative TTL: answered synchronously.
    assert all(warm(resolver, raw) is INVALID for raw in flood)
    clock.advance(10.5)
    for raw in flood[:10]:
        assert (await resolve(resolver, raw)) is INVALID
    assert secret_queries.count == 60


async def test_flood_of_unknown_keys_does_not_evict_keys_in_use(
    database: Database, clock: Clock, secret_queries: StatementCounter
) -> None:
    r = make_resolver(database, clock, key_cache_size=5)
    cid = await new_consumer(database)
    raw = (await new_key(database, cid)).raw
    assert (await resolve(r, raw)).error is None
    for _ in range(40):
        assert (await resolve(r, generate_key())) is INVALID
    assert warm(r, raw).error is None
    stats = r.stats()
    assert stats["entries"] == 1
    assert stats["negative_entries"] == 5  # bounded too


# ---- TTL, expiry and rotation ----------------------------------------------------------


async def landed(r: KeyResolver) -> None:
    """Wait for the background lookups to finish."""
    async with asyncio.timeout(5):
        while r.stats()["inflight"]:
            await asyncio.sleep(0.005)


async def test_stale_entries_answer_at_once_while_one_lookup_refreshes_them(
    database: Database, clock: Clock, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    cid = await new_consumer(database)
    new = await new_key(database, cid)
    raw = new.raw
    await resolve(resolver, raw)
    clock.advance(59)
    warm(resolver, raw)
    assert secret_queries.count == 1
    clock.advance(2)
    # Past the TTL: still answered synchronously, and refreshed once in the background.
    for _ in range(20):
        assert warm(resolver, raw).error is None
    await landed(resolver)
    assert secret_queries.count == 2
    warm(resolver, raw)
    assert secret_queries.count == 2
    # A refresh brings news a missed invalidation would have: the key was disabled
    # behind the cache's back (no outbox row: as if the change were lost).
    async with database.sessions() as s:
        await s.execute(
            update(ApiKey).where(ApiKey.id == new.key.id).values(status="disabled")
        )
        await s.commit()
    clock.advance(61)
    warm(resolver, raw)  # the stale answer, one last time
    await landed(resolver)
    assert warm(resolver, raw).error == "key_disabled"


async def test_key_expiry_is_checked_per_request_from_the_cache(
    database: Database, clock: Clock, secret_queries: StatementCounter
) -> None:
    r = make_resolver(database, clock, key_cache_ttl=10 * 3600)
    cid = await new_consumer(database)
    expires = datetime.now(UTC) + timedelta(hours=1)
    raw = (await new_key(database, cid, expires_at=expires)).raw
    assert (await resolve(r, raw)).error is None
    clock.now = expires.timestamp() - 1
    assert warm(r, raw).error is None
    clock.now = expires.timestamp() + 1
    expired = warm(r, raw)
    assert expired.error == "key_expired"
    assert expired.lookup.key_id == warm(r, raw).lookup.key_id
    assert secret_queries.count == 1


async def test_rotated_out_secret_stops_at_grace_end_without_a_query(
    database: Database, clock: Clock, resolver: KeyResolver, secret_queries: StatementCounter
) -> None:
    cid = await new_consumer(database)
    created = await new_key(database, cid)
    old = created.raw
    assert (await resolve(resolver, old)).error is None
    rotated = await change(database, keys.rotate_key, PEPPER, created.key.id,
                           grace=timedelta(seconds=30))
    new = rotated.raw
    await settle(resolver, database)
    # The change dropped the cached old secret; refetched, it now carries its end.
    old_entry = await resolve(resolver, old)
    assert old_entry.error is None
    assert old_entry.secret_expires < float("inf")
    assert (await resolve(resolver, new)).error is None
    queries = secret_queries.count
    clock.now = old_entry.secret_expires + 0.001
    assert warm(resolver, old) is INVALID
    assert warm(resolver, old) is INVALID  # now from the negative cache
    assert warm(resolver, new).error is None
    assert secret_queries.count == queries


# ---- states and invalidation -----------------------------------------------------------


async def test_disabled_revoked_and_consumer_disabled_are_key_disabled(
    database: Database, resolver: KeyResolver
) -> None:
    cid = await new_consumer(database)
    a, b, c = [await new_key(database, cid, name=n) for n in "abc"]
    for k in (a, b, c):
        assert (await resolve(resolver, k.raw)).error is None
    await change(database, keys.update_key, a.key.id, status="disabled")
    assert (await resolve(resolver, a.raw)).error == "key_disabled"
    assert warm(resolver, b.raw).error is None  # another key of the same consumer stays
    await change(database, keys.revoke_key, b.key.id)
    assert (await resolve(resolver, b.raw)).error == "key_disabled"
    await change(database, keys.update_key, a.key.id, status="active")
    assert (await resolve(resolver, a.raw)).error is None
    await change(database, consumers.disable_consumer, cid)
    assert (await resolve(resolver, a.raw)).error == "key_disabled"
    assert (await resolve(resolver, c.raw)).error == "key_disabled"


async def test_invalidation_drops_exactly_the_changed_keys(
    database: Database, clock: Clock
) -> None:
    r = make_resolver(database, clock)  # not started: only the direct call delivers
    alice = await new_consumer(database)
    bob = await new_consumer(database, "bob@example.com")
    a1, a2 = (await new_key(database, alice)).raw, (await new_key(database, alice)).raw
    b1 = (await new_key(database, bob)).raw
    for raw in (a1, a2, b1):
        await resolve(r, raw)
    key_a1 = warm(r, a1).key_ref
    r.invalidate("key", key_a1.upper())  # any spelling of the UUID
    assert cold(r, a1)
    warm(r, a2)
    r.invalidate("consumer", str(alice))
    assert cold(r, a2)
    warm(r, b1)
    r.invalidate("plan", "gold")  # unknown kinds are ignored
    r.invalidate("key", "not-a-uuid")
    warm(r, b1)
    await asyncio.sleep(0.05)  # let the pending lookups above land
    assert r.stats()["inflight"] == 0


async def test_lookup_racing_a_change_is_answered_but_not_cached(
    database: Database, resolver: KeyResolver
) -> None:
    cid = await new_consumer(database)
    raw = (await new_key(database, cid)).raw
    # Hold the lookup at the database gate while a change arrives.
    gate = asyncio.Semaphore(0)
    resolver._slots = gate
    pending = resolver.resolve(raw.encode())
    assert inspect.isawaitable(pending)
    task = asyncio.ensure_future(pending)
    await asyncio.sleep(0.01)
    resolver.invalidate("consumer", str(cid))
    gate.release()
    assert (await task).error is None
    assert cold(resolver, raw)


async def test_outbox_poll_delivers_changes_made_elsewhere(
    database: Database, clock: Clock, resolver: KeyResolver
) -> None:
    """A change committed by another process (no announcement here) still arrives."""
    cid = await new_consumer(database)
    new = await new_key(database, cid)
    assert (await resolve(resolver, new.raw)).error is None
    async with database.sessions() as s:
        await keys.update_key(s, new.key.id, status="disabled")
        await s.commit()
    start = time.monotonic()
    async with asyncio.timeout(5):
        while not cold(resolver, new.raw):
            await asyncio.sleep(0.01)
    assert time.monotonic() - start < 1.0
    assert (await resolve(resolver, new.raw)).error == "key_disabled"


async def test_cache_is_bounded_and_evicted_keys_still_resolve(
    database: Database, clock: Clock
) -> None:
    r = make_resolver(database, clock, key_cache_size=3)
    cid = await new_consumer(database)
    raws = [(await new_key(database, cid)).raw for _ in range(5)]
    for raw in raws:
        assert (await resolve(r, raw)).error is None
    assert r.stats()["entries"] == 3
    # The oldest went first; the index forgot them too.
    assert cold(r, raws[0])
    assert sum(len(v) for v in r._by_consumer.values()) <= 3
    assert (await resolve(r, raws[0])).error is None


# ---- the database failing --------------------------------------------------------------


async def test_database_down_serves_stale_entries_and_refuses_unknown_ones(
    database: Database, clock: Clock, resolver: KeyResolver
) -> None:
    cid = await new_consumer(database)
    raw = (await new_key(database, cid)).raw
    other = (await new_key(database, cid)).raw
    assert (await resolve(resolver, raw)).error is None
    # A real connection failure: nothing listens on port 1.
    dead = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    resolver.database = dead
    try:
        clock.advance(61)  # past the TTL: the refresh fails, the entry keeps serving
        assert warm(resolver, raw).error is None
        await landed(resolver)
        assert resolver.lookup_errors == 1
        assert warm(resolver, raw).error is None  # not retried before RETRY_AFTER_ERROR
        assert resolver.stats()["inflight"] == 0
        # A key with no entry: refused at once while the database counts as down ...
        with pytest.raises(KeyStoreUnavailable):
            resolver.resolve(other.encode())
        # ... and tried again after that.
        clock.advance(RETRY_AFTER_ERROR)
        with pytest.raises(KeyStoreUnavailable):
            await resolve(resolver, other)
        assert resolver.lookup_errors == 2
        clock.advance(STALE_IF_ERROR)  # past stale-if-error too: refused
        with pytest.raises(KeyStoreUnavailable):
            await resolve(resolver, raw)
    finally:
        resolver.database = database
        await dead.dispose()
    clock.advance(RETRY_AFTER_ERROR)
    assert (await resolve(resolver, other)).error is None
    assert (await resolve(resolver, raw)).error is None


@pytest.mark.needs_postgres
async def test_database_that_stops_answering_cannot_hold_requests(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blackholed database (connections accepted, nothing answered): warm keys
    never notice, unknown keys are refused after LOOKUP_TIMEOUT and then at once."""
    monkeypatch.setattr(resolver_module, "LOOKUP_TIMEOUT", 0.5)
    async with pg_schema_database() as direct, FaultRelay("127.0.0.1", PG_PORT) as relay:
        db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/test",
                      schema=direct.schema)
        r = make_resolver(db, clock)
        try:
            cid = await new_consumer(direct)
            raw = (await new_key(direct, cid)).raw
            other = (await new_key(direct, cid)).raw
            assert (await resolve(r, raw)).error is None
            # Pooled connections closed first: from now on every connection is new,
            # and a new one gets no answer at all.
            await db.engine.dispose()
            relay.blackhole()
            for _ in range(100):
                assert warm(r, raw).error is None
            start = time.monotonic()
            with pytest.raises(KeyStoreUnavailable):
                await resolve(r, other)
            assert time.monotonic() - start < 2.0
            start = time.monotonic()
            with pytest.raises(KeyStoreUnavailable):
                await resolve(r, other)
            assert time.monotonic() - start < 0.05
            relay.passthrough()
            clock.advance(RETRY_AFTER_ERROR)
            assert (await resolve(r, other)).error is None
        finally:
            relay.passthrough()
            await db.dispose()


# ---- last_used_at ----------------------------------------------------------------------


async def last_used(db: Database, key_id: UUID) -> datetime | None:
    async with db.sessions() as s:
        return (await s.execute(select(ApiKey.last_used_at).where(ApiKey.id == key_id))).scalar()


async def test_last_used_is_written_in_batches(
    database: Database, clock: Clock, resolver: KeyResolver
) -> None:
    cid = await new_consumer(database)
    k1, k2 = await new_key(database, cid), await new_key(database, cid)
    updates = StatementCounter(database, "api_keys", "UPDATE")
    try:
        for _ in range(200):
            await resolve(resolver, k1.raw)
            await resolve(resolver, k2.raw)
        assert updates.count == 0  # nothing on the request path
        assert await last_used(database, k1.key.id) is None
        written = await resolver.flush_last_used()
        assert written == 2
        assert updates.count == 1 and updates.executemany == 1  # one batch for both
    finally:
        updates.close()
    expected = datetime.fromtimestamp(clock.now, UTC)
    for k in (k1, k2):
        at = await last_used(database, k.key.id)
        assert at is not None and abs((at - expected).total_seconds()) < 0.01
    assert await resolver.flush_last_used() == 0  # nothing new


async def test_refused_uses_are_not_noted(database: Database, resolver: KeyResolver) -> None:
    cid = await new_consumer(database)
    new = await new_key(database, cid)
    await change(database, keys.update_key, new.key.id, status="disabled")
    assert (await resolve(resolver, new.raw)).error == "key_disabled"
    assert resolver.used == {}


async def test_last_used_flushes_periodically_and_at_stop(
    database: Database, clock: Clock
) -> None:
    cid = await new_consumer(database)
    k1, k2 = await new_key(database, cid), await new_key(database, cid)
    r = make_resolver(database, clock, last_used_flush_interval=0.05)
    await r.start()
    try:
        await resolve(r, k1.raw)
        async with asyncio.timeout(5):
            while await last_used(database, k1.key.id) is None:
                await asyncio.sleep(0.02)
    finally:
        await r.stop()
    r = make_resolver(database, clock)  # hourly flushes: only stop() writes
    await r.start()
    await resolve(r, k2.raw)
    await r.stop()
    assert await last_used(database, k2.key.id) is not None


async def test_failed_flush_keeps_the_batch(database: Database, clock: Clock) -> None:
    cid = await new_consumer(database)
    new = await new_key(database, cid)
    r = make_resolver(database, clock)
    await resolve(r, new.raw)
    dead = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    r.database = dead
    try:
        assert await r.flush_last_used() == 0
        assert str(new.key.id) in r.used
    finally:
        r.database = database
        await dead.dispose()
    assert await r.flush_last_used() == 1
    assert await last_used(database, new.key.id) is not None

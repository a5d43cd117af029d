"""How changes reach key caches: the outbox reader, Redis pub/sub, the announcer.

Real SQLite and PostgreSQL for the outbox, the real Redis at 127.0.0.1:6379 for
pub/sub, and a closed port for "Redis is down".
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import event, func, select, update

from support.db import pg_schema_database, sqlite_database
from support.relay import FaultRelay
from tollway.identity import consumers, keys
from tollway.identity.changes import pending_changes, record_change
from tollway.identity.invalidation import (
    CHANNEL,
    Announcer,
    ChangeFeed,
    OutboxReader,
    decode,
    encode,
    listen_locally,
    stop_listening_locally,
)
from tollway.identity.resolver import KeyResolver, ResolvedKey
from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.storage.models import CacheInvalidation, utcnow

REDIS_URL = "redis://127.0.0.1:6379/0"
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"
PEPPER = b"test-pepper"


async def redis_or_skip() -> Redis:
    client: Redis = Redis.from_url(REDIS_URL)
    try:
        async with asyncio.timeout(2):
            await client.ping()
    except Exception:
        await client.aclose()
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    return client


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = await redis_or_skip()
    try:
        yield client
    finally:
        await client.aclose()


class Recorder:
    """An on_change/on_reset pair that remembers what it was told."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.resets = 0

    def invalidate(self, kind: str, ref: str) -> None:
        self.changes.append((kind, ref))

    def reset(self) -> None:
        self.resets += 1

    async def wait_for(self, change: tuple[str, str], timeout: float = 5.0) -> float:
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while change not in self.changes:
                await asyncio.sleep(0.005)
        return time.monotonic() - start


async def add_rows(db: Database, *changes: tuple[str, str], ids: list[int] | None = None) -> None:
    async with db.sessions() as s:
        for i, (kind, ref) in enumerate(changes):
            row = CacheInvalidation(kind=kind, ref=ref)
            if ids is not None:
                row.id = ids[i]
            s.add(row)
        await s.commit()


async def newest_id(db: Database) -> int:
    async with db.sessions() as s:
        return int((await s.execute(select(func.max(CacheInvalidation.id)))).scalar() or 0)


# ---- the message format ----------------------------------------------------------------


def test_messages_round_trip_and_junk_is_ignored() -> None:
    assert json.loads(encode(("key", "abc"))) == ["key", "abc"]
    assert decode(encode(("consumer", "x"))) == [("consumer", "x")]
    assert decode(b'[["key","a"],["consumer","b"]]') == [("key", "a"), ("consumer", "b")]
    for junk in (b"", b"nope", b"{}", b"[1,2]", b'["key"]', b"\xff", b'[["key", 1]]'):
        assert decode(junk) == []


# ---- the outbox reader -----------------------------------------------------------------


async def test_reader_starts_after_existing_rows_and_reads_new_ones_in_order(
    database: Database,
) -> None:
    await add_rows(database, ("key", "old-1"), ("key", "old-2"))
    reader = OutboxReader(database)
    await reader.start_position()
    assert await reader.read() == []
    await add_rows(database, ("key", "k1"), ("consumer", "c1"))
    await add_rows(database, ("key", "k2"))
    assert await reader.read() == [("key", "k1"), ("consumer", "c1"), ("key", "k2")]
    assert await reader.read() == []


async def test_reader_pages_through_large_backlogs(database: Database) -> None:
    reader = OutboxReader(database)
    await reader.start_position()
    await add_rows(database, *[("key", f"k{i}") for i in range(2500)])
    got = await reader.read()
    assert [ref for _, ref in got] == [f"k{i}" for i in range(2500)]


async def test_reader_catches_rows_that_commit_out_of_id_order(database: Database) -> None:
    """Ids skipped by a read are asked for again: a row that commits after a
    higher id was read is still delivered, once."""
    await add_rows(database, ("key", "first"))
    reader = OutboxReader(database)
    await reader.start_position()
    base = await newest_id(database)
    await add_rows(database, ("key", "third"), ids=[base + 3])
    assert await reader.read() == [("key", "third")]
    assert set(reader.gaps) == {base + 1, base + 2}
    await add_rows(database, ("key", "second"), ids=[base + 2])
    assert await reader.read() == [("key", "second")]
    assert set(reader.gaps) == {base + 1}
    assert await reader.read() == []


@pytest.mark.needs_postgres
async def test_reader_catches_a_concurrent_transaction_that_commits_late() -> None:
    """The real PostgreSQL case: transaction A takes an id, B takes the next and
    commits first; a reader in between must still see A's row once it commits.
    (SQLite serializes writers, so there ids always commit in order.)"""
    async with pg_schema_database() as database:
        reader = OutboxReader(database)
        await reader.start_position()
        async with database.sessions() as a:
            record_change(a, "key", "slow")
            await a.flush()  # id taken, not committed
            await add_rows(database, ("key", "fast"))
            assert await reader.read() == [("key", "fast")]
            await a.commit()
        assert await reader.read() == [("key", "slow")]


async def test_gaps_are_forgotten_after_their_deadline(database: Database) -> None:
    now = [1000.0]
    reader = OutboxReader(database, gap_ttl=30, clock=lambda: now[0])
    await reader.start_position()
    base = await newest_id(database)
    await add_rows(database, ("key", "b"), ids=[base + 2])
    await reader.read()
    assert set(reader.gaps) == {base + 1}
    now[0] += 31
    assert await reader.read() == []
    assert reader.gaps == {}


async def test_start_position_treats_recent_missing_ids_as_gaps(database: Database) -> None:
    await add_rows(database, ("key", "a"), ("key", "b"), ("key", "c"))
    top = await newest_id(database)
    async with database.sessions() as s:
        await s.execute(
            CacheInvalidation.__table__.delete().where(CacheInvalidation.id == top - 1)
        )
        await s.commit()
    reader = OutboxReader(database)
    await reader.start_position()
    assert top - 1 in reader.gaps
    # The row that was missing at start arrives late: delivered.
    await add_rows(database, ("key", "late"), ids=[top - 1])
    assert await reader.read() == [("key", "late")]


async def test_purge_deletes_old_rows_but_keeps_the_newest(database: Database) -> None:
    await add_rows(database, ("key", "a"), ("key", "b"), ("key", "c"))
    async with database.sessions() as s:
        await s.execute(
            update(CacheInvalidation).values(created_at=utcnow() - timedelta(hours=2))
        )
        await s.commit()
    await add_rows(database, ("key", "fresh"))
    reader = OutboxReader(database)
    assert await reader.purge(3600) == 3
    async with database.sessions() as s:
        refs = (await s.execute(select(CacheInvalidation.ref))).scalars().all()
    assert refs == ["fresh"]
    # Everything old: the newest row still stays, so ids never restart below readers.
    async with database.sessions() as s:
        await s.execute(
            update(CacheInvalidation).values(created_at=utcnow() - timedelta(hours=2))
        )
        await s.commit()
    top = await newest_id(database)
    assert await reader.purge(3600) == 0
    await reader.start_position()
    await add_rows(database, ("key", "next"))
    assert await reader.read() == [("key", "next")]
    assert await newest_id(database) > top


# ---- the change feed (poll + Redis) ----------------------------------------------------


@pytest.fixture
async def recorder() -> Recorder:
    return Recorder()


async def start_feed(
    database: Database, redis: Redis | None, recorder: Recorder, poll: float
) -> ChangeFeed:
    feed = ChangeFeed(
        database, redis, recorder.invalidate, recorder.reset, poll_interval=poll,
        redis_poll_interval=60.0,
    )
    await feed.start()
    return feed


async def test_feed_polls_changes_committed_with_their_change(
    database: Database, recorder: Recorder
) -> None:
    feed = await start_feed(database, None, recorder, 0.05)
    try:
        async with database.sessions() as s:
            consumer, _ = await consumers.create_or_get(s, email="a@example.com")
            await s.commit()
        async with database.sessions() as s:
            await consumers.update_consumer(s, consumer.id, status="disabled")
            await s.commit()  # committed, never announced
        waited = await recorder.wait_for(("consumer", str(consumer.id)))
        assert waited < 1.0
        assert recorder.resets == 0
    finally:
        await feed.stop()


async def test_idle_feed_on_sqlite_reads_nothing_until_something_commits(
    tmp_path: Path, recorder: Recorder
) -> None:
    """Polls while nothing commits cost no query (the data-version probe); a change
    committed by another connection still arrives within the second."""
    async with sqlite_database(tmp_path) as database, sqlite_database(
        tmp_path, migrate=False
    ) as writer:
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
        feed = await start_feed(database, None, recorder, 0.01)
        try:
            async with asyncio.timeout(5):
                while feed.skipped_polls < 1:
                    await asyncio.sleep(0.005)
            before, skipped = len(statements), feed.skipped_polls
            async with asyncio.timeout(5):
                while feed.skipped_polls < skipped + 20:
                    await asyncio.sleep(0.005)
            assert len(statements) == before  # twenty polls, not one query
            await add_rows(writer, ("key", "revoked"))
            waited = await recorder.wait_for(("key", "revoked"))
            assert waited < 1.0
            assert len(statements) > before
        finally:
            await feed.stop()
            event.remove(database.engine.sync_engine, "before_cursor_execute", seen)


async def test_feed_rolled_back_change_is_not_delivered(
    database: Database, recorder: Recorder
) -> None:
    feed = await start_feed(database, None, recorder, 0.02)
    try:
        async with database.sessions() as s:
            record_change(s, "key", "rolled-back")
            await s.flush()
            await s.rollback()
        await add_rows(database, ("key", "after"))
        await recorder.wait_for(("key", "after"))
        assert ("key", "rolled-back") not in recorder.changes
    finally:
        await feed.stop()


async def test_feed_starting_without_a_database_resets_once_it_can_read(
    database: Database, recorder: Recorder
) -> None:
    """Entries cached while the outbox position was unknown may have missed a
    change: the first successful read makes the cache forget everything."""
    dead = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    feed = ChangeFeed(dead, None, recorder.invalidate, recorder.reset, poll_interval=0.02)
    await feed.start()
    try:
        assert feed.reader.last_id is None
        async with asyncio.timeout(5):
            while feed.poll_errors < 2:
                await asyncio.sleep(0.01)
        assert recorder.resets == 0
        feed.reader.database = database  # the database is back
        async with asyncio.timeout(5):
            while recorder.resets == 0:
                await asyncio.sleep(0.01)
        await add_rows(database, ("key", "after"))
        await recorder.wait_for(("key", "after"))
        assert recorder.resets == 1
    finally:
        await feed.stop()
        await dead.dispose()


@pytest.mark.needs_redis
async def test_feed_hears_redis_at_once(
    database: Database, redis: Redis, recorder: Recorder
) -> None:
    # The poll runs once a minute here: only Redis can deliver in time.
    feed = await start_feed(database, redis, recorder, 60.0)
    try:
        async with asyncio.timeout(5):
            while not feed.subscribed:
                await asyncio.sleep(0.01)
        ref = str(uuid.uuid4())
        sent = await Announcer(redis).announce([("key", ref), ("consumer", ref)])
        assert sent == 2
        waited = await recorder.wait_for(("key", ref), timeout=2)
        await recorder.wait_for(("consumer", ref), timeout=2)
        assert waited < 0.5
        assert feed.redis_messages >= 2
    finally:
        await feed.stop()


@pytest.mark.needs_redis
async def test_feed_with_redis_down_polls_fast(database: Database, recorder: Recorder) -> None:
    dead: Redis = Redis.from_url(DEAD_REDIS_URL)
    feed = await start_feed(database, dead, recorder, 0.05)
    try:
        await add_rows(database, ("key", "via-poll"))
        waited = await recorder.wait_for(("key", "via-poll"))
        assert waited < 1.0
        assert not feed.subscribed
    finally:
        await feed.stop()
        await dead.aclose()


# ---- the announcer ---------------------------------------------------------------------


async def test_announcer_without_redis_tells_local_listeners() -> None:
    recorder = Recorder()
    listen_locally(recorder)
    try:
        assert await Announcer(None).announce([("key", "a"), ("key", "a"), ("consumer", "b")]) == 0
        assert recorder.changes == [("key", "a"), ("consumer", "b")]
        assert await Announcer(None).announce([]) == 0
    finally:
        stop_listening_locally(recorder)
    await Announcer(None).announce([("key", "c")])
    assert ("key", "c") not in recorder.changes


@pytest.mark.needs_redis
async def test_announcer_publishes_one_json_message_per_change(redis: Redis) -> None:
    pubsub = redis.pubsub()
    await pubsub.subscribe(CHANNEL)
    try:
        async with asyncio.timeout(5):
            while (await pubsub.get_message(timeout=1.0)) is None:
                pass  # the subscribe confirmation
        ref = str(uuid.uuid4())
        assert await Announcer(redis).announce([("key", ref), ("consumer", ref)]) == 2
        got: list[Any] = []
        async with asyncio.timeout(5):
            while len(got) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and ref in msg["data"].decode():
                    got.append(json.loads(msg["data"]))
        assert got == [["key", ref], ["consumer", ref]]
    finally:
        await pubsub.aclose()


@pytest.mark.needs_redis
async def test_announcer_survives_a_dead_redis() -> None:
    dead: Redis = Redis.from_url(DEAD_REDIS_URL)
    try:
        start = time.monotonic()
        assert await Announcer(dead).announce([("key", "x")]) == 0
        assert time.monotonic() - start < 2.0
    finally:
        await dead.aclose()


# ---- end to end through the resolver ---------------------------------------------------


@pytest.mark.needs_redis
async def test_resolver_with_redis_down_still_authenticates_and_invalidates(
    database: Database,
) -> None:
    dead: Redis = Redis.from_url(DEAD_REDIS_URL)
    resolver = KeyResolver(
        database, PEPPER, Settings(invalidation_poll_interval=0.05), dead
    )
    await resolver.start()
    try:
        async with database.sessions() as s:
            consumer, _ = await consumers.create_or_get(s, email="r@example.com")
            new = await keys.create_key(s, PEPPER, consumer_id=consumer.id)
            await s.commit()
        pending = resolver.resolve(new.raw.encode())
        assert not isinstance(pending, ResolvedKey)
        assert (await pending).error is None
        async with database.sessions() as s:
            await keys.update_key(s, new.key.id, status="disabled")
            changes = pending_changes(s)
            await s.commit()
        await Announcer(dead).announce(changes)
        async with asyncio.timeout(5):
            while True:
                result = resolver.resolve(new.raw.encode())
                if not isinstance(result, ResolvedKey):
                    result = await result
                if result.error == "key_disabled":
                    break
                await asyncio.sleep(0.01)
    finally:
        await resolver.stop()
        await dead.aclose()



# ---- Redis failing under a running feed (through the fault relay) ----------------------


async def committed_change(db: Database, ref: str) -> None:
    """A change committed by someone whose announcement never arrives."""
    await add_rows(db, ("key", ref))


@pytest.mark.needs_redis
@pytest.mark.parametrize("fault", ["reset", "blackhole"])
async def test_feed_survives_redis_failing_and_resubscribes(
    database: Database, redis: Redis, recorder: Recorder, fault: str
) -> None:
    async with FaultRelay("127.0.0.1", 6379) as relay:
        via_relay: Redis = Redis.from_url(f"redis://127.0.0.1:{relay.port}/0")
        feed = ChangeFeed(
            database, via_relay, recorder.invalidate, recorder.reset, poll_interval=0.05,
            redis_poll_interval=60.0,
        )
        await feed.start()
        try:
            async with asyncio.timeout(5):
                while not feed.subscribed:
                    await asyncio.sleep(0.01)
            getattr(relay, fault)()
            # A reset is seen at once; a blackhole by the missing PING answers.
            async with asyncio.timeout(10):
                while feed.subscribed:
                    await asyncio.sleep(0.02)
            ref = str(uuid.uuid4())
            await committed_change(database, ref)
            assert await recorder.wait_for(("key", ref)) < 1.0  # the fast poll
            relay.passthrough()
            async with asyncio.timeout(20):
                while not feed.subscribed:
                    await asyncio.sleep(0.02)
            ref = str(uuid.uuid4())
            await Announcer(redis).announce([("consumer", ref)])
            assert await recorder.wait_for(("consumer", ref), timeout=2) < 0.5
        finally:
            await feed.stop()
            await via_relay.aclose()

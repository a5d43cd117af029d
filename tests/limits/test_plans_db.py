"""Plans and grants in the database (identity/plans.py), and PlanBooks kept current
through the key resolver's change feed, on SQLite and PostgreSQL.

"Within 1 s" is measured by polling with a deadline; nothing sleeps to hide a race.
Two PlanBooks with their own engines stand for two gateway nodes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from tollway.identity import consumers
from tollway.identity import plans as store
from tollway.identity.changes import pending_changes
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.identity.invalidation import CHANNEL, encode
from tollway.identity.resolver import KeyResolver
from tollway.limits.plans import Plan, PlanBook, WindowSpec
from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.storage.models import Plan as PlanRow
from tollway.storage.models import utcnow

PEPPER = b"test-pepper"
REDIS_URL = "redis://127.0.0.1:6379/0"


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until predicate() holds (polled; fails after `timeout`)."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
    return time.monotonic() - start


async def new_user(db: Database, email: str, plan: str | None = None) -> uuid.UUID:
    async with db.sessions() as s:
        consumer, _ = await consumers.create_or_get(s, email=email, plan=plan)
        await s.commit()
        return consumer.id


async def new_plan(db: Database, name: str, **kw: Any) -> None:
    async with db.sessions() as s:
        await store.create_plan(s, name=name, **kw)
        await s.commit()


@asynccontextmanager
async def node(
    database: Database, redis: Redis | None = None, poll: float = 0.25
) -> AsyncIterator[tuple[KeyResolver, PlanBook]]:
    """What open_runtime builds for a data-plane process: a resolver and a PlanBook
    listening to its feed, on an engine of its own (as another node would have)."""
    db = Database(database.url, schema=database.schema)
    settings = Settings(invalidation_poll_interval=poll, last_used_flush_interval=3600.0)
    resolver = KeyResolver(db, PEPPER, settings, redis)
    await resolver.start()
    book = store.plan_book(db, refresh_interval=3600.0)
    resolver.add_change_listener(book.on_change, book.on_reset)
    try:
        await book.start()
        yield resolver, book
    finally:
        resolver.remove_change_listener(book.on_change, book.on_reset)
        await book.stop()
        await resolver.stop()
        await db.dispose()


# ---- plans ---------------------------------------------------------------------------


async def test_plan_crud_records_plan_changes(database: Database) -> None:
    async with database.sessions() as s:
        row = await store.create_plan(
            s,
            name="pro",
            limits=[{"per": "day", "limit": 1000}, {"per": "second", "limit": 5, "burst": 10}],
            description=" Pro ",
        )
        assert pending_changes(s) == [("plan", "pro")]
        await s.commit()
    assert row.limits == [
        {"per": "second", "limit": 5, "burst": 10},
        {"per": "day", "limit": 1000},
    ]
    assert row.description == "Pro"
    async with database.sessions() as s:
        got = await store.get_plan(s, "pro")
        assert store.plan_of(got) == Plan(
            "pro", (WindowSpec("second", 5, burst=10), WindowSpec("day", 1000)), "Pro"
        )
        with pytest.raises(Conflict) as dup:
            await store.create_plan(s, name="pro")
        assert dup.value.field == "name"
        with pytest.raises(NotFound):
            await store.get_plan(s, "missing")

    async with database.sessions() as s:
        await store.update_plan(s, "pro", limits=[WindowSpec("minute", 60)])
        await store.update_plan(s, "pro", description="Pro")  # unchanged: no change recorded
        assert pending_changes(s) == [("plan", "pro")]
        await s.commit()
    async with database.sessions() as s:
        assert (await store.get_plan(s, "pro")).limits == [{"per": "minute", "limit": 60}]
        with pytest.raises(InvalidInput) as bad:
            await store.update_plan(s, "pro", limits=[{"per": "day", "limit": 1, "burst": 2}])
        assert bad.value.field == "limits[0].burst"
        with pytest.raises(InvalidInput) as bad:
            await store.create_plan(s, name="no spaces")
        assert bad.value.field == "name"

    for i in range(5):
        await new_plan(database, f"p{i}")
    async with database.sessions() as s:
        first = await store.list_plans(s, limit=4)
        rest = await store.list_plans(s, cursor=first.next_cursor, limit=4)
    names = [p.name for p in first.items + rest.items]
    assert sorted(names) == ["p0", "p1", "p2", "p3", "p4", "pro"]
    assert names[0] == "p4" and rest.next_cursor is None

    async with database.sessions() as s:
        await store.delete_plan(s, "p0")
        assert pending_changes(s) == [("plan", "p0")]
        await s.commit()
    async with database.sessions() as s:
        with pytest.raises(NotFound):
            await store.delete_plan(s, "p0")


async def test_a_plan_in_use_cannot_be_deleted(database: Database) -> None:
    await new_plan(database, "gold")
    await new_user(database, "a@example.com", plan="gold")
    await new_user(database, "b@example.com", plan="gold")
    await new_user(database, "c@example.com", plan="other")
    async with database.sessions() as s:
        with pytest.raises(Conflict) as info:
            await store.delete_plan(s, "gold")
    assert "2 users" in info.value.message
    async with database.sessions() as s:
        assert (await store.get_plan(s, "gold")).name == "gold"
        await store.require_plan(s, "gold")
        with pytest.raises(InvalidInput) as missing:
            await store.require_plan(s, "other")
        assert missing.value.field == "plan"


async def test_assigning_and_deleting_a_plan_at_once_leave_no_dangling_name(
    database: Database,
) -> None:
    """Whichever commits first, the other one fails: the delete with a conflict,
    or the assignment because the plan is gone."""
    user = await new_user(database, "race@example.com")
    other = Database(database.url, schema=database.schema)
    try:
        # The assignment first (uncommitted), then the delete.
        await new_plan(database, "gold")
        async with database.sessions() as assign, other.sessions() as remove:
            await consumers.update_consumer(assign, user, plan="gold")
            await store.require_plan(assign, "gold")
            deleting = asyncio.create_task(store.delete_plan(remove, "gold"))
            await assign.commit()
            with pytest.raises(Conflict):
                await deleting
        # The delete first (uncommitted), then the assignment.
        await new_plan(database, "silver")
        async with database.sessions() as assign, other.sessions() as remove:
            await store.delete_plan(remove, "silver")

            async def assign_silver() -> None:
                await consumers.update_consumer(assign, user, plan="silver")
                await store.require_plan(assign, "silver")

            assigning = asyncio.create_task(assign_silver())
            await remove.commit()
            with pytest.raises(InvalidInput):
                await assigning
        async with database.sessions() as s:
            assert (await consumers.get_consumer(s, user)).plan == "gold"
            assert (await store.users_of(s, "silver")) == 0
    finally:
        await other.dispose()


# ---- grants --------------------------------------------------------------------------


async def test_grant_crud_and_validation(database: Database) -> None:
    user = await new_user(database, "g@example.com")
    now = utcnow()
    async with database.sessions() as s:
        g1 = await store.create_grant(
            s, user, per="minute", extra=50, expires_at=now + timedelta(hours=1), reason="launch"
        )
        g2 = await store.create_grant(
            s, user, per="day", extra=5, expires_at=now + timedelta(days=31)
        )
        assert pending_changes(s) == [("grant", str(user))]
        await s.commit()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"per": "week"}, "per"),
        ({"extra": 0}, "extra"),
        ({"expires_at": now - timedelta(seconds=1)}, "expires_at"),
        ({"expires_at": now + timedelta(days=31, seconds=5)}, "expires_at"),
        ({"reason": "x" * 201}, "reason"),
    ]
    async with database.sessions() as s:
        for change, field in bad:
            values: dict[str, Any] = {
                "per": "minute",
                "extra": 1,
                "expires_at": now + timedelta(hours=1),
                **change,
            }
            with pytest.raises(InvalidInput) as info:
                await store.create_grant(s, user, now=now, **values)
            assert info.value.field == field, change
        with pytest.raises(NotFound):
            await store.create_grant(
                s, uuid.uuid4(), per="minute", extra=1, expires_at=now + timedelta(hours=1)
            )

    async with database.sessions() as s:
        active = await store.list_grants(s, user)
        assert {g.id for g in active.items} == {g1.id, g2.id}
        later = await store.list_grants(s, user, now=now + timedelta(hours=2))
        assert [g.id for g in later.items] == [g2.id]
        with pytest.raises(NotFound):
            await store.list_grants(s, uuid.uuid4())

    async with database.sessions() as s:
        revoked = await store.revoke_grant(s, user, g2.id)
        assert revoked.revoked_at is not None
        assert pending_changes(s) == [("grant", str(user))]
        await s.commit()
    async with database.sessions() as s:
        again = await store.revoke_grant(s, user, g2.id)
        assert again.revoked_at == revoked.revoked_at
        assert pending_changes(s) == []
        with pytest.raises(NotFound):
            await store.revoke_grant(s, uuid.uuid4(), g1.id)
        assert [g.id for g in (await store.list_grants(s, user)).items] == [g1.id]
        every = await store.list_grants(s, user, include_inactive=True)
        assert {g.id for g in every.items} == {g1.id, g2.id}


async def test_load_all_gives_plans_and_live_grants_only(database: Database) -> None:
    user = await new_user(database, "l@example.com")
    await new_plan(database, "pro", limits=[{"per": "hour", "limit": 100}])
    now = utcnow()
    async with database.sessions() as s:
        live = await store.create_grant(
            s, user, per="hour", extra=7, expires_at=now + timedelta(hours=1)
        )
        gone = await store.create_grant(
            s, user, per="hour", extra=1, expires_at=now + timedelta(hours=1)
        )
        short = await store.create_grant(
            s, user, per="hour", extra=1, expires_at=now + timedelta(seconds=1), now=now
        )
        await store.revoke_grant(s, user, gone.id)
        # Edited by hand into something no plan may be: left out, the rest loads.
        s.add(PlanRow(name="broken", limits=[{"per": "week", "limit": 1}], description=""))
        await s.commit()
    plans, grants = await store.load_all(database)
    assert [p.name for p in plans] == ["pro"]
    assert {g.id for g in grants} <= {str(live.id), str(short.id)}
    assert str(live.id) in {g.id for g in grants}
    (loaded,) = [g for g in grants if g.id == str(live.id)]
    assert (loaded.consumer_id, loaded.per, loaded.extra) == (str(user), "hour", 7)
    assert loaded.expires_at == pytest.approx(live.expires_at.timestamp())


# ---- propagation -----------------------------------------------------------------------


async def test_every_node_sees_plan_and_grant_changes_within_a_second(
    database: Database,
) -> None:
    """Through the outbox poll alone: the change is committed and never announced."""
    user = await new_user(database, "n@example.com")
    async with node(database) as (_, book_a), node(database) as (_, book_b):
        books = (book_a, book_b)
        assert all(b.plan("pro") is None for b in books)

        await new_plan(database, "pro", limits=[{"per": "second", "limit": 5}])
        waited = await eventually(lambda: all(b.plan("pro") is not None for b in books))
        assert waited < 1.0

        async with database.sessions() as s:
            await store.update_plan(s, "pro", limits=[{"per": "second", "limit": 9}])
            await s.commit()
        waited = await eventually(
            lambda: all(b.plan("pro") == Plan("pro", (WindowSpec("second", 9),)) for b in books)
        )
        assert waited < 1.0

        async with database.sessions() as s:
            grant = await store.create_grant(
                s, user, per="second", extra=3, expires_at=utcnow() + timedelta(minutes=5)
            )
            await s.commit()
        waited = await eventually(lambda: all(b.grants(str(user), time.time()) for b in books))
        assert waited < 1.0
        assert book_a.grants(str(user), time.time())[0].extra == 3

        async with database.sessions() as s:
            await store.revoke_grant(s, user, grant.id)
            await store.delete_plan(s, "pro")
            await s.commit()
        waited = await eventually(
            lambda: all(
                b.plan("pro") is None and not b.grants(str(user), time.time()) for b in books
            )
        )
        assert waited < 1.0


async def test_a_reset_of_the_feed_reloads_the_book(database: Database) -> None:
    async with node(database, poll=3600.0) as (resolver, book):
        await new_plan(database, "quiet")
        before = book.generation
        resolver.reset()  # what the feed does when it lost continuity
        await eventually(lambda: book.plan("quiet") is not None)
        assert book.generation > before


@pytest.mark.needs_redis
async def test_redis_pub_sub_carries_plan_changes_at_once(database: Database) -> None:
    redis: Redis = Redis.from_url(REDIS_URL)
    try:
        try:
            async with asyncio.timeout(2):
                await redis.ping()
        except (OSError, TimeoutError) as exc:
            pytest.skip(f"Redis not reachable: {exc}")
        # The outbox poll runs every 30 s here: only Redis can deliver in time.
        async with node(database, redis, poll=30.0) as (resolver, book):
            await eventually(lambda: resolver.feed.subscribed)
            heard = resolver.feed.redis_messages
            name = f"r{uuid.uuid4().hex[:12]}"
            async with database.sessions() as s:
                await store.create_plan(s, name=name)
                changes = pending_changes(s)
                await s.commit()
            # Published by hand, not by Announcer: Announcer would also tell this
            # process's resolvers directly, and the point is the Redis path.
            for change in changes:
                await redis.publish(CHANNEL, encode(change))
            waited = await eventually(lambda: book.plan(name) is not None)
            assert waited < 1.0
            assert resolver.feed.redis_messages > heard
    finally:
        await redis.aclose()

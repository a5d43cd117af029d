"""Consumers: create-or-get by email, lookups, updates, listing, disabling.

Every database test runs on SQLite and on the real PostgreSQL (`database` fixture).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from tollway.identity import consumers, keys
from tollway.identity.apikeys import hash_key
from tollway.identity.changes import pending_changes
from tollway.identity.consumers import UNSET
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.storage.database import Database
from tollway.storage.models import ApiKey, CacheInvalidation, Consumer
from tollway.storage.pagination import MAX_LIMIT

PEPPER = b"consumer-tests-pepper"


async def _outbox(database: Database) -> list[tuple[str, str]]:
    async with database.sessions() as session:
        rows = await session.execute(
            select(CacheInvalidation.kind, CacheInvalidation.ref).order_by(CacheInvalidation.id)
        )
        return [(kind, ref) for kind, ref in rows]


# -- normalize_email (no database) ------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Alice@Example.COM", "alice@example.com"),
        ("  bob@example.com\n", "bob@example.com"),
        ("a.b+tag@sub.example.org", "a.b+tag@sub.example.org"),
        ("root@localhost", "root@localhost"),
    ],
)
def test_normalize_email_trims_and_lowercases(given: str, expected: str) -> None:
    assert consumers.normalize_email(given) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "no-at-sign",
        "@example.com",
        "alice@",
        "a@b@c",
        "a b@example.com",
        "a@example..com",
        "a@.example.com",
        "x" * 310 + "@example.com",
    ],
)
def test_normalize_email_rejects_what_is_not_an_address(bad: str) -> None:
    with pytest.raises(InvalidInput) as info:
        consumers.normalize_email(bad)
    assert info.value.field == "email"
    assert info.value.code == "validation_error"


# -- create_or_get ----------------------------------------------------------------


async def test_create_or_get_creates_once_per_normalized_email(database: Database) -> None:
    async with database.sessions() as session:
        created, was_created = await consumers.create_or_get(
            session, email=" Alice@Example.com ", name="Alice", plan="pro", metadata={"team": 7}
        )
        await session.commit()
    assert was_created is True
    assert created.email == "alice@example.com"
    assert (created.name, created.plan, created.metadata_, created.status) == (
        "Alice",
        "pro",
        {"team": 7},
        "active",
    )
    assert created.created_at.tzinfo is not None

    async with database.sessions() as session:
        again, was_created = await consumers.create_or_get(
            session, email="ALICE@example.COM", name="Someone else", plan="free"
        )
        await session.commit()
    assert was_created is False
    assert again.id == created.id
    # An existing consumer is returned as it is; the new name/plan are not applied.
    assert (again.name, again.plan) == ("Alice", "pro")

    async with database.sessions() as session:
        count = await session.scalar(select(func.count()).select_from(Consumer))
    assert count == 1


async def test_create_or_get_at_the_same_time_makes_one_consumer(database: Database) -> None:
    async def create() -> tuple[uuid.UUID, bool]:
        async with database.sessions() as session:
            consumer, created = await consumers.create_or_get(session, email="race@example.com")
            await session.commit()
            return consumer.id, created

    results = await asyncio.gather(*(create() for _ in range(5)))
    assert len({consumer_id for consumer_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"email": "nope"}, "email"),
        ({"email": "a@example.com", "name": "n" * 201}, "name"),
        ({"email": "a@example.com", "plan": ""}, "plan"),
        ({"email": "a@example.com", "plan": "p" * 65}, "plan"),
        ({"email": "a@example.com", "metadata": ["not", "a", "dict"]}, "metadata"),
    ],
)
async def test_create_or_get_validates_input(
    database: Database, kwargs: dict[str, object], field: str
) -> None:
    async with database.sessions() as session:
        with pytest.raises(InvalidInput) as info:
            await consumers.create_or_get(session, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# -- get --------------------------------------------------------------------------


async def test_get_consumer_and_get_by_email(database: Database) -> None:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="carol@example.com")
        await session.commit()
    async with database.sessions() as session:
        assert (await consumers.get_consumer(session, consumer.id)).email == "carol@example.com"
        assert (await consumers.get_by_email(session, " CAROL@example.com")).id == consumer.id
        with pytest.raises(NotFound) as info:
            await consumers.get_consumer(session, uuid.uuid4())
        assert info.value.code == "not_found"
        with pytest.raises(NotFound):
            await consumers.get_by_email(session, "nobody@example.com")
        with pytest.raises(InvalidInput):
            await consumers.get_by_email(session, "not an email")


# -- update -----------------------------------------------------------------------


async def test_update_to_another_consumers_email_is_a_conflict(database: Database) -> None:
    async with database.sessions() as session:
        alice, _ = await consumers.create_or_get(session, email="alice@example.com")
        bob, _ = await consumers.create_or_get(session, email="bob@example.com")
        await session.commit()
    async with database.sessions() as session:
        with pytest.raises(Conflict) as info:
            await consumers.update_consumer(session, bob.id, email="ALICE@example.com")
        assert info.value.code == "conflict"
        assert info.value.field == "email"
    async with database.sessions() as session:
        assert (await consumers.get_consumer(session, bob.id)).email == "bob@example.com"
        # Setting one's own email (in another case) is no conflict and no change.
        same = await consumers.update_consumer(session, alice.id, email="Alice@Example.com")
        assert same.email == "alice@example.com"
        assert pending_changes(session) == []


async def test_update_applies_only_given_fields_and_records_cached_changes(
    database: Database,
) -> None:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(
            session, email="dave@example.com", name="Dave", plan="pro", metadata={"a": 1}
        )
        await session.commit()
    before_update = consumer.updated_at

    # Metadata alone is not something the key resolver caches: no change recorded.
    async with database.sessions() as session:
        updated = await consumers.update_consumer(session, consumer.id, metadata={"b": 2})
        assert pending_changes(session) == []
        await session.commit()
    assert (updated.name, updated.plan, updated.metadata_) == ("Dave", "pro", {"b": 2})
    assert updated.updated_at >= before_update

    async with database.sessions() as session:
        updated = await consumers.update_consumer(
            session, consumer.id, email="D@Example.com", plan=None, status="disabled"
        )
        assert pending_changes(session) == [("consumer", str(consumer.id))]
        await session.commit()
    assert (updated.email, updated.plan, updated.status, updated.name) == (
        "d@example.com",
        None,
        "disabled",
        "Dave",
    )
    assert await _outbox(database) == [("consumer", str(consumer.id))]

    async with database.sessions() as session:
        again = await consumers.get_consumer(session, consumer.id)
        assert (again.email, again.plan, again.status, again.metadata_) == (
            "d@example.com",
            None,
            "disabled",
            {"b": 2},
        )
        # Unchanged values change nothing.
        await consumers.update_consumer(session, consumer.id, name=UNSET, plan=None)
        assert pending_changes(session) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"status": "revoked"}, "status"),
        ({"status": "ACTIVE"}, "status"),
        ({"email": "bad"}, "email"),
        ({"plan": 5}, "plan"),
        ({"name": None}, "name"),
        ({"metadata": {1: "x"}}, "metadata"),
    ],
)
async def test_update_validates_input(
    database: Database, kwargs: dict[str, object], field: str
) -> None:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="erin@example.com")
        with pytest.raises(InvalidInput) as info:
            await consumers.update_consumer(session, consumer.id, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


async def test_update_unknown_consumer_is_not_found(database: Database) -> None:
    async with database.sessions() as session:
        with pytest.raises(NotFound):
            await consumers.update_consumer(session, uuid.uuid4(), name="x")


# -- list -------------------------------------------------------------------------


async def _add_consumers(database: Database, stamps: list[datetime]) -> list[Consumer]:
    rows = [
        Consumer(
            email=f"user{i}@example.com",
            status="disabled" if i % 3 == 0 else "active",
            created_at=ts,
            updated_at=ts,
        )
        for i, ts in enumerate(stamps)
    ]
    async with database.sessions() as session:
        session.add_all(rows)
        await session.commit()
    return rows


async def test_list_pages_newest_first_without_duplicates_or_gaps(database: Database) -> None:
    t0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    # Several rows share a timestamp: the id breaks the tie across page boundaries.
    stamps = [
        t0,
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=1),
        t0 + timedelta(seconds=2),
        t0 + timedelta(seconds=2),
        t0 + timedelta(seconds=3),
    ]
    rows = await _add_consumers(database, stamps)
    expected = [r.id for r in sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)]

    seen: list[uuid.UUID] = []
    cursor = None
    pages = 0
    while True:
        async with database.sessions() as session:
            page = await consumers.list_consumers(session, cursor=cursor, limit=2)
        pages += 1
        seen.extend(c.id for c in page.items)
        if pages == 1:
            # Rows added while someone pages neither shift nor repeat what follows:
            # a newer one is simply not on later pages, an older one lands at the end.
            await _add_consumers(database, [])
            async with database.sessions() as session:
                newer = Consumer(email="newer@example.com", created_at=t0 + timedelta(hours=1))
                older = Consumer(email="older@example.com", created_at=t0 - timedelta(hours=1))
                session.add_all([newer, older])
                await session.commit()
            expected.append(older.id)
        if page.next_cursor is None:
            break
        assert len(page.items) == 2
        cursor = page.next_cursor
    assert seen == expected
    assert len(set(seen)) == len(seen)
    assert pages == 4


async def test_list_filters_by_status_and_email(database: Database) -> None:
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    rows = await _add_consumers(database, [t0 + timedelta(minutes=i) for i in range(6)])
    async with database.sessions() as session:
        disabled = await consumers.list_consumers(session, status="disabled")
        active = await consumers.list_consumers(session, status="active", limit=2)
        by_email = await consumers.list_consumers(session, email=" USER4@example.com")
        nobody = await consumers.list_consumers(session, email="nobody@example.com")
        with pytest.raises(InvalidInput) as info:
            await consumers.list_consumers(session, status="gone")
        assert info.value.field == "status"
    assert [c.email for c in disabled.items] == ["user3@example.com", "user0@example.com"]
    assert disabled.next_cursor is None
    assert [c.email for c in active.items] == ["user5@example.com", "user4@example.com"]
    assert active.next_cursor is not None
    async with database.sessions() as session:
        rest = await consumers.list_consumers(session, status="active", cursor=active.next_cursor)
    assert [c.email for c in rest.items] == ["user2@example.com", "user1@example.com"]
    assert [c.id for c in by_email.items] == [rows[4].id]
    assert nobody.items == [] and nobody.next_cursor is None


@pytest.mark.parametrize("cursor", ["garbage", "", "bm90LWpzb24", "WzEsMl0", "WyJ4IiwieSJd"])
async def test_list_with_a_bad_cursor_is_invalid_input(database: Database, cursor: str) -> None:
    async with database.sessions() as session:
        with pytest.raises(InvalidInput) as info:
            await consumers.list_consumers(session, cursor=cursor)
    assert info.value.field == "cursor"


async def test_list_limit_is_clamped(database: Database) -> None:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    await _add_consumers(database, [t0 + timedelta(seconds=i) for i in range(MAX_LIMIT + 1)])
    async with database.sessions() as session:
        one = await consumers.list_consumers(session, limit=0)
        capped = await consumers.list_consumers(session, limit=10_000)
    assert len(one.items) == 1 and one.next_cursor is not None
    assert len(capped.items) == MAX_LIMIT and capped.next_cursor is not None


# -- disable ----------------------------------------------------------------------


async def test_disable_consumer_revokes_every_key_and_records_changes(database: Database) -> None:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="frank@example.com")
        other, _ = await consumers.create_or_get(session, email="grace@example.com")
        first = await keys.create_key(session, PEPPER, consumer_id=consumer.id, name="one")
        second = await keys.create_key(session, PEPPER, consumer_id=consumer.id, name="two")
        already = await keys.create_key(session, PEPPER, consumer_id=consumer.id, name="old")
        others = await keys.create_key(session, PEPPER, consumer_id=other.id)
        await session.commit()
    async with database.sessions() as session:
        await keys.revoke_key(session, already.key.id)
        await session.commit()
    async with database.sessions() as session:
        revoked_before = (await keys.get_key(session, already.key.id)).revoked_at
    outbox_before = await _outbox(database)

    async with database.sessions() as session:
        disabled = await consumers.disable_consumer(session, consumer.id)
        changes = pending_changes(session)
        await session.commit()
    assert disabled.status == "disabled"
    assert changes[0] == ("consumer", str(consumer.id))
    assert sorted(changes[1:]) == sorted([("key", str(first.key.id)), ("key", str(second.key.id))])
    assert await _outbox(database) == outbox_before + changes

    async with database.sessions() as session:
        mine = (await keys.list_keys(session, consumer_id=consumer.id)).items
        assert {k.status for k in mine} == {"revoked"}
        assert all(k.revoked_at is not None for k in mine)
        # The key revoked earlier keeps when that happened.
        assert (await keys.get_key(session, already.key.id)).revoked_at == revoked_before
        assert (await keys.get_key(session, others.key.id)).status == "active"
        # History stays: the consumer and the rows are still there.
        assert (await consumers.get_consumer(session, consumer.id)).status == "disabled"
        assert await session.scalar(select(func.count()).select_from(ApiKey)) == 4
        # Their secrets no longer authenticate: the lookup reports the revoked key.
        found = await keys.lookup_secret(session, hash_key(PEPPER, first.raw), datetime.now(UTC))
        assert found is not None
        assert (found.key_status, found.consumer_status) == ("revoked", "disabled")
        with pytest.raises(Conflict):
            await keys.create_key(session, PEPPER, consumer_id=consumer.id)

    # Disabling again changes nothing and records nothing.
    async with database.sessions() as session:
        await consumers.disable_consumer(session, consumer.id)
        assert pending_changes(session) == []


async def test_disable_unknown_consumer_is_not_found(database: Database) -> None:
    async with database.sessions() as session:
        with pytest.raises(NotFound):
            await consumers.disable_consumer(session, uuid.uuid4())

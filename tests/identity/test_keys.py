"""API keys: creation (raw shown once, only the HMAC stored), lookup, updates,
rotation with a grace period, revocation, listing, last-used batches.

Every database test runs on SQLite and on the real PostgreSQL (`database` fixture).
Time-dependent behaviour passes `now` explicitly instead of sleeping.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tollway.identity import consumers, keys
from tollway.identity.apikeys import KEY_TYPE_PREFIX, display_prefix, hash_key, is_well_formed
from tollway.identity.changes import pending_changes
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.storage.database import Database
from tollway.storage.models import ApiKeySecret, Base, CacheInvalidation

PEPPER = b"key-tests-pepper"


def now() -> datetime:
    return datetime.now(UTC)


async def _consumer(database: Database, email: str = "owner@example.com") -> uuid.UUID:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email=email, name="Owner", plan="pro")
        await session.commit()
    return consumer.id


async def _new_key(database: Database, consumer_id: uuid.UUID, **kwargs: object) -> keys.NewKey:
    async with database.sessions() as session:
        new = await keys.create_key(session, PEPPER, consumer_id=consumer_id, **kwargs)  # type: ignore[arg-type]
        await session.commit()
    return new


async def _lookup(
    database: Database, raw: str, at: datetime | None = None
) -> keys.KeyLookup | None:
    async with database.sessions() as session:
        return await keys.lookup_secret(session, hash_key(PEPPER, raw), at or now())


async def _outbox(database: Database) -> list[tuple[str, str]]:
    async with database.sessions() as session:
        rows = await session.execute(
            select(CacheInvalidation.kind, CacheInvalidation.ref).order_by(CacheInvalidation.id)
        )
        return [(kind, ref) for kind, ref in rows]


# -- create -----------------------------------------------------------------------


async def test_create_returns_the_raw_key_once_and_stores_only_its_hmac(
    database: Database,
) -> None:
    consumer_id = await _consumer(database)
    expires = now() + timedelta(days=30)
    new = await _new_key(
        database,
        consumer_id,
        name="ci",
        limit_per_minute=60,
        limit_per_day=1000,
        scopes=["chat", "tag:images", "chat"],
        expires_at=expires,
    )
    assert is_well_formed(new.raw)
    assert new.key.prefix == display_prefix(new.raw)
    assert new.key.prefix.startswith(KEY_TYPE_PREFIX) and len(new.key.prefix) == 16
    assert (new.key.name, new.key.status, new.key.consumer_id) == ("ci", "active", consumer_id)
    assert (new.key.limit_per_minute, new.key.limit_per_day) == (60, 1000)
    assert new.key.scopes == ["chat", "tag:images"]

    async with database.sessions() as session:
        secrets = (await session.scalars(select(ApiKeySecret))).all()
        assert [(s.key_id, s.hash, s.expires_at) for s in secrets] == [
            (new.key.id, hash_key(PEPPER, new.raw), None)
        ]
        # Neither the raw key nor its secret part is anywhere in the database.
        body = new.raw[len(KEY_TYPE_PREFIX) :]
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                for value in row:
                    assert body not in str(value), f"raw key found in {table.name}"
                    assert new.raw not in str(value)
        stored = await keys.get_key(session, new.key.id)
        assert stored.expires_at == expires
        # Creating a key is no change any cache could hold.
        assert pending_changes(session) == []


async def test_create_for_unknown_or_disabled_consumer(database: Database) -> None:
    async with database.sessions() as session:
        with pytest.raises(NotFound):
            await keys.create_key(session, PEPPER, consumer_id=uuid.uuid4())
    consumer_id = await _consumer(database)
    async with database.sessions() as session:
        await consumers.update_consumer(session, consumer_id, status="disabled")
        await session.commit()
    async with database.sessions() as session:
        with pytest.raises(Conflict) as info:
            await keys.create_key(session, PEPPER, consumer_id=consumer_id)
    assert info.value.code == "conflict"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit_per_minute": 0}, "limit_per_minute"),
        ({"limit_per_minute": -5}, "limit_per_minute"),
        ({"limit_per_minute": True}, "limit_per_minute"),
        ({"limit_per_minute": "10"}, "limit_per_minute"),
        ({"limit_per_day": 0}, "limit_per_day"),
        ({"limit_per_day": 2**40}, "limit_per_day"),
        ({"scopes": "chat"}, "scopes"),
        ({"scopes": ["chat", 3]}, "scopes"),
        ({"scopes": [""]}, "scopes"),
        ({"expires_at": datetime(2020, 1, 1, tzinfo=UTC)}, "expires_at"),
        ({"expires_at": datetime(2999, 1, 1)}, "expires_at"),  # naive
        ({"name": "n" * 201}, "name"),
    ],
)
async def test_create_validates_input(
    database: Database, kwargs: dict[str, object], field: str
) -> None:
    consumer_id = await _consumer(database)
    async with database.sessions() as session:
        with pytest.raises(InvalidInput) as info:
            await keys.create_key(session, PEPPER, consumer_id=consumer_id, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.code == "validation_error"


# -- lookup -----------------------------------------------------------------------


async def test_lookup_returns_the_key_and_its_consumer(database: Database) -> None:
    consumer_id = await _consumer(database, "Lookup@Example.com")
    expires = now() + timedelta(days=1)
    new = await _new_key(
        database,
        consumer_id,
        name="svc",
        scopes=["a", "tag:b"],
        limit_per_minute=5,
        expires_at=expires,
    )
    found = await _lookup(database, new.raw)
    assert found == keys.KeyLookup(
        key_id=new.key.id,
        consumer_id=consumer_id,
        consumer_email="lookup@example.com",
        consumer_name="Owner",
        consumer_status="active",
        consumer_plan="pro",
        key_name="svc",
        key_status="active",
        key_expires_at=expires,
        secret_expires_at=None,
        scopes=("a", "tag:b"),
        limit_per_minute=5,
        limit_per_day=None,
    )
    # Unknown keys, another pepper's hash, or a hash of the wrong shape: nothing.
    other = "tw_live_" + "0" * 49
    assert await _lookup(database, other) is None
    async with database.sessions() as session:
        assert await keys.lookup_secret(session, hash_key(b"other", new.raw), now()) is None
        assert await keys.lookup_secret(session, hash_key(PEPPER, new.raw).upper(), now()) is None
        assert await keys.lookup_secret(session, "", now()) is None


async def test_lookup_does_not_filter_status_or_key_expiry(database: Database) -> None:
    consumer_id = await _consumer(database)
    new = await _new_key(database, consumer_id, expires_at=now() + timedelta(minutes=5))
    async with database.sessions() as session:
        await keys.update_key(session, new.key.id, status="disabled")
        await consumers.update_consumer(session, consumer_id, status="disabled")
        await session.commit()
    # The resolver turns these into 403 key_disabled / key_expired, so it needs the row.
    found = await _lookup(database, new.raw, now() + timedelta(days=1))
    assert found is not None
    assert (found.key_status, found.consumer_status) == ("disabled", "disabled")
    assert found.key_expires_at is not None and found.key_expires_at < now() + timedelta(days=1)


# -- rotate -----------------------------------------------------------------------


async def test_rotate_keeps_the_old_secret_for_the_grace_period(database: Database) -> None:
    consumer_id = await _consumer(database)
    old = await _new_key(database, consumer_id, name="rotating")
    before = now()
    async with database.sessions() as session:
        new = await keys.rotate_key(session, PEPPER, old.key.id, grace=timedelta(hours=2))
        assert pending_changes(session) == [("key", str(old.key.id))]
        await session.commit()
    after = now()
    assert new.key.id == old.key.id
    assert new.raw != old.raw and is_well_formed(new.raw)
    assert new.key.prefix == display_prefix(new.raw)
    assert await _outbox(database) == [("key", str(old.key.id))]

    # Both work during the grace period.
    for at in (after, before + timedelta(hours=2) - timedelta(seconds=1)):
        old_found = await _lookup(database, old.raw, at)
        new_found = await _lookup(database, new.raw, at)
        assert old_found is not None and new_found is not None
        assert old_found.key_id == new_found.key_id == old.key.id
        assert old_found.secret_expires_at is not None
        assert before + timedelta(hours=2) <= old_found.secret_expires_at
        assert old_found.secret_expires_at <= after + timedelta(hours=2)
        assert new_found.secret_expires_at is None
    # Then the old one stops, without anyone acting; the new one goes on.
    later = after + timedelta(hours=2)
    assert await _lookup(database, old.raw, later) is None
    assert await _lookup(database, new.raw, later + timedelta(days=365)) is not None

    async with database.sessions() as session:
        listed = await keys.get_key(session, old.key.id)
    assert listed.prefix == display_prefix(new.raw)


async def test_rotate_with_zero_grace_stops_the_old_secret_at_once(database: Database) -> None:
    consumer_id = await _consumer(database)
    old = await _new_key(database, consumer_id)
    async with database.sessions() as session:
        new = await keys.rotate_key(session, PEPPER, old.key.id, grace=timedelta(0))
        await session.commit()
    assert await _lookup(database, old.raw) is None
    assert await _lookup(database, new.raw) is not None


async def test_rotating_again_never_extends_an_older_secret(database: Database) -> None:
    consumer_id = await _consumer(database)
    first = await _new_key(database, consumer_id)
    async with database.sessions() as session:
        second = await keys.rotate_key(session, PEPPER, first.key.id, grace=timedelta(minutes=10))
        await session.commit()
    async with database.sessions() as session:
        third = await keys.rotate_key(session, PEPPER, first.key.id, grace=timedelta(hours=5))
        await session.commit()
    at = now() + timedelta(minutes=11)
    assert await _lookup(database, first.raw, at) is None
    assert await _lookup(database, second.raw, at) is not None
    assert await _lookup(database, third.raw, at) is not None
    assert await _lookup(database, second.raw, now() + timedelta(hours=5, seconds=1)) is None

    # Expired secrets are cleared out by the next rotation.
    async with database.sessions() as session:
        await keys.rotate_key(session, PEPPER, first.key.id, grace=timedelta(0))
        await session.commit()
    async with database.sessions() as session:
        await keys.rotate_key(session, PEPPER, first.key.id, grace=timedelta(0))
        await session.commit()
        count = len((await session.scalars(select(ApiKeySecret.hash))).all())
    # The newest secret, plus the previous one (expired "now", deleted next time).
    assert count == 2


async def test_rotate_refuses_keys_that_are_not_active(database: Database) -> None:
    consumer_id = await _consumer(database)
    disabled = await _new_key(database, consumer_id)
    revoked = await _new_key(database, consumer_id)
    async with database.sessions() as session:
        await keys.update_key(session, disabled.key.id, status="disabled")
        await keys.revoke_key(session, revoked.key.id)
        await session.commit()
    async with database.sessions() as session:
        for key_id in (disabled.key.id, revoked.key.id):
            with pytest.raises(Conflict):
                await keys.rotate_key(session, PEPPER, key_id)
        with pytest.raises(NotFound):
            await keys.rotate_key(session, PEPPER, uuid.uuid4())
        for bad in (timedelta(seconds=-1), timedelta(days=366)):
            with pytest.raises(InvalidInput) as info:
                await keys.rotate_key(session, PEPPER, disabled.key.id, grace=bad)
            assert info.value.field == "grace"
    # Nothing changed: the old secrets are as they were.
    assert (await _lookup(database, disabled.raw)) is not None


# -- revoke -----------------------------------------------------------------------


async def test_revoke_keeps_the_row_and_the_key_stops_authenticating(database: Database) -> None:
    consumer_id = await _consumer(database)
    new = await _new_key(database, consumer_id)
    async with database.sessions() as session:
        revoked = await keys.revoke_key(session, new.key.id)
        assert pending_changes(session) == [("key", str(new.key.id))]
        await session.commit()
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    found = await _lookup(database, new.raw)
    assert found is not None and found.key_status == "revoked"

    async with database.sessions() as session:
        # Revoking again is a no-op; the row is still listed for usage history.
        again = await keys.revoke_key(session, new.key.id)
        assert again.revoked_at == revoked.revoked_at
        assert pending_changes(session) == []
        listed = await keys.list_keys(session, consumer_id=consumer_id)
        assert [k.id for k in listed.items] == [new.key.id]
        # A revoked key never comes back.
        for status in ("active", "disabled"):
            with pytest.raises(Conflict) as info:
                await keys.update_key(session, new.key.id, status=status)
            assert info.value.field == "status"
        with pytest.raises(NotFound):
            await keys.revoke_key(session, uuid.uuid4())
    found = await _lookup(database, new.raw)
    assert found is not None and found.key_status == "revoked"


# -- update -----------------------------------------------------------------------


async def test_update_key_fields_and_status(database: Database) -> None:
    consumer_id = await _consumer(database)
    new = await _new_key(database, consumer_id, name="a", limit_per_minute=10, scopes=["x"])
    expires = now() + timedelta(days=3)
    async with database.sessions() as session:
        updated = await keys.update_key(
            session,
            new.key.id,
            name="b",
            status="disabled",
            limit_per_minute=None,
            limit_per_day=500,
            scopes=["y", "tag:z"],
            expires_at=expires,
        )
        assert pending_changes(session) == [("key", str(new.key.id))]
        await session.commit()
    assert (updated.name, updated.status, updated.limit_per_minute, updated.limit_per_day) == (
        "b",
        "disabled",
        None,
        500,
    )
    found = await _lookup(database, new.raw)
    assert found is not None
    assert (found.key_name, found.key_status, found.scopes, found.key_expires_at) == (
        "b",
        "disabled",
        ("y", "tag:z"),
        expires,
    )

    async with database.sessions() as session:
        await keys.update_key(session, new.key.id, status="active", expires_at=None, scopes=[])
        await session.commit()
    found = await _lookup(database, new.raw)
    assert found is not None
    assert (found.key_status, found.key_expires_at, found.scopes) == ("active", None, ())

    async with database.sessions() as session:
        # Only given fields change, and no change records nothing.
        same = await keys.update_key(session, new.key.id, name="b")
        assert same.limit_per_day == 500
        assert pending_changes(session) == []
    assert await _outbox(database) == [("key", str(new.key.id))] * 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"status": "revoked"}, "status"),
        ({"status": "on"}, "status"),
        ({"limit_per_minute": 0}, "limit_per_minute"),
        ({"limit_per_day": -1}, "limit_per_day"),
        ({"scopes": "x"}, "scopes"),
        ({"expires_at": datetime(2001, 1, 1, tzinfo=UTC)}, "expires_at"),
        ({"name": 3}, "name"),
    ],
)
async def test_update_key_validates_input(
    database: Database, kwargs: dict[str, object], field: str
) -> None:
    consumer_id = await _consumer(database)
    new = await _new_key(database, consumer_id)
    async with database.sessions() as session:
        with pytest.raises(InvalidInput) as info:
            await keys.update_key(session, new.key.id, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    async with database.sessions() as session:
        with pytest.raises(NotFound):
            await keys.update_key(session, uuid.uuid4(), name="x")


# -- list -------------------------------------------------------------------------


async def test_list_keys_filters_and_pages(database: Database) -> None:
    alice = await _consumer(database, "alice@example.com")
    bob = await _consumer(database, "bob@example.com")
    made = [await _new_key(database, alice, name=f"a{i}") for i in range(5)]
    await _new_key(database, bob, name="b0")
    async with database.sessions() as session:
        await keys.revoke_key(session, made[1].key.id)
        await keys.update_key(session, made[2].key.id, status="disabled")
        await session.commit()

    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        async with database.sessions() as session:
            page = await keys.list_keys(session, consumer_id=alice, cursor=cursor, limit=2)
        seen.extend(k.id for k in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    expected = sorted(made, key=lambda n: (n.key.created_at, n.key.id), reverse=True)
    assert seen == [n.key.id for n in expected]

    async with database.sessions() as session:
        revoked = await keys.list_keys(session, status="revoked")
        disabled = await keys.list_keys(session, consumer_id=alice, status="disabled")
        active = await keys.list_keys(session, status="active")
        nobody = await keys.list_keys(session, consumer_id=uuid.uuid4())
        with pytest.raises(InvalidInput) as info:
            await keys.list_keys(session, status="deleted")
        assert info.value.field == "status"
        with pytest.raises(InvalidInput) as info:
            await keys.list_keys(session, cursor="%%%")
        assert info.value.field == "cursor"
    assert [k.id for k in revoked.items] == [made[1].key.id]
    assert [k.id for k in disabled.items] == [made[2].key.id]
    assert {k.name for k in active.items} == {"a0", "a3", "a4", "b0"}
    assert nobody.items == []


# -- last used --------------------------------------------------------------------


async def test_touch_last_used_only_moves_forward_and_is_not_an_edit(
    database: Database,
) -> None:
    consumer_id = await _consumer(database)
    one = await _new_key(database, consumer_id)
    two = await _new_key(database, consumer_id)
    t = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    async with database.sessions() as session:
        await keys.touch_last_used(session, {})
        await keys.touch_last_used(
            session, {one.key.id: t, two.key.id: t - timedelta(hours=1), uuid.uuid4(): t}
        )
        await session.commit()
    async with database.sessions() as session:
        # An older batch (another worker's, arriving late) does not move it back.
        await keys.touch_last_used(
            session, {one.key.id: t - timedelta(minutes=1), two.key.id: t + timedelta(minutes=1)}
        )
        await session.commit()
    async with database.sessions() as session:
        first = await keys.get_key(session, one.key.id)
        second = await keys.get_key(session, two.key.id)
    assert first.last_used_at == t
    assert second.last_used_at == t + timedelta(minutes=1)
    assert first.updated_at == one.key.updated_at
    assert second.updated_at == two.key.updated_at
    assert await _outbox(database) == []

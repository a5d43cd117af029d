"""The change outbox: written in the same transaction as the change it describes."""

from __future__ import annotations

from sqlalchemy import select

from tollway.identity import consumers, keys
from tollway.identity.changes import pending_changes, record_change
from tollway.storage.database import Database
from tollway.storage.models import CacheInvalidation

PEPPER = b"change-tests-pepper"


async def _outbox(database: Database) -> list[tuple[str, str]]:
    async with database.sessions() as session:
        rows = await session.execute(
            select(CacheInvalidation.kind, CacheInvalidation.ref).order_by(CacheInvalidation.id)
        )
        return [(kind, ref) for kind, ref in rows]


async def test_recorded_changes_commit_with_the_session(database: Database) -> None:
    async with database.sessions() as session:
        assert pending_changes(session) == []
        record_change(session, "key", "k1")
        record_change(session, "consumer", "c1")
        record_change(session, "key", "k1")
        # Remembered for announcing after commit, oldest first, without repeats.
        assert pending_changes(session) == [("key", "k1"), ("consumer", "c1")]
        assert await _outbox(database) == []  # not visible before commit
        await session.commit()
        assert pending_changes(session) == [("key", "k1"), ("consumer", "c1")]
    assert await _outbox(database) == [("key", "k1"), ("consumer", "c1"), ("key", "k1")]
    async with database.sessions() as session:
        rows = (await session.scalars(select(CacheInvalidation))).all()
    assert all(row.created_at.tzinfo is not None for row in rows)
    assert rows[0].id < rows[1].id < rows[2].id


async def test_a_rolled_back_change_leaves_no_outbox_row(database: Database) -> None:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="hal@example.com")
        new = await keys.create_key(session, PEPPER, consumer_id=consumer.id)
        await session.commit()

    async with database.sessions() as session:
        await keys.revoke_key(session, new.key.id)
        await consumers.update_consumer(session, consumer.id, status="disabled")
        assert pending_changes(session) == [
            ("key", str(new.key.id)),
            ("consumer", str(consumer.id)),
        ]
        await session.rollback()

    assert await _outbox(database) == []
    async with database.sessions() as session:
        assert (await keys.get_key(session, new.key.id)).status == "active"
        assert (await consumers.get_consumer(session, consumer.id)).status == "active"

    # The same change committed leaves exactly its rows.
    async with database.sessions() as session:
        await keys.revoke_key(session, new.key.id)
        await session.commit()
    assert await _outbox(database) == [("key", str(new.key.id))]

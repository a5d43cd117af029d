"""The test database fixture: a migrated, empty database on each backend."""

from __future__ import annotations

from sqlalchemy import func, select

from tollway.storage.database import Database
from tollway.storage.models import Consumer


async def test_fixture_gives_an_empty_migrated_database(database: Database) -> None:
    async with database.sessions() as session:
        session.add(Consumer(email="a@example.com"))
        await session.commit()
        count = await session.scalar(select(func.count()).select_from(Consumer))
    assert count == 1

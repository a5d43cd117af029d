"""PLACEHOLDER (being replaced by Alembic): bring the schema up to date."""

from __future__ import annotations

from tollway.storage.database import Database
from tollway.storage.models import Base


async def upgrade(database: Database) -> None:
    async with database.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)

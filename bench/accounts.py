"""Databases for the key-auth and usage scenarios: one consumer, one key, row counts.

The benchmark provisions through Tollway's own domain functions (the same ones the
admin API calls), so what it measures is a key the way an operator would create it.
PostgreSQL runs at 127.0.0.1:5432 (user postgres, trust); each run gets a fresh
database, dropped at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from sqlalchemy import func, select

from tollway.identity.apikeys import load_pepper
from tollway.identity.consumers import create_or_get
from tollway.identity.keys import create_key
from tollway.storage.database import Database, default_url
from tollway.storage.migrate import upgrade
from tollway.storage.models import UsageRecord

PG = "postgresql+asyncpg://postgres@127.0.0.1:5432"


def sqlite_url(data_dir: Path) -> str:
    return default_url(data_dir)


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="test")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_pg_database() -> str:
    name = f"tollway_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    return f"{PG}/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _provision(url: str, data_dir: Path) -> str:
    db = Database(url)
    try:
        await upgrade(db)
        pepper = load_pepper(None, data_dir)
        async with db.sessions() as session:
            consumer, _ = await create_or_get(session, email="bench@example.com", name="bench")
            new = await create_key(session, pepper, consumer_id=consumer.id, name="bench")
            await session.commit()
        return new.raw
    finally:
        await db.dispose()


def provision(url: str, data_dir: Path) -> str:
    """Migrate, create a consumer and a key; returns the raw key."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(_provision(url, data_dir))


async def _count(url: str) -> int:
    db = Database(url)
    try:
        async with db.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(UsageRecord)) or 0)
    finally:
        await db.dispose()


def usage_rows(url: str) -> int:
    return asyncio.run(_count(url))

"""Databases for tests: SQLite in a temporary file, or the real PostgreSQL.

Each PostgreSQL test gets its own schema (repository tests) or its own database
(gateway processes, which take only a URL), dropped afterwards, so tests never
see each other's rows. PostgreSQL runs at 127.0.0.1:5432 (database `test`, user
`postgres`, trust auth); a test that needs it is marked needs_postgres and, in
CI, fails rather than skips when it is missing (tests/conftest.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tollway.storage.database import Database, default_url
from tollway.storage.migrate import upgrade

PG_HOST = os.environ.get("TOLLWAY_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TOLLWAY_TEST_PG_PORT", "5432"))
PG_ADMIN_URL = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/test"


def pg_url(database: str = "test") -> str:
    return f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{database}"


async def _pg_execute(sql: str, database: str = "test") -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user="postgres", database=database)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def pg_available() -> bool:
    try:
        await _pg_execute("SELECT 1")
    except (OSError, Exception):  # asyncpg raises its own types too
        return False
    return True


async def require_pg() -> None:
    if not await pg_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}")


@asynccontextmanager
async def pg_schema_database(migrate: bool = True) -> AsyncIterator[Database]:
    """A Database whose search_path is a fresh schema, dropped afterwards."""
    await require_pg()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    await _pg_execute(f'CREATE SCHEMA "{schema}"')
    db = Database(PG_ADMIN_URL, schema=schema)
    try:
        if migrate:
            await upgrade(db)
        yield db
    finally:
        await db.dispose()
        await _pg_execute(f'DROP SCHEMA "{schema}" CASCADE')


@asynccontextmanager
async def pg_fresh_database_url() -> AsyncIterator[str]:
    """A URL to a fresh, empty PostgreSQL database, dropped afterwards.

    For gateway processes, which are configured by TOLLWAY_DATABASE_URL alone.
    """
    await require_pg()
    name = f"t_{uuid.uuid4().hex[:16]}"
    await _pg_execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_url(name)
    finally:
        await _pg_execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@asynccontextmanager
async def sqlite_database(tmp_path: Path, migrate: bool = True) -> AsyncIterator[Database]:
    db = Database(default_url(tmp_path))
    try:
        if migrate:
            await upgrade(db)
        yield db
    finally:
        await db.dispose()


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.needs_postgres),
]


@pytest.fixture(params=BACKENDS)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated, empty database; every test using it runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        async with sqlite_database(tmp_path) as db:
            yield db
    else:
        async with pg_schema_database() as db:
            yield db

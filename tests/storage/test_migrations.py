"""Alembic migrations: they build exactly the models' schema, on SQLite and on
PostgreSQL (in the test's own schema), are idempotent, and are safe when several
processes upgrade the same database at once."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection

from support.db import BACKENDS, pg_schema_database, sqlite_database
from tollway.storage import migrate
from tollway.storage.database import Database
from tollway.storage.migrations import MIGRATIONS_DIR
from tollway.storage.models import Base, Consumer

MODEL_TABLES = {t.name for t in Base.metadata.sorted_tables}


@pytest.fixture(params=BACKENDS)
async def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database that has never been migrated, on each backend."""
    if request.param == "sqlite":
        async with sqlite_database(tmp_path, migrate=False) as db:
            yield db
    else:
        async with pg_schema_database(migrate=False) as db:
            yield db


def _same_target(db: Database) -> Database:
    """Another engine on the same database, as another process would have."""
    return Database(db.url, schema=db.schema)


async def _tables(db: Database) -> set[str]:
    async with db.engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


def _diffs(conn: Connection) -> list[object]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def test_migrations_ship_with_the_package() -> None:
    # Resolved from the installed package, not from a working directory or ini file.
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()
    newest = max(p.name.split("_", 1)[0] for p in (MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert migrate.head_revision() == newest
    # The start-up check compares with this constant so that it need not import Alembic.
    assert newest == migrate.HEAD_REVISION


async def test_migrations_build_exactly_the_models_schema(database: Database) -> None:
    async with database.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
    assert await _tables(database) == MODEL_TABLES | {"alembic_version"}
    assert await migrate.current_revision(database) == migrate.head_revision()


@pytest.mark.needs_postgres
async def test_postgres_tables_land_in_the_databases_schema(tmp_path: Path) -> None:
    async with pg_schema_database() as db:
        assert db.schema is not None
        async with db.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": db.schema},
            )
            in_schema = {name for (name,) in rows}
            version = await conn.scalar(
                text(f'SELECT version_num FROM "{db.schema}".alembic_version')
            )
    assert in_schema == MODEL_TABLES | {"alembic_version"}
    assert version == migrate.head_revision()


async def test_is_current_false_when_empty_true_after_upgrade(empty_database: Database) -> None:
    assert await migrate.current_revision(empty_database) is None
    assert await migrate.is_current(empty_database) is False
    assert await _tables(empty_database) == set()

    await migrate.upgrade(empty_database)

    assert await migrate.is_current(empty_database) is True
    assert await migrate.current_revision(empty_database) == migrate.head_revision()


async def test_upgrading_again_is_a_no_op_that_keeps_data(database: Database) -> None:
    async with database.sessions() as session:
        session.add(Consumer(email="kept@example.com"))
        await session.commit()

    await migrate.upgrade(database)
    await migrate.upgrade(database)
    # Naming the revision skips the "already current" shortcut: the locked path
    # must find nothing to do as well.
    await migrate.upgrade(database, migrate.head_revision())

    assert await migrate.is_current(database)
    async with database.sessions() as session:
        emails = (await session.scalars(select(Consumer.email))).all()
    assert emails == ["kept@example.com"]
    async with database.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert versions == [(migrate.head_revision(),)]


async def test_downgrade_to_base_and_back(database: Database) -> None:
    def downgrade(conn: Connection) -> None:
        command.downgrade(migrate.alembic_config(conn), "base")

    async with database.engine.begin() as conn:
        await conn.run_sync(downgrade)
    assert await _tables(database) == {"alembic_version"}
    assert await migrate.current_revision(database) is None

    await migrate.upgrade(database)
    assert await migrate.is_current(database)
    assert await _tables(database) == MODEL_TABLES | {"alembic_version"}


async def test_concurrent_upgrades_in_one_process_all_succeed(empty_database: Database) -> None:
    others = [_same_target(empty_database) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate.upgrade(db) for db in [empty_database, *others]))
    finally:
        for db in others:
            await db.dispose()
    assert await migrate.is_current(empty_database)
    async with empty_database.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    assert versions == [(migrate.head_revision(),)]


UPGRADER = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path

    from tollway.storage.database import Database
    from tollway.storage.migrate import upgrade

    url, schema, barrier, me = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3]), sys.argv[4]

    async def main() -> None:
        db = Database(url, schema=schema)
        # Everything is imported and the engine made: say so, then wait for the go.
        (barrier / f"ready-{me}").touch()
        deadline = time.monotonic() + 30
        while not (barrier / "go").exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            await asyncio.sleep(0.005)
        try:
            await upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(main())
    """
)


async def test_processes_starting_together_upgrade_safely(
    empty_database: Database, tmp_path: Path
) -> None:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    count = 2
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            UPGRADER,
            empty_database.url,
            empty_database.schema or "",
            str(barrier),
            str(i),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(count)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.glob("ready-*"))) < count:
            assert all(p.returncode is None for p in procs), "an upgrader exited early"
            assert time.monotonic() < deadline, "upgraders never got ready"
            await asyncio.sleep(0.01)
        (barrier / "go").touch()
        results = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err.decode()
    assert await migrate.is_current(empty_database)
    async with empty_database.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []

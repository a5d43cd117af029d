"""The database: one async engine and session factory per process.

SQLite (aiosqlite) is the embedded default, in WAL mode with a busy timeout so that
several worker processes can share the file; `TOLLWAY_DATABASE_URL` switches to
PostgreSQL (asyncpg) with the same models and migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util.concurrency import await_

from tollway.storage.change_probe import DataVersionProbe

if TYPE_CHECKING:
    from sqlalchemy.dialects.postgresql import Insert as PgInsert
    from sqlalchemy.dialects.sqlite import Insert as SqliteInsert

SQLITE_BUSY_TIMEOUT_MS = 10_000


def insert_for(dialect: str, table: Any) -> PgInsert | SqliteInsert:
    """An INSERT that takes ON CONFLICT clauses, in `dialect`'s own form.

    The PostgreSQL dialect package is imported only when asked for: it is 4.6 MB of
    a process's memory, which a gateway on SQLite never needs.
    """
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def default_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{(data_dir / 'tollway.db').resolve()}"


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_conn.cursor()
    # The busy timeout first: switching to WAL needs a lock that another process
    # starting at the same moment may hold, and without a timeout SQLite gives up
    # at once ("database is locked").
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL is a property of the file, kept once set: ask before switching, because
    # the switch needs the database to itself, and SQLite does not always wait for
    # that (a second upgrader connecting while the first holds the write lock was
    # refused at once with "database is locked" under load).
    # Even then, a connection made while another one switches a new file to WAL can
    # be refused at once (SQLite skips the busy handler there): retry that briefly.
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode")
            row = cursor.fetchone()
            if row is None or str(row[0]).lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            # This listener runs in SQLAlchemy's greenlet on the event loop: wait
            # through it, not with time.sleep, which would stall every request.
            await_(asyncio.sleep(0.02))
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Database:
    """The engine and its sessions. `schema` (PostgreSQL only) isolates tests."""

    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False) -> None:
        self.url = url
        self.schema = schema
        # hide_parameters: a failed statement's message (logged by uvicorn, by the
        # usage writer, by the resolver) must not quote key hashes or emails.
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True, "hide_parameters": True}
        if self.is_sqlite:
            path = url.split(":///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                # Emails and key hashes: readable by the gateway's user only. SQLite
                # gives its -wal and -shm files the database file's mode.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        elif schema is not None:
            kwargs["connect_args"] = {"server_settings": {"search_path": schema}}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def change_probe(self) -> DataVersionProbe | None:
        """A cheap "did anything commit?" for a SQLite file; None for other databases
        (and for in-memory or URL-parameterised SQLite), which are simply polled."""
        if not self.is_sqlite:
            return None
        path = self.url.split(":///", 1)[-1]
        if not path or path == ":memory:" or "?" in path:
            return None
        return DataVersionProbe(Path(path))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    async def dispose(self) -> None:
        await self.engine.dispose()

"""Alembic environment: runs on the connection tollway.storage.migrate passes in.

The caller (migrate.upgrade) opens the connection, takes the migration lock and
begins the transaction; this file only configures Alembic on that connection, so
the lock, the DDL and the alembic_version update commit together. Unqualified
table names (including alembic_version) land in the connection's search_path
schema on PostgreSQL, which is how per-test schemas stay isolated.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.engine import Connection

from tollway.storage.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate writes UTCDateTime as what it is in the database, so that
    revisions do not import the models (they must not change when models do)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_offline() -> None:
    """`--sql` mode: print the DDL for the URL's dialect instead of running it."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online(connection: Connection) -> None:
    is_sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode copies the table instead.
        render_as_batch=is_sqlite,
        # Alembic treats SQLite DDL as non-transactional by default; it is
        # transactional, and the caller holds it in one BEGIN IMMEDIATE transaction.
        transactional_ddl=True,
        compare_type=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    conn = config.attributes.get("connection")
    if not isinstance(conn, Connection):
        raise RuntimeError(
            "run migrations through tollway.storage.migrate (or `tollway migrate`), "
            "which passes the connection in config.attributes['connection']"
        )
    run_online(conn)

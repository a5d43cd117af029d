"""initial: consumers, API keys and their secrets, the change outbox, usage logs

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written from storage/models.py; tests/storage/test_migrations.py checks that the
result matches the models on SQLite and PostgreSQL. Types are spelled as plain
SQLAlchemy types (UTCDateTime is DateTime(timezone=True) in the database) so that
this file does not change when the models' Python-side helpers do.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _big_id() -> sa.types.TypeEngine[int]:
    # SQLite only autoincrements an INTEGER PRIMARY KEY, not a BIGINT one.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "consumers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("plan", sa.String(length=64), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consumers")),
        sa.UniqueConstraint("email", name=op.f("uq_consumers_email")),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consumer_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("prefix", sa.String(length=32), nullable=False),
        sa.Column("limit_per_minute", sa.Integer(), nullable=True),
        sa.Column("limit_per_day", sa.Integer(), nullable=True),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["consumer_id"],
            ["consumers.id"],
            name=op.f("fk_api_keys_consumer_id_consumers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_consumer_id"), "api_keys", ["consumer_id"])

    op.create_table(
        "api_key_secrets",
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_api_key_secrets_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_api_key_secrets")),
    )
    op.create_index(op.f("ix_api_key_secrets_key_id"), "api_key_secrets", ["key_id"])

    op.create_table(
        "cache_invalidations",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ref", sa.String(length=64), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cache_invalidations")),
    )
    op.create_index(
        op.f("ix_cache_invalidations_created_at"), "cache_invalidations", ["created_at"]
    )

    op.create_table(
        "usage_records",
        sa.Column("id", _big_id(), autoincrement=True, nullable=False),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("consumer_id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=True),
        sa.Column("route", sa.String(length=200), nullable=True),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("path", sa.String(length=2048), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("upstream_latency_ms", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.Column("client_ip", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
    )
    op.create_index(op.f("ix_usage_records_ts"), "usage_records", ["ts"])
    op.create_index("ix_usage_records_key_ts", "usage_records", ["key_id", "ts"])
    op.create_index("ix_usage_records_consumer_ts", "usage_records", ["consumer_id", "ts"])

    op.create_table(
        "usage_hourly",
        sa.Column("hour", _ts(), nullable=False),
        sa.Column("consumer_id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("route", sa.String(length=200), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        *(sa.Column(f"lat_b{i:02d}", sa.BigInteger(), nullable=False) for i in range(16)),
        sa.PrimaryKeyConstraint(
            "hour", "consumer_id", "key_id", "route", name=op.f("pk_usage_hourly")
        ),
    )


def downgrade() -> None:
    op.drop_table("usage_hourly")
    op.drop_index("ix_usage_records_consumer_ts", table_name="usage_records")
    op.drop_index("ix_usage_records_key_ts", table_name="usage_records")
    op.drop_index(op.f("ix_usage_records_ts"), table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_index(op.f("ix_cache_invalidations_created_at"), table_name="cache_invalidations")
    op.drop_table("cache_invalidations")
    op.drop_index(op.f("ix_api_key_secrets_key_id"), table_name="api_key_secrets")
    op.drop_table("api_key_secrets")
    op.drop_index(op.f("ix_api_keys_consumer_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("consumers")

"""plans and limit grants: named rate-limit windows, and temporary extra allowance

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

A consumer's `plan` column (0001) holds a plan's name; it is not a foreign key, so
that a plan can be created after the consumers that name it and so that renaming
is never a cascade. The admin API refuses a name that does not exist and a delete
while the plan is in use.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("description", sa.String(length=1000), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_plans")),
        sa.UniqueConstraint("name", name=op.f("uq_plans_name")),
    )

    op.create_table(
        "limit_grants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("consumer_id", sa.Uuid(), nullable=False),
        sa.Column("per", sa.String(length=16), nullable=False),
        sa.Column("extra", sa.Integer(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["consumer_id"],
            ["consumers.id"],
            name=op.f("fk_limit_grants_consumer_id_consumers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_grants")),
    )
    op.create_index(op.f("ix_limit_grants_consumer_id"), "limit_grants", ["consumer_id"])
    op.create_index(op.f("ix_limit_grants_expires_at"), "limit_grants", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_limit_grants_expires_at"), table_name="limit_grants")
    op.drop_index(op.f("ix_limit_grants_consumer_id"), table_name="limit_grants")
    op.drop_table("limit_grants")
    op.drop_table("plans")

"""upstream targets: self-registered targets of services, with a TTL

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

A target registers with POST /upstreams/{service}/targets and stays live while it
heart-beats; `expires_at` is indexed because every gateway asks for the live rows
each second and purges the expired ones. The service is a name from the config
file, not a foreign key: services are not stored in the database.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "upstream_targets",
        sa.Column("service", sa.String(length=128), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("ttl_seconds", sa.Float(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("service", "target", name=op.f("pk_upstream_targets")),
    )
    op.create_index(op.f("ix_upstream_targets_expires_at"), "upstream_targets", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_upstream_targets_expires_at"), table_name="upstream_targets")
    op.drop_table("upstream_targets")

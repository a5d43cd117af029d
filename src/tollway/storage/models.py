"""The database tables, as SQLAlchemy 2 declarative models.

One set of models for SQLite (the embedded default) and PostgreSQL: only portable
types (Uuid, JSON, timezone-aware DateTime stored as UTC, BigInteger ids that
become INTEGER PRIMARY KEY on SQLite so that they autoincrement there too).
Alembic migrations in storage/migrations create exactly these tables; a test
compares the two so that they cannot drift.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Constraint names fixed by convention so that migrations can refer to them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only autoincrements an INTEGER PRIMARY KEY, not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")


# Upper bounds (ms) of the usage_hourly latency buckets lat_b00..lat_b15; the last
# bucket takes everything slower.
LATENCY_BUCKET_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, float("inf"),
)
LATENCY_BUCKET_COLUMNS: tuple[str, ...] = tuple(f"lat_b{i:02d}" for i in range(16))


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware datetimes in, timezone-aware UTC datetimes out, on every backend.

    SQLite has no timezone type and hands back naive values; PostgreSQL hands back
    aware ones. Both come out aware and in UTC so that comparisons never mix kinds.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Consumer(Base):
    """Someone who calls the gateway (the seeds call it a user)."""

    __tablename__ = "consumers"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    # Normalized (trimmed, lower-case) before it is stored; unique.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")  # active | disabled
    plan: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """An API key. Its secrets (one, or two during a rotation) live in api_key_secrets."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    consumer_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("consumers.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")
    # What people see: "tw_live_" plus the first 8 characters of the secret part.
    prefix: Mapped[str] = mapped_column(String(32))
    limit_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    limit_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Route names or "tag:<tag>" entries; empty means every route.
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[str] = mapped_column(String(16), default="active")  # active|disabled|revoked
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ApiKeySecret(Base):
    """HMAC-SHA256(pepper, raw key) of a key's valid secrets.

    A rotation adds a row and gives the old one an `expires_at` (the grace period);
    after that instant it no longer authenticates, without anyone acting.
    """

    __tablename__ = "api_key_secrets"

    # Hex digest: 64 characters.
    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class CacheInvalidation(Base):
    """An outbox of changes that caches in every worker and node must forget.

    Written in the same transaction as the change, so that no change is missed;
    workers poll it (or hear it first through Redis pub/sub when configured).
    """

    __tablename__ = "cache_invalidations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # key | consumer | plan | grant
    # The key's or consumer's id, the plan's name, the grant's consumer id.
    ref: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class UsageRecord(Base):
    """One proxied request by an identified consumer."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_key_ts", "key_id", "ts"),
        Index("ix_usage_records_consumer_ts", "consumer_id", "ts"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    consumer_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    route: Mapped[str | None] = mapped_column(String(200), nullable=True)
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(2048))
    status: Mapped[int] = mapped_column(Integer)
    upstream_latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    bytes_in: Mapped[int] = mapped_column(BigInteger)
    bytes_out: Mapped[int] = mapped_column(BigInteger)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)


class UsageHourly(Base):
    """Per consumer, key, route and hour: what statistics over months read.

    `lat_bNN` count requests per latency bucket, so that p50/p95 come from rollups
    without raw rows.
    `key_id` and `route` use "" (not NULL) for "none" so the primary key holds.
    """

    __tablename__ = "usage_hourly"

    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    consumer_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    route: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)  # status >= 400
    latency_ms_sum: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)
    # Requests per latency bucket; LATENCY_BUCKET_BOUNDS_MS gives the upper bounds.
    # Columns, not a JSON list, so that an upsert can add to them atomically.
    lat_b00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b13: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b14: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_b15: Mapped[int] = mapped_column(BigInteger, default=0)


class InstanceSetting(Base):
    """Facts every process sharing this database must agree on.

    `key_pepper_fingerprint`: HMAC of a fixed label under the key pepper. A node
    started with another pepper would hash keys differently and refuse every key
    the others created; it refuses to start instead (storage is shared, the pepper
    is not in it).
    """

    __tablename__ = "instance_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Plan(Base):
    """A named set of rate-limit windows; a consumer's `plan` column holds its name.

    `limits` is a JSON list of windows ({"per", "limit", "burst"?, "cost"?}), in
    the form limits/plans.py validates; a plan is read whole, never queried by its
    windows.
    """

    __tablename__ = "plans"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    limits: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    description: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class LimitGrant(Base):
    """`extra` more in one window (`per`) of one consumer until `expires_at`.

    Revoking sets `revoked_at`; rows stay as the record of what was granted, why.
    Gateways load the live ones (not revoked, not expired: the expires_at index).
    """

    __tablename__ = "limit_grants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    consumer_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("consumers.id", ondelete="CASCADE"), index=True
    )
    per: Mapped[str] = mapped_column(String(16))
    extra: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    reason: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class UpstreamTarget(Base):
    """A target that registered itself for a service through the admin API.

    Live while `expires_at` is ahead; heartbeats move it on by `ttl_seconds` (or a
    ttl they give). Kept in the database so that every worker and node sees the
    same registrations; expired rows are purged by the watchers, and are ignored
    until then. (service, target) is the key: a target re-registering is a refresh.
    """

    __tablename__ = "upstream_targets"

    service: Mapped[str] = mapped_column(String(128), primary_key=True)
    # Canonical "host:port", IPv6 in brackets.
    target: Mapped[str] = mapped_column(String(300), primary_key=True)
    weight: Mapped[int] = mapped_column(Integer, default=100)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    ttl_seconds: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

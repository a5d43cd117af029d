"""Request and response models of the admin API (users, keys, usage, plans, grants).

Requests forbid unknown fields, so that a typo ("limit_per_minut") is a 422 naming
it rather than a silently ignored setting. Responses never carry a secret's hash;
the raw key appears only in the answer that created it (create, rotate).
Times without an offset are taken as UTC; every time answered is UTC.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from tollway.limits.plans import DESCRIPTION_MAX, NAME_MAX, REASON_MAX
from tollway.storage.models import ApiKey, Consumer, LimitGrant, UsageRecord
from tollway.storage.models import Plan as PlanRow


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 is before year 1 in UTC. A ValueError makes it a
        # 422 naming the field; an OverflowError was a 500.
        raise ValueError("out of range once converted to UTC") from None


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]

UserStatus = Literal["active", "disabled"]
KeyStatus = Literal["active", "disabled", "revoked"]
SettableKeyStatus = Literal["active", "disabled"]

Email = Annotated[str, Field(min_length=3, max_length=320, examples=["ada@example.com"])]
Name = Annotated[str, Field(max_length=200)]
Plan = Annotated[str, Field(min_length=1, max_length=64)]
Limit = Annotated[int, Field(ge=1, le=2_147_483_647)]
Scope = Annotated[str, Field(min_length=1, max_length=200)]
Scopes = Annotated[list[Scope], Field(max_length=100)]

# The longest rotation grace identity.keys accepts (365 days).
MAX_GRACE_SECONDS = 365 * 24 * 3600
# The longest grant identity.plans accepts (31 days).
MAX_GRANT_SECONDS = 31 * 24 * 3600

Per = Literal["second", "minute", "hour", "day", "month"]
PlanName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=NAME_MAX,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        examples=["pro"],
        description="Letters, digits, '.', '_' and '-', starting with a letter or digit",
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _given_not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may be left out, but not null")
    return value


# ---------------------------------------------------------------- users


class UserCreate(_Request):
    email: Email
    name: Name = ""
    plan: Plan | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class UserUpdate(_Request):
    """Only the fields given change; `plan: null` clears the plan."""

    email: Email | None = None
    name: Name | None = None
    status: UserStatus | None = None
    plan: Plan | None = None
    metadata: dict[str, Any] | None = None

    # Validators run only for fields the request gave (defaults are not validated).
    @field_validator("email", "name", "status", "metadata")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        return _given_not_null(value)


class UserOut(BaseModel):
    id: uuid.UUID
    email: str
    name: str
    status: str
    plan: str | None
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, consumer: Consumer) -> UserOut:
        return cls(
            id=consumer.id,
            email=consumer.email,
            name=consumer.name,
            status=consumer.status,
            plan=consumer.plan,
            metadata=dict(consumer.metadata_ or {}),
            created_at=consumer.created_at,
            updated_at=consumer.updated_at,
        )


class UserList(BaseModel):
    items: list[UserOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end"
    )


# ---------------------------------------------------------------- keys


class KeyCreate(_Request):
    user_id: uuid.UUID
    name: Name = ""
    limit_per_minute: Limit | None = None
    limit_per_day: Limit | None = None
    scopes: Scopes = Field(
        default_factory=list,
        description='Route names or "tag:<tag>" entries; empty allows every route',
    )
    expires_at: UtcDatetime | None = None


class KeyUpdate(_Request):
    """Only the fields given change; `null` clears a limit or the expiry."""

    name: Name | None = None
    status: SettableKeyStatus | None = Field(
        default=None, description="active or disabled; a revoked key stays revoked"
    )
    limit_per_minute: Limit | None = None
    limit_per_day: Limit | None = None
    scopes: Scopes | None = None
    expires_at: UtcDatetime | None = None

    @field_validator("name", "status", "scopes")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        return _given_not_null(value)


class KeyRotate(_Request):
    grace_seconds: int = Field(
        default=86400,
        ge=0,
        le=MAX_GRACE_SECONDS,
        description="How long the current secret keeps working (0: it stops at once)",
    )


class KeyOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    prefix: str = Field(description="What lists show of the key: tw_live_ and 8 characters")
    status: str
    limit_per_minute: int | None
    limit_per_day: int | None
    scopes: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None

    @classmethod
    def fields_of(cls, key: ApiKey) -> dict[str, Any]:
        return {
            "id": key.id,
            "user_id": key.consumer_id,
            "name": key.name,
            "prefix": key.prefix,
            "status": key.status,
            "limit_per_minute": key.limit_per_minute,
            "limit_per_day": key.limit_per_day,
            "scopes": list(key.scopes or []),
            "expires_at": key.expires_at,
            "last_used_at": key.last_used_at,
            "created_at": key.created_at,
            "updated_at": key.updated_at,
            "revoked_at": key.revoked_at,
        }

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(**cls.fields_of(key))


class KeyCreated(KeyOut):
    key: str = Field(description="The raw key. Shown once: store it now")


class KeyRotated(KeyOut):
    key: str = Field(description="The new raw key. Shown once: store it now")
    previous_expires_at: datetime | None = Field(
        description="When the previous secret stops working (null: no previous secret)"
    )


class KeyList(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None


# ---------------------------------------------------------------- usage


class UsageTotals(BaseModel):
    requests: int
    errors: int
    error_rate: float
    bytes_in: int
    bytes_out: int
    latency_ms_avg: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None


class UsagePeriod(BaseModel):
    period: datetime = Field(description="Start of the hour or day (UTC)")
    requests: int
    errors: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None


class UsageRoute(BaseModel):
    route: str | None = Field(description="null: requests that matched no named route")
    requests: int
    errors: int


class UsageRecordOut(BaseModel):
    id: int
    ts: datetime
    user_id: uuid.UUID
    key_id: uuid.UUID | None
    route: str | None
    method: str
    path: str
    status: int
    upstream_latency_ms: float | None
    latency_ms: float
    bytes_in: int
    bytes_out: int
    request_id: str | None
    client_ip: str | None

    @classmethod
    def of(cls, record: UsageRecord) -> UsageRecordOut:
        return cls(
            id=record.id,
            ts=record.ts,
            user_id=record.consumer_id,
            key_id=record.key_id,
            route=record.route,
            method=record.method,
            path=record.path,
            status=record.status,
            upstream_latency_ms=record.upstream_latency_ms,
            latency_ms=record.latency_ms,
            bytes_in=record.bytes_in,
            bytes_out=record.bytes_out,
            request_id=record.request_id,
            client_ip=record.client_ip,
        )


class UsageRecent(BaseModel):
    items: list[UsageRecordOut]
    next_cursor: str | None


class UsageOut(BaseModel):
    key_id: uuid.UUID | None
    user_id: uuid.UUID | None
    route: str | None
    start: datetime = Field(description="`from`: inclusive")
    end: datetime = Field(description="`to`: exclusive")
    group_by: Literal["hour", "day"]
    totals: UsageTotals
    series: list[UsagePeriod]
    top_routes: list[UsageRoute]
    recent: UsageRecent


# ---------------------------------------------------------------- plans


class WindowIn(_Request):
    per: Per
    limit: Limit
    burst: Limit | None = Field(
        default=None, description="GCRA burst; per second, minute or hour only"
    )
    cost: Limit | None = Field(
        default=None, description="What one request takes from this window (default: its cost)"
    )


Windows = Annotated[list[WindowIn], Field(max_length=5, description="At most one per `per`")]


class PlanCreate(_Request):
    name: PlanName
    limits: Windows = Field(default_factory=list)
    description: Annotated[str, Field(max_length=DESCRIPTION_MAX)] = ""


class PlanUpdate(_Request):
    """Only the fields given change; `limits` replaces every window."""

    limits: Windows | None = None
    description: Annotated[str, Field(max_length=DESCRIPTION_MAX)] | None = None

    @field_validator("limits", "description")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        return _given_not_null(value)


class WindowOut(BaseModel):
    per: str
    limit: int
    burst: int | None = None
    cost: int | None = None


class PlanOut(BaseModel):
    id: uuid.UUID
    name: str
    limits: list[WindowOut]
    description: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: PlanRow) -> PlanOut:
        return cls(
            id=row.id,
            name=row.name,
            limits=[WindowOut(**w) for w in row.limits or []],
            description=row.description,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class PlanList(BaseModel):
    items: list[PlanOut]
    next_cursor: str | None


# ---------------------------------------------------------------- grants


class GrantCreate(_Request):
    """Give `expires_at` or `ttl_seconds` (one of them)."""

    per: Per
    extra: Limit = Field(description="Added to the window's limit (GCRA: to its burst)")
    expires_at: UtcDatetime | None = Field(default=None, description="At most 31 days ahead")
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_GRANT_SECONDS)
    reason: Annotated[str, Field(max_length=REASON_MAX)] = ""


class GrantOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    per: str
    extra: int
    expires_at: datetime
    reason: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool = Field(description="Neither revoked nor expired")

    @classmethod
    def of(cls, row: LimitGrant, now: datetime) -> GrantOut:
        return cls(
            id=row.id,
            user_id=row.consumer_id,
            per=row.per,
            extra=row.extra,
            expires_at=row.expires_at,
            reason=row.reason,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
            active=row.revoked_at is None and row.expires_at > now,
        )


class GrantList(BaseModel):
    items: list[GrantOut]
    next_cursor: str | None

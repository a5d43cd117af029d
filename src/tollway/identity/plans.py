"""Plans and limit grants in the database: create, read, change, delete, and the
loader the PlanBook (limits/plans.py) reloads from.

Like consumers.py and keys.py, every function takes an AsyncSession and leaves
committing to the caller, and every change records an outbox change in the same
transaction (kind "plan" with the plan's name, "grant" with the consumer's id), so
that every gateway's PlanBook reloads within a second.

A consumer's plan is a name (consumers.plan), not a foreign key. Two checks keep
names pointing at plans, and each writes before it reads so that the two cannot
both pass against each other: `delete_plan` deletes the row, then counts the users
(Conflict if any); `require_plan` (after the consumer's update) reads the plan FOR
SHARE. On PostgreSQL the row lock orders them; on SQLite the first write holds the
database's write lock until commit, so the later read sees the other's commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, Literal
from uuid import UUID

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.identity.changes import record_change
from tollway.identity.consumers import UNSET, Unset
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.limits.plans import (
    DESCRIPTION_MAX,
    REASON_MAX,
    Grant,
    Plan,
    PlanBook,
    PlanError,
    WindowSpec,
    check_count,
    check_limits,
    check_per,
    check_plan_name,
    check_text,
)
from tollway.storage.database import Database
from tollway.storage.models import Consumer, LimitGrant, utcnow
from tollway.storage.models import Plan as PlanRow
from tollway.storage.pagination import DEFAULT_LIMIT, Page, keyset_page

log = structlog.get_logger("tollway.plans")

# A grant is a temporary allowance; a lasting one is a plan.
MAX_GRANT_DURATION: Final = timedelta(days=31)


def _invalid(exc: PlanError) -> InvalidInput:
    return InvalidInput(exc.message, field=exc.field)


def _limits(limits: Iterable[WindowSpec | Mapping[str, Any]]) -> list[dict[str, Any]]:
    try:
        return [spec.to_dict() for spec in check_limits(limits)]
    except PlanError as exc:
        raise _invalid(exc) from exc


def _name(name: object) -> str:
    try:
        return check_plan_name(name)
    except PlanError as exc:
        raise _invalid(exc) from exc


def _text(value: object, field: str, max_len: int) -> str:
    try:
        return check_text(value, field, max_len)
    except PlanError as exc:
        raise _invalid(exc) from exc


def plan_of(row: PlanRow) -> Plan:
    """The domain record of a stored plan."""
    return Plan(
        name=row.name,
        limits=tuple(WindowSpec.from_dict(d) for d in row.limits or ()),
        description=row.description,
    )


def grant_of(row: LimitGrant) -> Grant:
    return Grant(
        id=str(row.id),
        consumer_id=str(row.consumer_id),
        per=check_per(row.per),
        extra=row.extra,
        expires_at=row.expires_at.timestamp(),
        reason=row.reason,
    )


# -- plans ----------------------------------------------------------------------


async def create_plan(
    session: AsyncSession,
    *,
    name: str,
    limits: Iterable[WindowSpec | Mapping[str, Any]] = (),
    description: str = "",
) -> PlanRow:
    """A new plan; Conflict (field "name") when the name is taken."""
    values = {
        "name": _name(name),
        "limits": _limits(limits),
        "description": _text(description, "description", DESCRIPTION_MAX),
    }
    if await session.scalar(select(PlanRow.id).where(PlanRow.name == values["name"])):
        raise Conflict(f"a plan named {values['name']!r} exists", field="name")
    now = utcnow()
    row = PlanRow(created_at=now, updated_at=now, **values)
    session.add(row)
    record_change(session, "plan", row.name)
    try:
        await session.flush()
    except IntegrityError as exc:
        # Created by another transaction between the check and the flush; the
        # caller rolls the session back, as after any failed flush.
        raise Conflict(f"a plan named {values['name']!r} exists", field="name") from exc
    return row


async def get_plan(session: AsyncSession, name: str) -> PlanRow:
    row = await session.scalar(select(PlanRow).where(PlanRow.name == name))
    if row is None:
        raise NotFound(f"no plan named {name!r}")
    return row


async def list_plans(
    session: AsyncSession, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[PlanRow]:
    """Plans newest first."""
    return await keyset_page(
        session,
        select(PlanRow),
        ts_column=PlanRow.created_at,
        id_column=PlanRow.id,
        cursor=cursor,
        limit=limit,
    )


async def update_plan(
    session: AsyncSession,
    name: str,
    *,
    limits: Iterable[WindowSpec | Mapping[str, Any]] | Literal[Unset.UNSET] = UNSET,
    description: str | Literal[Unset.UNSET] = UNSET,
) -> PlanRow:
    """Replace the plan's windows and/or description (the name stays)."""
    row = await get_plan(session, name)
    changed = False
    if limits is not UNSET:
        checked = _limits(limits)
        if checked != row.limits:
            row.limits = checked
            changed = True
    if description is not UNSET:
        text = _text(description, "description", DESCRIPTION_MAX)
        if text != row.description:
            row.description = text
            changed = True
    if changed:
        record_change(session, "plan", row.name)
        await session.flush()
    return row


async def users_of(session: AsyncSession, name: str) -> int:
    """How many consumers (active or disabled) name this plan."""
    return int(await session.scalar(select(func.count()).where(Consumer.plan == name)) or 0)


async def delete_plan(session: AsyncSession, name: str) -> None:
    """Delete the plan; Conflict naming how many users still have it."""
    row = await get_plan(session, name)
    await session.delete(row)
    # Deleted first, counted after (see the module's docstring).
    await session.flush()
    users = await users_of(session, name)
    if users:
        noun = "user has" if users == 1 else "users have"
        raise Conflict(f"{users} {noun} plan {name!r}; give them another plan first", field="name")
    record_change(session, "plan", name)
    await session.flush()


async def require_plan(session: AsyncSession, name: str, *, field: str = "plan") -> None:
    """InvalidInput on `field` unless a plan of this name exists; held (FOR SHARE on
    PostgreSQL) until the transaction ends, so that it cannot be deleted meanwhile."""
    found = await session.scalar(
        select(PlanRow.id).where(PlanRow.name == name).with_for_update(read=True)
    )
    if found is None:
        raise InvalidInput(f"no plan named {name!r}", field=field)


# -- grants ---------------------------------------------------------------------


def _check_grant_expiry(expires_at: object, now: datetime) -> datetime:
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise InvalidInput("expires_at must be a datetime with a timezone", field="expires_at")
    if expires_at <= now:
        raise InvalidInput("expires_at must be in the future", field="expires_at")
    if expires_at > now + MAX_GRANT_DURATION:
        raise InvalidInput(
            f"expires_at must be at most {MAX_GRANT_DURATION.days} days ahead",
            field="expires_at",
        )
    return expires_at


async def create_grant(
    session: AsyncSession,
    consumer_id: UUID,
    *,
    per: str,
    extra: int,
    expires_at: datetime,
    reason: str = "",
    now: datetime | None = None,
) -> LimitGrant:
    """`extra` more in the consumer's `per` window until `expires_at` (at most 31 days)."""
    now = now or utcnow()
    try:
        checked_per = check_per(per)
        checked_extra = check_count(extra, "extra")
    except PlanError as exc:
        raise _invalid(exc) from exc
    assert checked_extra is not None
    values: dict[str, Any] = {
        "per": checked_per,
        "extra": checked_extra,
        "expires_at": _check_grant_expiry(expires_at, now),
        "reason": _text(reason, "reason", REASON_MAX),
    }
    consumer = await session.get(Consumer, consumer_id)
    if consumer is None:
        raise NotFound(f"consumer {consumer_id} not found")
    row = LimitGrant(consumer_id=consumer.id, created_at=now, **values)
    session.add(row)
    record_change(session, "grant", str(consumer.id))
    await session.flush()
    return row


async def list_grants(
    session: AsyncSession,
    consumer_id: UUID,
    *,
    include_inactive: bool = False,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
    now: datetime | None = None,
) -> Page[LimitGrant]:
    """The consumer's grants newest first: the active ones, or all with include_inactive."""
    if await session.get(Consumer, consumer_id) is None:
        raise NotFound(f"consumer {consumer_id} not found")
    stmt = select(LimitGrant).where(LimitGrant.consumer_id == consumer_id)
    if not include_inactive:
        stmt = stmt.where(
            LimitGrant.revoked_at.is_(None), LimitGrant.expires_at > (now or utcnow())
        )
    return await keyset_page(
        session,
        stmt,
        ts_column=LimitGrant.created_at,
        id_column=LimitGrant.id,
        cursor=cursor,
        limit=limit,
    )


async def revoke_grant(session: AsyncSession, consumer_id: UUID, grant_id: UUID) -> LimitGrant:
    """End the grant now (the row stays); revoking again changes nothing."""
    row = await session.get(LimitGrant, grant_id)
    if row is None or row.consumer_id != consumer_id:
        raise NotFound(f"grant {grant_id} not found for consumer {consumer_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_change(session, "grant", str(consumer_id))
        await session.flush()
    return row


# -- what gateways load ----------------------------------------------------------


async def load_all(database: Database) -> tuple[Sequence[Plan], Sequence[Grant]]:
    """Every plan and every live grant (not revoked, not expired), as domain records.

    A stored plan that no longer validates (edited by hand) is left out with a
    warning rather than failing the whole load: the others must keep working.
    """
    now = utcnow()
    async with database.sessions() as session:
        plan_rows = (await session.scalars(select(PlanRow))).all()
        grant_rows = (
            await session.scalars(
                select(LimitGrant).where(
                    LimitGrant.revoked_at.is_(None), LimitGrant.expires_at > now
                )
            )
        ).all()
    plans: list[Plan] = []
    for row in plan_rows:
        try:
            plans.append(plan_of(row))
        except PlanError as exc:
            log.warning("stored plan is invalid; left out", plan=row.name, error=str(exc))
    grants: list[Grant] = []
    for grow in grant_rows:
        try:
            grants.append(grant_of(grow))
        except PlanError as exc:
            log.warning("stored grant is invalid; left out", grant=str(grow.id), error=str(exc))
    return plans, grants


def plan_book(database: Database, **options: Any) -> PlanBook:
    """A PlanBook that loads from this database (options: see PlanBook)."""

    async def loader() -> tuple[Sequence[Plan], Sequence[Grant]]:
        return await load_all(database)

    return PlanBook(loader, **options)

"""Consumers: the people or systems that call the gateway (the seeds call them users).

Every function takes an AsyncSession and leaves committing to the caller, so that
a change and its outbox row (identity/changes.py) commit together. Functions flush
when they must know the database's answer (a duplicate email) before returning.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from typing import Any, Final, Literal
from uuid import UUID

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.identity.changes import record_change
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.storage.database import insert_for
from tollway.storage.models import ApiKey, Consumer, utcnow
from tollway.storage.pagination import DEFAULT_LIMIT, Page, keyset_page


class Unset(enum.Enum):
    """The type of UNSET: "leave this field as it is" in updates (None means null)."""

    UNSET = "UNSET"


UNSET: Final = Unset.UNSET

CONSUMER_STATUSES: Final = ("active", "disabled")
EMAIL_MAX = 320
NAME_MAX = 200
PLAN_MAX = 64
# Deliberately loose: one @, something on each side, no whitespace. Whether the
# address receives mail is not this layer's business.
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+$")


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased; InvalidInput(field="email") when it is not an address."""
    if not isinstance(email, str):
        raise InvalidInput("email must be a string", field="email")
    # NFC: "é" typed as one code point or as e + combining accent (macOS input)
    # is one address, so one consumer, found by either spelling.
    normalized = unicodedata.normalize("NFC", email.strip().lower())
    if not normalized or len(normalized) > EMAIL_MAX or not _EMAIL_RE.match(normalized):
        raise InvalidInput("not a valid email address", field="email")
    # Control characters (NUL above all: PostgreSQL text cannot hold it) are never
    # part of an address.
    if any(unicodedata.category(ch) == "Cc" for ch in normalized):
        raise InvalidInput("not a valid email address", field="email")
    domain = normalized.rsplit("@", 1)[1]
    if domain.startswith(".") or domain.endswith(".") or ".." in domain:
        raise InvalidInput("not a valid email address", field="email")
    return normalized


def _check_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > NAME_MAX:
        raise InvalidInput(f"name must be a string of at most {NAME_MAX} characters", field="name")
    if "\x00" in name:
        # PostgreSQL text cannot hold NUL; SQLite would store it: refuse on both.
        raise InvalidInput("name must not contain NUL characters", field="name")
    return name.strip()


def _check_plan(plan: object) -> str | None:
    if plan is None:
        return None
    if not isinstance(plan, str) or not plan.strip() or len(plan) > PLAN_MAX or "\x00" in plan:
        raise InvalidInput(
            f"plan must be null or a non-empty string of at most {PLAN_MAX} characters",
            field="plan",
        )
    return plan.strip()


def _check_metadata(metadata: object) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise InvalidInput("metadata must be an object with string keys", field="metadata")
    # JSON parsers accept NaN and Infinity, which are not JSON: PostgreSQL refuses
    # them and SQLite stores them to answer null. Iterative: no recursion limit.
    stack: list[object] = [metadata]
    while stack:
        value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput("metadata must not contain NaN or Infinity", field="metadata")
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return dict(metadata)


def _check_status(status: object) -> str:
    if status not in CONSUMER_STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(CONSUMER_STATUSES)}", field="status")
    assert isinstance(status, str)
    return status


async def create_or_get(
    session: AsyncSession,
    *,
    email: str,
    name: str = "",
    plan: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[Consumer, bool]:
    """The consumer with this email, created when there is none; the bool says created.

    An existing consumer is returned as it is (name, plan and metadata given here
    are not applied to it). Safe when two callers create the same email at once:
    the insert does nothing on conflict, and both get the one row.
    """
    normalized = normalize_email(email)
    values = {
        "email": normalized,
        "name": _check_name(name),
        "plan": _check_plan(plan),
        "metadata_": _check_metadata(metadata),
    }
    existing = await session.scalar(select(Consumer).where(Consumer.email == normalized))
    if existing is not None:
        return existing, False
    # ON CONFLICT DO NOTHING rather than catching IntegrityError: a failed insert
    # would abort a PostgreSQL transaction the caller may still want to use.
    dialect = session.get_bind().dialect.name
    stmt = (
        insert_for(dialect, Consumer)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[Consumer.email])
    )
    result = await session.execute(stmt)
    created = bool(getattr(result, "rowcount", 0))
    consumer = await session.scalar(select(Consumer).where(Consumer.email == normalized))
    if consumer is None:  # pragma: no cover - the row was inserted or already there
        raise NotFound("consumer not found")
    return consumer, created


async def get_consumer(session: AsyncSession, consumer_id: UUID) -> Consumer:
    consumer = await session.get(Consumer, consumer_id)
    if consumer is None:
        raise NotFound(f"consumer {consumer_id} not found")
    return consumer


async def get_by_email(session: AsyncSession, email: str) -> Consumer:
    consumer = await session.scalar(
        select(Consumer).where(Consumer.email == normalize_email(email))
    )
    if consumer is None:
        raise NotFound("no consumer with this email")
    return consumer


async def list_consumers(
    session: AsyncSession,
    *,
    email: str | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[Consumer]:
    """Consumers newest first; `email` matches exactly (after normalizing)."""
    stmt = select(Consumer)
    if email is not None:
        # A filter that cannot match is an empty page, not an error; normalized as
        # stored emails are (and never sent with a NUL PostgreSQL would refuse).
        try:
            wanted = normalize_email(email)
        except InvalidInput:
            return Page(items=[], next_cursor=None)
        stmt = stmt.where(Consumer.email == wanted)
    if status is not None:
        stmt = stmt.where(Consumer.status == _check_status(status))
    return await keyset_page(
        session,
        stmt,
        ts_column=Consumer.created_at,
        id_column=Consumer.id,
        cursor=cursor,
        limit=limit,
    )


async def _email_taken(session: AsyncSession, email: str, other_than: UUID) -> bool:
    found = await session.scalar(
        select(Consumer.id).where(Consumer.email == email, Consumer.id != other_than)
    )
    return found is not None


async def update_consumer(
    session: AsyncSession,
    consumer_id: UUID,
    *,
    email: str | Literal[Unset.UNSET] = UNSET,
    name: str | Literal[Unset.UNSET] = UNSET,
    status: str | Literal[Unset.UNSET] = UNSET,
    plan: str | Literal[Unset.UNSET] | None = UNSET,
    metadata: dict[str, Any] | Literal[Unset.UNSET] | None = UNSET,
) -> Consumer:
    """Apply the given fields; Conflict when the new email belongs to someone else.

    Setting status "disabled" here only suspends the consumer (their keys answer
    403 while it lasts, and work again on "active"); disable_consumer is the
    delete, which also revokes their keys for good.
    A change to anything the key resolver caches (email, name, status, plan)
    records a consumer change so that every cache forgets it.
    """
    consumer = await get_consumer(session, consumer_id)
    cached_fields_changed = False
    if email is not UNSET:
        normalized = normalize_email(email)
        if normalized != consumer.email:
            if await _email_taken(session, normalized, consumer.id):
                raise Conflict("another consumer has this email", field="email")
            consumer.email = normalized
            cached_fields_changed = True
    if name is not UNSET:
        checked_name = _check_name(name)
        if checked_name != consumer.name:
            consumer.name = checked_name
            cached_fields_changed = True
    if status is not UNSET:
        checked_status = _check_status(status)
        if checked_status != consumer.status:
            consumer.status = checked_status
            cached_fields_changed = True
    if plan is not UNSET:
        checked_plan = _check_plan(plan)
        if checked_plan != consumer.plan:
            consumer.plan = checked_plan
            cached_fields_changed = True
    if metadata is not UNSET:
        consumer.metadata_ = _check_metadata(metadata)
    if cached_fields_changed:
        record_change(session, "consumer", str(consumer.id))
    try:
        await session.flush()
    except IntegrityError as exc:
        # Another transaction took the email between the check and the flush. The
        # session must be rolled back by the caller, as after any failed flush.
        raise Conflict("another consumer has this email", field="email") from exc
    return consumer


async def disable_consumer(session: AsyncSession, consumer_id: UUID) -> Consumer:
    """Disable the consumer and revoke every key of theirs; rows stay for history."""
    consumer = await get_consumer(session, consumer_id)
    now = utcnow()
    if consumer.status != "disabled":
        consumer.status = "disabled"
        record_change(session, "consumer", str(consumer.id))
    revoked = await session.scalars(
        update(ApiKey)
        .where(ApiKey.consumer_id == consumer.id, ApiKey.status != "revoked")
        .values(status="revoked", revoked_at=now, updated_at=now)
        .returning(ApiKey.id)
        .execution_options(synchronize_session="fetch")
    )
    for key_id in sorted(revoked.all()):
        record_change(session, "key", str(key_id))
    await session.flush()
    return consumer

"""API keys: creation, listing, updates, rotation, revocation, and secret lookup.

A key (api_keys) is what people manage; its secrets (api_key_secrets) are what
callers present. Only HMAC-SHA256(pepper, raw key) of a secret is stored; the raw
key exists in memory once, in the NewKey returned by create_key or rotate_key.

Rotation adds a secret and gives every older still-valid secret an expiry
`grace` from now, so that both work until then and the old one stops without
anyone acting.

Revocation and disabling act on the key row, not on its secrets: lookup_secret
still finds a revoked key's secret and returns it with key_status "revoked", so
the resolver answers 403 key_disabled (what the issue asks for revoked keys)
rather than 401 invalid_api_key. No status lets a revoked key authenticate, and a
revoked key can never become active again (update_key raises Conflict).

Every change the key resolver could have cached records a "key" change
(identity/changes.py) in the same transaction.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, cast
from uuid import UUID

from sqlalchemy import Table, bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.identity.apikeys import display_prefix, generate_key, hash_key
from tollway.identity.changes import record_change
from tollway.identity.consumers import UNSET, Unset
from tollway.identity.errors import Conflict, InvalidInput, NotFound
from tollway.storage.models import ApiKey, ApiKeySecret, Consumer, utcnow
from tollway.storage.pagination import DEFAULT_LIMIT, Page, keyset_page

KEY_STATUSES: Final = ("active", "disabled", "revoked")
# What update_key may set; "revoked" only comes from revoke_key.
SETTABLE_KEY_STATUSES: Final = ("active", "disabled")
NAME_MAX = 200
SCOPE_MAX = 200
SCOPES_MAX_COUNT = 100
DEFAULT_GRACE: Final = timedelta(hours=24)
# Bounded so that now + grace cannot overflow a datetime, and a "rotation" is not
# used as a way to keep an old secret alive indefinitely.
MAX_GRACE: Final = timedelta(days=365)


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    # The raw key: shown to the caller once, never stored.
    raw: str


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """What the resolver caches for a secret: the key and its consumer, flattened."""

    key_id: UUID
    consumer_id: UUID
    consumer_email: str
    consumer_name: str
    consumer_status: str
    consumer_plan: str | None
    key_name: str
    key_status: str
    key_expires_at: datetime | None
    secret_expires_at: datetime | None
    scopes: tuple[str, ...]
    limit_per_minute: int | None
    limit_per_day: int | None


# -- input checks ---------------------------------------------------------------


def _check_name(name: object) -> str:
    if not isinstance(name, str) or len(name) > NAME_MAX:
        raise InvalidInput(f"name must be a string of at most {NAME_MAX} characters", field="name")
    if "\x00" in name:
        # PostgreSQL text cannot hold NUL; SQLite would store it: refuse on both.
        raise InvalidInput("name must not contain NUL characters", field="name")
    return name.strip()


def _check_limit(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{field} must be null or an integer >= 1", field=field)
    if value > 2**31 - 1:
        raise InvalidInput(f"{field} is too large", field=field)
    return value


def _check_scopes(scopes: object) -> list[str]:
    # A bare string is iterable too; taking "abc" as ["a", "b", "c"] would be a trap.
    if isinstance(scopes, (str, bytes)) or not isinstance(scopes, Iterable):
        raise InvalidInput("scopes must be a list of strings", field="scopes")
    checked: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str) or not scope.strip() or len(scope) > SCOPE_MAX:
            raise InvalidInput(
                f"each scope must be a non-empty string of at most {SCOPE_MAX} characters",
                field="scopes",
            )
        if scope.strip() not in checked:
            checked.append(scope.strip())
    if len(checked) > SCOPES_MAX_COUNT:
        raise InvalidInput(f"at most {SCOPES_MAX_COUNT} scopes", field="scopes")
    return checked


def _check_expiry(expires_at: object, now: datetime) -> datetime | None:
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise InvalidInput("expires_at must be a datetime with a timezone", field="expires_at")
    if expires_at <= now:
        raise InvalidInput("expires_at must be in the future", field="expires_at")
    return expires_at


def _check_status(status: object, allowed: tuple[str, ...]) -> str:
    if status not in allowed:
        raise InvalidInput(f"status must be one of {', '.join(allowed)}", field="status")
    assert isinstance(status, str)
    return status


# -- operations -----------------------------------------------------------------


def _new_secret(pepper: bytes, key_id: UUID, now: datetime) -> tuple[str, ApiKeySecret]:
    raw = generate_key()
    return raw, ApiKeySecret(hash=hash_key(pepper, raw), key_id=key_id, created_at=now)


async def create_key(
    session: AsyncSession,
    pepper: bytes,
    *,
    consumer_id: UUID,
    name: str = "",
    limit_per_minute: int | None = None,
    limit_per_day: int | None = None,
    scopes: Iterable[str] = (),
    expires_at: datetime | None = None,
) -> NewKey:
    """A new active key for the consumer; the raw key is in the result, once."""
    now = utcnow()
    values: dict[str, Any] = {
        "name": _check_name(name),
        "limit_per_minute": _check_limit(limit_per_minute, "limit_per_minute"),
        "limit_per_day": _check_limit(limit_per_day, "limit_per_day"),
        "scopes": _check_scopes(scopes),
        "expires_at": _check_expiry(expires_at, now),
    }
    # FOR UPDATE (PostgreSQL): a concurrent DELETE /users holds this row until it
    # commits, and its revoking UPDATE cannot see a key inserted meanwhile; so wait
    # for it and read the status it leaves, rather than add an active key it misses.
    consumer = await session.scalar(
        select(Consumer)
        .where(Consumer.id == consumer_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if consumer is None:
        raise NotFound(f"consumer {consumer_id} not found")
    if consumer.status != "active":
        raise Conflict("the consumer is disabled", field="user_id")
    key_id = uuid.uuid4()
    raw, secret = _new_secret(pepper, key_id, now)
    key = ApiKey(
        id=key_id,
        consumer_id=consumer.id,
        prefix=display_prefix(raw),
        status="active",
        created_at=now,
        updated_at=now,
        **values,
    )
    session.add(key)
    session.add(secret)
    await session.flush()
    # SQLite has no FOR UPDATE; the flush above holds its write lock, so this read
    # sees whatever a concurrent disable committed before it (callers roll back).
    status = await session.scalar(select(Consumer.status).where(Consumer.id == consumer.id))
    if status != "active":
        raise Conflict("the consumer is disabled", field="user_id")
    return NewKey(key=key, raw=raw)


async def get_key(session: AsyncSession, key_id: UUID) -> ApiKey:
    key = await session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"key {key_id} not found")
    return key


async def list_keys(
    session: AsyncSession,
    *,
    consumer_id: UUID | None = None,
    status: str | None = None,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[ApiKey]:
    """Keys newest first, optionally of one consumer and/or in one status."""
    stmt = select(ApiKey)
    if consumer_id is not None:
        stmt = stmt.where(ApiKey.consumer_id == consumer_id)
    if status is not None:
        stmt = stmt.where(ApiKey.status == _check_status(status, KEY_STATUSES))
    return await keyset_page(
        session, stmt, ts_column=ApiKey.created_at, id_column=ApiKey.id, cursor=cursor, limit=limit
    )


async def update_key(
    session: AsyncSession,
    key_id: UUID,
    *,
    name: str | Literal[Unset.UNSET] = UNSET,
    status: str | Literal[Unset.UNSET] = UNSET,
    limit_per_minute: int | Literal[Unset.UNSET] | None = UNSET,
    limit_per_day: int | Literal[Unset.UNSET] | None = UNSET,
    scopes: Iterable[str] | Literal[Unset.UNSET] = UNSET,
    expires_at: datetime | Literal[Unset.UNSET] | None = UNSET,
) -> ApiKey:
    """Apply the given fields. Status is active|disabled only (revoke_key revokes);
    a revoked key keeps its status: asking for another one raises Conflict."""
    now = utcnow()
    key = await get_key(session, key_id)
    changes: dict[str, Any] = {}
    if name is not UNSET:
        changes["name"] = _check_name(name)
    if status is not UNSET:
        changes["status"] = _check_status(status, SETTABLE_KEY_STATUSES)
        if key.status == "revoked":
            raise Conflict("a revoked key cannot be enabled or disabled", field="status")
    if limit_per_minute is not UNSET:
        changes["limit_per_minute"] = _check_limit(limit_per_minute, "limit_per_minute")
    if limit_per_day is not UNSET:
        changes["limit_per_day"] = _check_limit(limit_per_day, "limit_per_day")
    if scopes is not UNSET:
        changes["scopes"] = _check_scopes(scopes)
    if expires_at is not UNSET:
        changes["expires_at"] = _check_expiry(expires_at, now)
    changed = False
    for field, value in changes.items():
        if getattr(key, field) != value:
            setattr(key, field, value)
            changed = True
    if changed:
        # Every field above is part of what the resolver caches.
        record_change(session, "key", str(key.id))
        await session.flush()
    return key


async def revoke_key(session: AsyncSession, key_id: UUID) -> ApiKey:
    """Revoke for good (DELETE /keys/{id}): the row stays for usage history, its
    secrets stop authenticating (lookups report key_status "revoked")."""
    key = await get_key(session, key_id)
    if key.status != "revoked":
        key.status = "revoked"
        key.revoked_at = utcnow()
        record_change(session, "key", str(key.id))
        await session.flush()
    return key


async def rotate_key(
    session: AsyncSession,
    pepper: bytes,
    key_id: UUID,
    *,
    grace: timedelta = DEFAULT_GRACE,
) -> NewKey:
    """A new secret for the key; older secrets keep working for `grace` (0: not at all).

    An older secret that already expires sooner keeps its earlier expiry; secrets
    that have already expired are deleted, since they can never match again.
    """
    if not isinstance(grace, timedelta) or grace < timedelta(0) or grace > MAX_GRACE:
        raise InvalidInput(f"grace must be between 0 and {MAX_GRACE.days} days", field="grace")
    key = await get_key(session, key_id)
    if key.status != "active":
        raise Conflict(f"only an active key can be rotated (this one is {key.status})")
    consumer = await session.get(Consumer, key.consumer_id)
    if consumer is None or consumer.status != "active":
        raise Conflict("the key's consumer is disabled")
    now = utcnow()
    old_until = now + grace
    await session.execute(
        delete(ApiKeySecret).where(
            ApiKeySecret.key_id == key.id,
            ApiKeySecret.expires_at.is_not(None),
            ApiKeySecret.expires_at <= now,
        )
    )
    await session.execute(
        update(ApiKeySecret)
        .where(
            ApiKeySecret.key_id == key.id,
            or_(ApiKeySecret.expires_at.is_(None), ApiKeySecret.expires_at > old_until),
        )
        .values(expires_at=old_until)
        .execution_options(synchronize_session=False)
    )
    raw, secret = _new_secret(pepper, key.id, now)
    session.add(secret)
    # Lists show the current secret's prefix, so people can tell which one they hold.
    key.prefix = display_prefix(raw)
    record_change(session, "key", str(key.id))
    await session.flush()
    return NewKey(key=key, raw=raw)


async def lookup_secret(session: AsyncSession, key_hash: str, now: datetime) -> KeyLookup | None:
    """The key and consumer behind a secret's hash, or None when the hash is unknown
    or that secret's grace period is over.

    Key status, consumer status and key expiry are deliberately not filtered: the
    resolver turns them into 403 key_disabled / key_expired rather than 401.
    """
    row = (
        await session.execute(
            select(
                ApiKeySecret.hash,
                ApiKeySecret.expires_at,
                ApiKey.id,
                ApiKey.name,
                ApiKey.status,
                ApiKey.expires_at,
                ApiKey.scopes,
                ApiKey.limit_per_minute,
                ApiKey.limit_per_day,
                Consumer.id,
                Consumer.email,
                Consumer.name,
                Consumer.status,
                Consumer.plan,
            )
            .join(ApiKey, ApiKey.id == ApiKeySecret.key_id)
            .join(Consumer, Consumer.id == ApiKey.consumer_id)
            .where(ApiKeySecret.hash == key_hash)
        )
    ).first()
    if row is None:
        return None
    (
        stored_hash,
        secret_expires_at,
        key_id,
        key_name,
        key_status,
        key_expires_at,
        scopes,
        limit_per_minute,
        limit_per_day,
        consumer_id,
        consumer_email,
        consumer_name,
        consumer_status,
        consumer_plan,
    ) = row
    # The index found the row; the constant-time comparison is what decides, so
    # that no collation or case folding of the column can make a near miss match.
    if not hmac.compare_digest(stored_hash.encode(), key_hash.encode()):
        return None
    if secret_expires_at is not None and secret_expires_at <= now:
        return None
    return KeyLookup(
        key_id=key_id,
        consumer_id=consumer_id,
        consumer_email=consumer_email,
        consumer_name=consumer_name,
        consumer_status=consumer_status,
        consumer_plan=consumer_plan,
        key_name=key_name,
        key_status=key_status,
        key_expires_at=key_expires_at,
        secret_expires_at=secret_expires_at,
        scopes=tuple(scopes or ()),
        limit_per_minute=limit_per_minute,
        limit_per_day=limit_per_day,
    )


async def touch_last_used(session: AsyncSession, used: dict[UUID, datetime]) -> None:
    """Record when keys were last used (batched by the resolver, off the hot path).

    Only moves last_used_at forward, so batches arriving out of order from several
    workers cannot make it go back, and leaves updated_at alone: being used is not
    an edit. Keys are updated in id order so concurrent batches cannot deadlock.
    """
    if not used:
        return
    table = cast(Table, ApiKey.__table__)
    stmt = (
        update(table)
        .where(
            table.c.id == bindparam("b_id"),
            or_(table.c.last_used_at.is_(None), table.c.last_used_at < bindparam("b_ts")),
        )
        # Naming updated_at stops its onupdate default from firing.
        .values(last_used_at=bindparam("b_ts"), updated_at=table.c.updated_at)
    )
    params = [{"b_id": key_id, "b_ts": ts} for key_id, ts in sorted(used.items())]
    await session.execute(stmt, params)

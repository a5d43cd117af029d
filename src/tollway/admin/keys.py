"""/keys: API keys. The raw key is answered once, by create and by rotate."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.admin.deps import (
    ERRORS_DOC,
    CursorQuery,
    LimitQuery,
    RuntimeDep,
    SessionDep,
    commit_and_announce,
)
from tollway.admin.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyRotate,
    KeyRotated,
    KeyStatus,
    KeyUpdate,
)
from tollway.identity import keys
from tollway.identity.apikeys import hash_key
from tollway.storage.models import ApiKeySecret
from tollway.storage.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/keys", tags=["keys"], responses=ERRORS_DOC)


@router.post("", status_code=201, response_model=KeyCreated)
async def create_key(body: KeyCreate, session: SessionDep, runtime: RuntimeDep) -> KeyCreated:
    """Issue a key for a user. The answer holds the raw key (`key`) once; only its
    HMAC is stored, so it cannot be shown again."""
    new = await keys.create_key(
        session,
        runtime.pepper,
        consumer_id=body.user_id,
        name=body.name,
        limit_per_minute=body.limit_per_minute,
        limit_per_day=body.limit_per_day,
        scopes=tuple(body.scopes),
        expires_at=body.expires_at,
    )
    await commit_and_announce(session, runtime)
    return KeyCreated(**KeyOut.fields_of(new.key), key=new.raw)


@router.get("", response_model=KeyList)
async def list_keys(
    session: SessionDep,
    user_id: uuid.UUID | None = None,
    status: KeyStatus | None = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> KeyList:
    """Keys, newest first, one page at a time (never their secrets)."""
    page = await keys.list_keys(
        session, consumer_id=user_id, status=status, cursor=cursor, limit=limit
    )
    return KeyList(items=[KeyOut.of(k) for k in page.items], next_cursor=page.next_cursor)


@router.get("/{id}", response_model=KeyOut)
async def get_key(id: uuid.UUID, session: SessionDep) -> KeyOut:
    """One key by id."""
    return KeyOut.of(await keys.get_key(session, id))


@router.patch("/{id}", response_model=KeyOut)
async def update_key(
    id: uuid.UUID, body: KeyUpdate, session: SessionDep, runtime: RuntimeDep
) -> KeyOut:
    """Enable or disable, change limits, scopes, name or expiry (only the fields
    given). Gateways refuse a disabled key within a second."""
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    if "scopes" in changes:
        changes["scopes"] = tuple(changes["scopes"])
    key = await keys.update_key(session, id, **changes)
    await commit_and_announce(session, runtime)
    return KeyOut.of(key)


@router.delete("/{id}", response_model=KeyOut)
async def revoke_key(id: uuid.UUID, session: SessionDep, runtime: RuntimeDep) -> KeyOut:
    """Revoke the key for good. The record stays for its usage history."""
    key = await keys.revoke_key(session, id)
    await commit_and_announce(session, runtime)
    return KeyOut.of(key)


@router.post("/{id}/rotate", response_model=KeyRotated)
async def rotate_key(
    id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
    body: KeyRotate | None = None,
) -> KeyRotated:
    """Issue a new secret for the key (same id, limits and scopes). The previous
    secret keeps working for `grace_seconds` (default 24 h), then stops by itself."""
    grace = timedelta(seconds=(body or KeyRotate()).grace_seconds)
    new = await keys.rotate_key(session, runtime.pepper, id, grace=grace)
    previous = await previous_secret_expiry(session, id, hash_key(runtime.pepper, new.raw))
    await commit_and_announce(session, runtime)
    return KeyRotated(**KeyOut.fields_of(new.key), key=new.raw, previous_expires_at=previous)


async def previous_secret_expiry(
    session: AsyncSession, key_id: uuid.UUID, new_hash: str
) -> datetime | None:
    """When the last of the key's other secrets stops working, as stored."""
    # After a rotation every other secret has an expiry; NULLs are excluded anyway
    # because backends disagree on where they sort.
    return await session.scalar(
        select(ApiKeySecret.expires_at)
        .where(
            ApiKeySecret.key_id == key_id,
            ApiKeySecret.hash != new_hash,
            ApiKeySecret.expires_at.is_not(None),
        )
        .order_by(ApiKeySecret.expires_at.desc())
        .limit(1)
    )
